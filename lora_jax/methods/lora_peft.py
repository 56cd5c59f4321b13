"""LoRA's PEFT mapping: (LoraSpec, adapters) <-> a PEFT LoRA adapter directory, and the codec
through which `lora_jax.exports` saves and reads LoRA (and LoRA+, which differs in training
only). DoRA and PiSSA, which PEFT keeps in the same format, build their codecs on this one.

A and B have PEFT's orientation already, so they are written as they are:

    base_model.model.transformer.h.0.attn.c_attn.lora_A.weight   (r, d_in)    float32
    base_model.model.transformer.h.0.attn.c_attn.lora_B.weight   (d_out, r)
    base_model.model.transformer.h.0.attn.c_attn.lora_magnitude_vector   (d_out,)   DoRA only

Example:
    export_peft("out/sst2", spec, trainable, model_type="roberta", task="classification")
    spec, trainable = load_peft("out/sst2", params, model_type="roberta", task="classification")
    logits = lora.adapt(model.apply, spec)(params, trainable, ids, attention_mask=mask).logits
"""

from __future__ import annotations

import math
import os
import pathlib
import re
from typing import Any

import numpy as np
import packaging.version
from flax import traverse_util

from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.methods import lora
from lora_jax.methods.base import Method, Params, PeftCodec, modules_of
from lora_jax.models import family as model_family

# PEFT's `init_lora_weights` values (lower-cased) that choose only A's and B's starting values:
# PEFT's load leaves the base as it is, so the adapter is a plain LoRA on W0. (MiCA also freezes B
# in training; its forward is LoRA's. None reads as False.)
PLAIN_INITS = ("true", "false", "none", "gaussian", "eva", "orthogonal", "mica", "nora")
# Values whose start moved the base weight, and that are re-derived from it on load: OLoRA here
# (`olora_start`), PiSSA by its own codec (`methods.pissa`).
REDERIVED_INITS = ("olora", "pissa")
# Values whose moved base cannot be re-derived from the base and the file: value (a prefix for
# 'pissa_niter_') -> why, and what to do instead.
_CONVERT = ("save it from PEFT with save_pretrained(..., path_initial_model_for_weight_conversion="
            "...), which writes it as a plain LoRA on the original base")
REFUSED_INITS = {
    "pissa_niter_": ("PiSSA's randomised SVD draws from torch's generator", _CONVERT),
    "corda": ("CorDA's start depends on the covariance of calibration data, not in the file",
              _CONVERT),
    "astra": ("Astra's start depends on the output activations of calibration data, not in the "
              "file", _CONVERT),
    "lora_ga": ("LoRA-GA's start depends on gradients of training data, not in the file",
                _CONVERT),
    "loftq": ("LoftQ trained against the quantised base, not the base given here",
              "merge it in PEFT (merge_and_unload) and load the merged model as the base"),
}
# PEFT's names of a module's LoRA tensors -> ours while reading ('M': DoRA's magnitude).
_LEAVES = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "M"}
_KEY = re.compile(r"^(?P<module>.+)\.(?P<leaf>lora_[AB]\.weight|lora_magnitude_vector)$")
MAGNITUDE_KEY = "lora_magnitude_vector"  # DoRA's magnitude, one per output unit
# PEFT's OLoRA start factors W0^T (the Linear layout) for every module since this release; before
# it, a module storing the kernel itself (GPT-2's Conv1D) had that stored kernel factored.
OLORA_AS_LINEAR_SINCE = (0, 22)


