"""The package's layers: no module imports from a layer above its own."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lora_jax"

# Bottom to top. A module may import its own layer and those below it.
LAYERS = [
    ("foundation", ["errors", "json_files", "config_rules", "losses"]),
    ("models", ["models"]),
    ("methods", ["methods"]),
    ("interop", ["interop"]),
    ("data", ["metrics", "data"]),
    ("config", ["config", "config_checks"]),
    ("training", ["training", "generate", "adapter_set"]),
    ("entry points", ["train", "evaluate", "analysis"]),
]
LAYER_OF = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def layer(dotted: str) -> int:
    """lora_jax.x.y -> the layer of x."""
    return LAYER_OF[dotted.split(".")[1]]


def imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("lora_jax"):
            if node.module == "lora_jax":
                found |= {f"lora_jax.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_jax.")}
    return found


def test_every_module_has_a_layer_and_none_reaches_upward():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts == ("__init__",):
            continue
        own = LAYER_OF[parts[0]]
        for dotted in imports(path):
            if layer(dotted) > own:
                upward.append(f"{'/'.join(parts)} ({LAYERS[own][0]}) imports {dotted} "
                              f"({LAYERS[layer(dotted)][0]})")
    assert not upward, "\n".join(upward)
