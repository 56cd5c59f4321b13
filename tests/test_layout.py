"""The package's layers and seams, read from its source (AST, nothing run):

- no module imports from a layer above its own;
- a method is named only in lora_jax/methods/ (its file and the registry, `METHODS`);
- a model family, or a name only its checkpoints use, only in lora_jax/models/ (its file and the
  registry, `FAMILIES`), and in config.py's default values;
- no module but the task registry (lora_jax/data/tasks.py) branches on a task's name.

"Names" means a string constant in code; docstrings and comments do not count.
"""

from __future__ import annotations

import ast
import functools
import pathlib
from collections.abc import Iterator

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lora_jax"

# Bottom to top. A module may import its own layer and those below it.
LAYERS = [
    ("foundation", ["errors", "json_files", "config_rules", "losses", "quant", "merging"]),
    ("models", ["models"]),
    ("interop", ["interop"]),  # other libraries' files: HF checkpoints, PEFT adapter directories
    ("methods", ["methods", "exports"]),  # each method's PEFT mapping builds on interop
    ("metrics", ["metrics"]),  # scores of predictions; they know no data files
    ("data", ["data"]),
    ("config", ["config", "config_checks"]),
    ("training", ["training", "generate", "adapter_set"]),
    ("entry points", ["train", "evaluate", "analysis"]),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}

# Where each kind of name may be written (module paths relative to lora_jax/, '/'-joined).
METHOD_HOMES = ("methods/",)
FAMILY_HOMES = ("models/", "config.py")  # config.py: defaults such as model.name 'minilm'
TASK_REGISTRY = ("data/tasks.py",)


def layer(dotted: str) -> int:
    """lora_jax.x.y -> the layer of x."""
    return LAYER_OF[dotted.split(".")[1]]


def modules() -> Iterator[tuple[str, ast.Module]]:
    """('training/loop.py', its syntax tree) for every module of the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path.relative_to(PACKAGE).as_posix(), ast.parse(path.read_text())


def imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_jax"):
            if node.module == "lora_jax":
                found |= {f"lora_jax.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_jax.")}
    return found


def code_strings(tree: ast.Module) -> Iterator[ast.Constant]:
    """The string constants of a module's code: its, its classes' and functions' docstrings
    left out (f-strings' literal parts count)."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and id(node) not in docstrings):
            yield node


def naming(names: set[str], homes: tuple[str, ...]) -> list[str]:
    """'file:line: literal' for each string constant in `names` outside `homes`."""
    found = []
    for module, tree in modules():
        if module.startswith(homes):
            continue
        hits = sorted((node.lineno, node.value) for node in code_strings(tree)
                      if node.value in names)
        found += [f"{module}:{line}: {value!r}" for line, value in hits]
    return found


# --- The names each seam owns --------------------------------------------------------------------

def method_names() -> set[str]:
    """Registered method names, and the names of the low-rank factor leaves a method declares
    (`Method.low_rank_leaves`: LoRA's 'lora_a', 'lora_b'), which are its own too."""
    from lora_jax.methods import METHODS, Method

    names, classes = set(METHODS), [Method]
    while classes:  # every method class, however deep below Method
        cls = classes.pop()
        names |= set(getattr(cls, "low_rank_leaves", ()))
        classes += cls.__subclasses__()
    return names


def family_names() -> set[str]:
    """Each family's model_type and the names only its checkpoints use: packaged checkpoints and
    data-dir tokenizers it names, checkpoint buffers, heads, fused parts, dropout fields, and
    the module names of its parameter tree that are identifiers of its own ('c_attn', 'ln_f',
    'q_proj', 'LayerNorm': with an underscore or a capital, unlike 'dense' or 'kernel')."""
    from lora_jax.models import FAMILIES

    names = set()
    for model_type, family in FAMILIES.items():
        names |= {model_type, *family.checkpoints, *family.tokenizers,
                  *family.checkpoint_buffers, *family.random_heads,
                  *family.fused_parts.values(), *family.dropout_fields}
    return names | {n for n in _parameter_names() if "_" in n or n != n.lower()}


@functools.cache
def _parameter_names() -> frozenset[str]:
    """Every name in the parameter paths of the tiny models (config.TINY_MODELS), per task."""
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import traverse_util

    from lora_jax.config import TINY_MODELS
    from lora_jax.models import FAMILIES

    names = set()
    for fields in TINY_MODELS.values():
        fields = dict(fields)
        family = FAMILIES[fields["model_type"]]
        hf_config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
        for task in family.tasks:
            model = family.build(hf_config, task, 2 if task else None, dtype=jnp.float32,
                                 param_dtype=jnp.float32, remat=False,
                                 attention_implementation=None)
            shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8), jnp.int32))
            names |= {part for path in traverse_util.flatten_dict(shapes["params"])
                      for part in path[:-1]}  # the leaves are Flax's: kernel, bias, scale
    return frozenset(names)


def task_names() -> set[str]:
    from lora_jax.data.tasks import TASKS

    return set(TASKS)