def _fused(a: np.ndarray, b: np.ndarray, parts: tuple[bool, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Split-output adapters (n, r, d_in), (n, d_part, r) as one rank-n*r adapter on the whole
    output: A stacks the parts' A; B puts part j's B in its rows and in A's j-th block of columns,
    with zeros elsewhere (all-zero rows for an un-adapted part)."""
    n, rank, d_in = a.shape
    d_part = b.shape[1]
    b_full = np.zeros((len(parts) * d_part, n * rank), np.float32)
    for p, j in lora.adapted_slots(parts):
        b_full[p * d_part:(p + 1) * d_part, j * rank:(j + 1) * rank] = b[j]
    return a.reshape(n * rank, d_in), b_full


def export_peft(
    directory: str | os.PathLike,
    spec: lora.LoraSpec,
    trainable: dict,
    *,
    model_type: str,
    task: str | None,
    base_model_name_or_path: str | None = None,
    magnitudes: dict | None = None,
) -> pathlib.Path:
    """Writes `trainable` as a PEFT LoRA adapter that `PeftModel.from_pretrained` loads as is.

    `target_modules` lists the full HF names of exactly the adapted modules. The `r` and
    `lora_alpha` of most modules become the defaults; the others go to `rank_pattern` /
    `alpha_pattern` under their full names. Fully-trained leaves (`trainable['params']`) are saved
    under `modules_to_save`: 'classifier' for a classification head (PEFT restores it whole; a head
    leaf not in the file keeps the base checkpoint's value), else the module owning the leaf.

    Split outputs (e.g. GPT-2's fused c_attn adapted on q and v only) have no PEFT equivalent, so
    they are written, exactly, as one adapter of rank n*r on the fused module: A_full (n*r, d_in)
    stacks the n adapted parts' A; B_full (d_out, n*r) holds part j's B in the rows of its output
    slice and columns j*r..(j+1)*r, zeros elsewhere (k's rows are all zero). Then
    B_full A_full = [B_q A_q; 0; B_v A_v], and alpha_full = n * alpha (rslora: sqrt(n) * alpha)
    keeps the scale alpha / r. `load_peft` reads it back as that plain rank-n*r adapter.

    Args:
      directory: created if absent; an existing directory must be empty or hold only an earlier
        export (its two files), which is replaced. Files go to a temporary sibling first, so a
        failed export leaves what was there.
      spec: the spec `trainable` was made with.
      trainable: {'lora': adapters, 'params': fully-trained leaves}, as from `lora.split`.
      model_type: 'gpt2', 'bert' or 'roberta'.
      task: None (GPT-2 LM, bare encoder) or 'classification' (task_type SEQ_CLS).
      base_model_name_or_path: recorded in the config for PEFT's `AutoPeftModel`.
      magnitudes: DoRA: our module path -> its magnitude over all d_out outputs; written as
        PEFT's `lora_magnitude_vector` with `use_dora` (see `methods.dora`).

    Returns:
      The directory written.

    Raises:
      FileExistsError: `directory` holds other files (they are left untouched).
      ValueError: adapters that do not fit `spec`'s split_outputs; a module both LoRA-adapted and
        trained in full; GPT-2's tied `wte` trained in full (PEFT would untie it).
    """
    return write_lora(directory, spec, trainable.get(lora.LoRA.name, {}),
                      trainable.get("params", {}), model_type=model_type, task=task,
                      base_model_name_or_path=base_model_name_or_path, magnitudes=magnitudes)


def write_lora(directory: str | os.PathLike, spec: lora.LoraSpec, adapters: Params,
               trained: Params, *, model_type: str, task: str | None,
               base_model_name_or_path: str | None = None,
               magnitudes: dict | None = None) -> pathlib.Path:
    """`export_peft` for a method's own adapters ({module: {'lora_a', 'lora_b', ...}}) and the
    leaves trained in full (`trainable['params']`)."""
    root = pa.hf_root(model_type, task)
    tensors, ranks, alphas = _lora_tensors(spec, adapters, root)
    for module, magnitude in (magnitudes or {}).items():
        name = root + hub.hf_module_name("/".join(module))
        tensors[f"{pa.PREFIX}{name}.{MAGNITUDE_KEY}"] = np.asarray(magnitude, np.float32)
    saved, full = pa.modules_to_save(trained, model_type, task)
    tensors.update(full)
    for name in ranks:
        if any(name == m or name.startswith(m + ".") for m in saved):
            raise ValueError(f"{name} is both LoRA-adapted and trained in full; PEFT cannot save "
                             "a module inside `modules_to_save` as a LoRA adapter")

    r, alpha = pa.most_common(ranks, spec.rank), pa.most_common(alphas, spec.alpha)
    config = {
        **pa.config_fields("LORA", model_type, task, base_model_name_or_path, saved),
        "r": r,
        "lora_alpha": pa.json_number(alpha),
        "lora_dropout": spec.dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: k for m, k in ranks.items() if k != r},
        "alpha_pattern": {m: pa.json_number(x) for m, x in alphas.items() if x != alpha},
        "use_rslora": spec.rslora,
        "init_lora_weights": True,
        "use_dora": bool(magnitudes),
    }
    return pa.write_adapter_dir(pathlib.Path(directory), config, tensors,
                                metadata={"format": "pt"})


def _lora_tensors(spec: lora.LoraSpec, adapters: Params, root: str) -> tuple[dict, dict, dict]:
    """(PEFT key -> tensor, HF module -> rank, HF module -> alpha) for every adapter."""
    tensors, ranks, alphas = {}, {}, {}
    for module, ab in modules_of(adapters).items():
        ab = {k: v for k, v in ab.items() if k in (lora.LORA_A, lora.LORA_B)}
        path = "/".join(module + ("kernel",))
        name = root + hub.hf_module_name("/".join(module))
        a, b = np.asarray(ab[lora.LORA_A], np.float32), np.asarray(ab[lora.LORA_B], np.float32)
        parts = spec.parts_for(path)
        n, ndim = sum(parts), (3 if len(parts) > 1 else 2)
        if a.ndim != ndim or b.ndim != ndim or (ndim == 3 and len(a) != n):
            raise ValueError(f"adapter for {path!r} has A {a.shape} and B {b.shape}, which do not "
                             f"fit the spec's split_outputs {parts}")
        if len(parts) > 1:
            a, b = _fused(a, b, parts)
        tensors[f"{pa.PREFIX}{name}.lora_A.weight"] = a
        tensors[f"{pa.PREFIX}{name}.lora_B.weight"] = b
        ranks[name] = a.shape[0]
        # alpha_full / (n r) = alpha / r; under rslora alpha_full / sqrt(n r) = alpha / sqrt(r).
        alphas[name] = spec.alpha_for(path) * (math.sqrt(n) if spec.rslora else n)
    return tensors, ranks, alphas


def _pattern_value(patterns: dict, name: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching a suffix of `name`."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def load_peft(
    directory: str | os.PathLike,
    params: dict,
    *,
    model_type: str,
    task: str | None = None,
) -> tuple[lora.LoraSpec, dict]:
    """Reads a PEFT LoRA adapter directory as a LoraSpec and a trainable tree for `params`.

    Module names are matched as `hub.load_pretrained` matches checkpoint keys, so an adapter
    saved on HF's task model also fits our bare encoder and vice versa. Every module is an exact
    target with its rank read from its tensors and its alpha from PEFT's `alpha_pattern` rules.
    Other tensors (`modules_to_save`, e.g. the classifier head) go to `trainable['params']`, each
    module whole: a leaf missing from the file keeps its value in `params`, as in PEFT (a module
    with no tensor there is refused). An adapter whose PEFT start moved the base
    (`init_lora_weights`) is read as the same function on `params` where that can be re-derived
    (OLoRA), else refused; see `checked_init`.

    Args:
      directory: holds adapter_config.json and adapter_model.safetensors (pickles are refused).
      params: the base model's params, e.g. from `hub.load_pretrained`.
      model_type: 'gpt2', 'bert' or 'roberta'.
      task: None or 'classification', as `params`' model.

    Returns:
      (spec, trainable). `params` can serve as the frozen tree: `lora.adapt` overlays
      `trainable['params']` on it.

    Raises:
      FileNotFoundError: the directory or a file is missing, or the weights are a pickle.
      ValueError: peft_type is not 'LORA'; an unsupported PEFT feature; a tensor whose module is not
        in `params` (named); a shape that does not fit the base (parameter and both shapes named);
        a PiSSA adapter (`lora_jax.exports.load` reads it).
      FileFormatError (a ValueError): an `init_lora_weights` whose moved base cannot be
        re-derived; a module to save with no tensor in the file, or one of another shape.
    """
    directory = pathlib.Path(directory)
    config, spec, adapters, full = read_lora(directory, params, model_type, task)
    if init_weights(config).startswith("pissa"):
        raise ValueError(f"{directory} is a PiSSA adapter (init_lora_weights "
                         f"{config['init_lora_weights']!r}): it is trained against a residual "
                         "base, so it is not a plain LoRA on these params; read it with "
                         "`lora_jax.exports.load`")
    return spec, {lora.LoRA.name: adapters, "params": full}


def init_weights(config: dict) -> str:
    """PEFT's `init_lora_weights` of a LoRA config, lower-cased ('true', 'pissa', ...); absent
    (configs of PEFT before the field) it is PEFT's default, True."""
    return str(config.get("init_lora_weights", True)).lower()


def checked_init(directory: pathlib.Path, config: dict) -> str:
    """`init_weights(config)`, where lora_jax reads an adapter started that way: one of
    PLAIN_INITS or REDERIVED_INITS (see README, "Reliability").

    Raises:
      FileFormatError: a start that moved the base weight in a way the base and the file cannot
        reproduce (REFUSED_INITS), or a value lora_jax does not know; the message names
        adapter_config.json, the value and what to do.
    """
    init = init_weights(config)
    if init in PLAIN_INITS or init in REDERIVED_INITS:
        return init
    value = config.get("init_lora_weights")
    why, remedy = next(
        (entry for prefix, entry in REFUSED_INITS.items() if init.startswith(prefix)),
        ("lora_jax does not know whether that start moves the base weight", _CONVERT))
    raise FileFormatError(
        f"{directory / pa.CONFIG_NAME}: init_lora_weights {value!r} trains the adapter against "
        f"a base PEFT moved at its start, which cannot be re-derived here ({why}); {remedy}")


def peft_version(config: dict) -> tuple[int, int] | None:
    """(major, minor) of the PEFT release that wrote `config` (its `peft_version`, written since
    PEFT 0.18; a dev build, '0.22.0.dev0@abc', counts as its release); (0, 17) where the field is
    missing; None where it is not a version."""
    if "peft_version" not in config:
        return (0, 17)
    try:
        release = packaging.version.Version(str(config["peft_version"]).split("@")[0]).release
    except packaging.version.InvalidVersion:
        return None
    return (release + (0,))[:2]


def olora_as_linear(config: dict, transposed_kernels: bool) -> bool | None:
    """Whether PEFT's OLoRA start of an adapter saved with `config` factored W0^T: always for a
    model whose torch modules store W0^T (`transposed_kernels`); for GPT-2's Conv1D, which stores
    the kernel itself, only from PEFT 0.22 (`OLORA_AS_LINEAR_SINCE`). None: `peft_version` is not
    a version, so it cannot be told."""
    if transposed_kernels:
        return True
    version = peft_version(config)
    return None if version is None else version >= OLORA_AS_LINEAR_SINCE


def olora_start(kernel: Any, rank: int, transposed: bool) -> tuple[np.ndarray, np.ndarray]:
    """PEFT's OLoRA start of one kernel (d_in, d_out), as float32 (A0 (r, d_in), B0 (d_out, r)):
    the start moved the kernel by -s (B0 A0)^T, where PEFT subtracts s Q_r R_r from W0^T, the
    paper's factorisation (QR in float32 there, float64 here).

    Args:
      transposed: PEFT factored W0^T (`olora_as_linear`). Otherwise (GPT-2's Conv1D before PEFT
        0.22) it factored the kernel as stored: its Q_r R_r then lies in the kernel's
        orientation, so PEFT's model differs from the base at step 0 and only square kernels fit
        A's shape. The adapter was trained on that function, so it is reproduced.
    """
    stored = np.asarray(kernel, np.float64)
    q, r = np.linalg.qr(stored.T if transposed else stored)
    # Q_r R_r projects the weight on its first r columns' span: the same whatever signs QR picks.
    q, r = q[:, :rank].astype(np.float32), r[:rank].astype(np.float32)
    return (r, q) if transposed else (q.T, r.T)


def _olora_as_lora(directory: pathlib.Path, config: dict, adapters: dict, ranks: dict,
                   alphas: dict, flat: dict, model_type: str,
                   rslora: bool) -> tuple[dict, dict, dict]:
    """(adapters, ranks, alphas) of PEFT's conversion of OLoRA adapters (module path + leaf ->
    tensor) to LoRA on the original base: W_res + s B A = W0 + s' B' A' with A' = [A; A0],
    B' = [B, -B0] (`olora_start`), rank 2r and alpha doubled so that s' = s (rslora: times
    sqrt(2))."""
    transposed = olora_as_linear(config, model_family(model_type).transposed_kernels)
    if transposed is None:
        raise FileFormatError(
            f"{directory / pa.CONFIG_NAME}: peft_version {config['peft_version']!r} is not a "
            "version, and PEFT's OLoRA start on this model's modules depends on it (PEFT 0.22 "
            "changed it): write the PEFT version that saved the adapter there")
    factor = math.sqrt(2.0) if rslora else 2.0
    converted = dict(adapters)
    for module, rank in ranks.items():
        a0, b0 = olora_start(flat[module + ("kernel",)], rank, transposed)
        a, b = module + (lora.LORA_A,), module + (lora.LORA_B,)
        converted[a] = np.concatenate([adapters[a], a0], axis=0)
        converted[b] = np.concatenate([adapters[b], -b0], axis=1)
    return (converted, {m: 2 * r for m, r in ranks.items()},
            {m: factor * x for m, x in alphas.items()})


def read_lora(directory: pathlib.Path, params: dict, model_type: str, task: str | None,
              magnitude: str | None = None,
              convert_olora: bool = True) -> tuple[dict, lora.LoraSpec, dict, dict]:
    """(config, spec, adapters {module: {'lora_a', 'lora_b'}}, leaves trained in full) of a PEFT
    LoRA directory, float32. `magnitude`: the leaf to hold DoRA's magnitudes (`use_dora`
    allowed); None refuses them.

    Its `init_lora_weights` is checked (`checked_init`). An OLoRA adapter, trained against the
    base PEFT moved at its start, comes back as PEFT's conversion of it: a LoRA of rank 2r on
    `params` itself giving the same function (`_olora_as_lora`), unless `convert_olora` is False
    (`methods.olora` reads it as it is in the file and re-derives its base, as `methods.pissa`
    does a PiSSA adapter).
    """
    root = pa.hf_root(model_type, task)
    config, tensors = pa.read_adapter(directory, allowed=("use_dora",) if magnitude else ())
    init = checked_init(directory, config)
    flat = traverse_util.flatten_dict(params)
    found, names, full = pa.sort_tensors(directory, tensors, flat, model_type, root, _KEY)
    pa.check_saved_modules(directory, tensors, flat, model_type)
    adapters, ranks, alphas = _module_adapters(directory, config, found, names, flat, magnitude)
    owners = pa.whole_modules(full, flat)
    spec = _spec(config, ranks, alphas, owners)
    try:
        lora.check_adapters(spec, params, traverse_util.unflatten_dict(adapters))
    except ValueError as error:
        raise ValueError(f"PEFT adapter {directory} does not fit these params: {error}") from None
    if init == "olora" and convert_olora:
        adapters, ranks, alphas = _olora_as_lora(directory, config, adapters, ranks, alphas, flat,
                                                 model_type, spec.rslora)
        spec = _spec(config, ranks, alphas, owners)
    return config, spec, pa.float32_tree(adapters), pa.float32_tree(full)


def _module_adapters(directory: pathlib.Path, config: dict, found: dict, names: dict,
                     flat: dict, magnitude: str | None) -> tuple[dict, dict, dict]:
    """(module path + leaf -> tensor, module -> rank, module -> alpha) of the LoRA tensors
    `pa.sort_tensors` found, in the order of `flat`, each module's tensors checked."""
    adapters, ranks, alphas = {}, {}, {}
    order = {path[:-1]: i for i, path in enumerate(flat)}
    dora = bool(config.get("use_dora"))
    for module, tensors_of in sorted(found.items(), key=lambda item: order[item[0]]):
        ab = {_LEAVES[k]: v for k, v in tensors_of.items()}
        a, b = ab.get("A"), ab.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            shapes = {k: v.shape for k, v in ab.items()}
            raise ValueError(f"{directory / pa.WEIGHTS_NAME}: {names[module]} needs lora_A "
                             f"(r, d_in) and lora_B (d_out, r), but has {shapes}")
        adapters[module + (lora.LORA_A,)], adapters[module + (lora.LORA_B,)] = a, b
        if dora != ("M" in ab) or (dora and ab["M"].shape != (b.shape[0],)):
            got = ab["M"].shape if "M" in ab else "none"
            raise FileFormatError(
                f"{directory / pa.WEIGHTS_NAME}: {names[module]} has magnitude {got}, but the "
                f"config has use_dora={dora} (DoRA needs one of ({b.shape[0]},) per module)")
        if dora:
            adapters[module + (magnitude,)] = ab["M"]
        ranks[module] = a.shape[0]
        alphas[module] = _pattern_value(config.get("alpha_pattern") or {}, names[module],
                                        config["lora_alpha"])
    return adapters, ranks, alphas


def _spec(config: dict, ranks: dict, alphas: dict, owners: list) -> lora.LoraSpec:
    """The LoraSpec of per-module ranks and alphas: each module an exact target, the most
    common rank and alpha the defaults; `owners` (modules to save) trained in full."""
    rank = pa.most_common(ranks, config["r"])
    alpha = pa.most_common(alphas, config["lora_alpha"])
    kernel = {m: pa.exact_pattern(m + ("kernel",), "$") for m in ranks}
    return lora.LoraSpec(
        targets=tuple(kernel.values()),
        rank=rank,
        alpha=float(alpha),
        dropout=float(config.get("lora_dropout") or 0.0),
        rslora=bool(config.get("use_rslora")),
        rank_pattern={kernel[m]: k for m, k in ranks.items() if k != rank},
        alpha_pattern={kernel[m]: float(x) for m, x in alphas.items() if x != alpha},
        also_train=tuple(pa.exact_pattern(m, "/") for m in owners),
    )


class LoraPeft(PeftCodec):
    """LoRA (and LoRA+) as a PEFT LoRA adapter, biases frozen; DoRA and PiSSA refine it."""

    peft_types = ("LORA",)
    fallback = True  # a LoRA config another codec claims (OLoRA's start) is that codec's

    def claims(self, config: dict) -> bool:
        return not config.get("use_dora") and not init_weights(config).startswith("pissa")

    def writes(self, method: Method, trainable: Params) -> bool:
        return method.bias == "none"

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, **info: Any) -> pathlib.Path:
        return write_lora(directory, method.spec, trainable[method.name],
                          trainable.get("params", {}), **info)

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        _, spec, adapters, full = read_lora(directory, params, family.model_type, task)
        method = lora.LoRA(spec)
        return method, {"params": full, method.name: adapters}


PEFT = LoraPeft()