def task_branches(tree: ast.Module, names: set[str]) -> Iterator[tuple[int, str]]:
    """(line, task name) of each comparison or membership test against a task's name: a string
    constant, a literal tuple/list/set holding one, or a module constant bound to such a
    tuple; and each `case` on one."""
    def literals(node: ast.AST) -> set[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return {node.value}
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return {e.value for e in node.elts
                    if isinstance(e, ast.Constant) and isinstance(e.value, str)}
        return set()

    constants = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name):
                    constants[target.id] = literals(node.value)
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                strings = (constants.get(operand.id, set()) if isinstance(operand, ast.Name)
                           else literals(operand))
                for name in sorted(strings & names):
                    yield operand.lineno, name
        elif isinstance(node, ast.MatchValue):
            for name in sorted(literals(node.value) & names):
                yield node.lineno, name


# --- The checks ----------------------------------------------------------------------------------

def test_every_module_has_a_layer_and_none_reaches_upward():
    upward = []
    for module, tree in modules():
        parts = pathlib.PurePosixPath(module).with_suffix("").parts
        if parts == ("__init__",):
            continue
        own = LAYER_OF[parts[0]]
        for dotted in sorted(imports(tree)):
            if layer(dotted) > own:
                upward.append(f"{module} ({LAYERS[own][0]}) imports {dotted} "
                              f"({LAYERS[layer(dotted)][0]})")
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_methods_are_named_only_in_their_files():
    found = naming(method_names(), METHOD_HOMES)
    assert not found, ("a method named outside lora_jax/methods/ (ask the method instead: "
                       "a capability of its registration):\n" + "\n".join(found))


def test_model_families_are_named_only_in_their_files():
    found = naming(family_names(), FAMILY_HOMES)
    assert not found, ("a model family or its checkpoints' names outside lora_jax/models/ (ask "
                       "the family instead, `lora_jax.models.family(model_type)`):\n"
                       + "\n".join(found))


def test_no_module_branches_on_a_task_name():
    names = task_names()
    found = [f"{module}:{line}: {name!r}" for module, tree in modules()
             if not module.startswith(TASK_REGISTRY) for line, name in task_branches(tree, names)]
    assert not found, ("a branch on a task's name outside the task registry (ask its entry "
                       "instead, `lora_jax.data.tasks.task_entry(name)`):\n" + "\n".join(found))


def test_the_checks_see_what_they_look_for():
    """Each check finds a planted example: a check that finds nothing proves nothing."""
    tree = ast.parse('"""Doc: lora, gpt2, e2e."""\n'
                     'TASKS = ("e2e", "sst2")\n'
                     'def f(c):\n'
                     '    """lora_a in a docstring."""\n'
                     '    if c.task in TASKS or c.task == "instruct":\n'
                     '        return "lora_a", "gpt2", f"{c}minilm"\n')
    strings = {node.value for node in code_strings(tree)}
    assert {"lora_a", "gpt2", "e2e", "sst2", "instruct"} <= strings
    assert not strings & {"Doc: lora, gpt2, e2e.", "lora_a in a docstring."}
    assert {"lora", "lora_a", "lora_b", "preembed"} <= method_names()
    assert {"gpt2", "bert", "minilm", "attn.bias", "qkv", "c_attn", "LayerNorm"} <= family_names()
    assert not {"kernel", "bias", "dense", "value"} & family_names()
    assert {"e2e", "instruct", "sst2", "stsb"} <= task_names()
    assert sorted(task_branches(tree, task_names())) == [(5, "e2e"), (5, "instruct"),
                                                         (5, "sst2")]


LONGEST_FUNCTION = 80  # lines: a function fits on a screen (STYLE.md)


def test_no_function_is_longer_than_a_screen():
    long = []
    for name, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= LONGEST_FUNCTION:
                    long.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "\n".join(long)


COPIED_BLOCK = 11  # lines: a block this long repeated is a second copy of one mechanism


def copied_blocks(package: pathlib.Path) -> list[str]:
    """Where a run of COPIED_BLOCK identical lines (stripped; blank lines and comments left
    out) appears a second time in the modules under `package`."""
    seen: dict[tuple[str, ...], tuple[str, int, int]] = {}  # window -> (file, index, line)
    copies = []
    for path in sorted(package.rglob("*.py")):
        name = path.relative_to(package).as_posix()
        lines = [(n, line.strip()) for n, line in enumerate(path.read_text().splitlines(), 1)
                 if line.strip() and not line.strip().startswith("#")]
        for i in range(len(lines) - COPIED_BLOCK + 1):
            window = tuple(text for _, text in lines[i:i + COPIED_BLOCK])
            first = seen.setdefault(window, (name, i, lines[i][0]))
            # A repeat in another file, or further on in the same one (not an overlap).
            if first[0] != name or i - first[1] >= COPIED_BLOCK:
                copies.append(f"{name}:{lines[i][0]} repeats {first[0]}:{first[2]}")
    return copies


def test_no_block_of_code_is_copied(tmp_path):
    """One mechanism, one place: no block of more than 10 lines is written twice (and the
    check finds a planted copy of the loop's `run`)."""
    assert not copied_blocks(PACKAGE), "\n".join(copied_blocks(PACKAGE))
    source = (PACKAGE / "training" / "loop.py").read_text()
    (tmp_path / "loop.py").write_text(source)
    (tmp_path / "copy.py").write_text(source[source.index("def run("):])
    assert copied_blocks(tmp_path)
