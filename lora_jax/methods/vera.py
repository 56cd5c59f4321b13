"""VeRA (Kopiczko et al. 2024, "Vector-based Random Matrix Adaptation"): one pair of frozen random
matrices shared by every adapted layer; each layer trains two scaling vectors only.

    y = W0 x + b + Lambda_b B Lambda_d A x,      Lambda_b = diag(b) in R^{d_out},
                                                 Lambda_d = diag(d) in R^{r}

A (r, d_in_max) and B (d_out_max, r) are drawn once, kaiming-uniform, and a layer uses their
top-left block A[:, :d_in], B[:d_out, :] (PEFT's slicing for layers of different shapes). b starts
at 0 (the model equals the base at step 0) and d at `d_initial`. There is no alpha: the scale
is in the vectors. Trained per layer: r + d_out scalars (the paper's |Theta| = L (d_model + r)
for square layers).

The shared matrices are never trained and never saved per layer: they are derived from
`projection_seed` (with JAX's generator) and held in the frozen tree as the method's buffers, so
a checkpoint holds the vectors alone. PEFT draws them with torch's generator, which JAX cannot
replay, so a PEFT export stores them once (`save_projection=True`, PEFT's default), and a PEFT
adapter read back brings its own (`projections`).

Fused projections are adapted whole (PEFT has no split outputs for VeRA): on GPT-2 target
`attn/c_attn` for q, k and v together.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.errors import FileFormatError
from lora_jax.interop import hub
from lora_jax.interop import peft_adapters as pa
from lora_jax.methods import lora
from lora_jax.methods.base import (ADDS, Method, Params, PeftCodec, Registration,
                                   fold_into_kernels, intercept_dense, modules_of)

LAMBDA_B, LAMBDA_D = "lambda_b", "lambda_d"
SHARED_A, SHARED_B = "vera_a", "vera_b"


@dataclasses.dataclass(frozen=True)
class VeRA(Method):
    """Shared frozen random projections, trained per-layer scaling vectors (see the module
    docstring).

    Attributes:
      targets: patterns of the Dense kernels adapted (as LoRA's).
      rank: r, the shared projections' inner size (the paper uses 256-1024).
      d_initial: the initial value of every d (PEFT's default 0.1).
      dropout: dropout on the adapter's input.
      projection_seed: seeds the shared A and B.
      projections: explicit (A, B) in place of the seeded ones (a PEFT adapter's).
    """

    name = "vera"
    mergeable = True

    targets: tuple[str, ...]
    rank: int = 256
    d_initial: float = 0.1
    dropout: float = 0.0
    projection_seed: int = 0
    projections: tuple[Any, Any] | None = dataclasses.field(default=None, compare=False,
                                                            repr=False)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))

    def kernels(self, params: Params) -> list[str]:
        return lora.matching_kernels(self.targets, params, "VeRA")

    def init(self, params: Params, key: jax.Array) -> dict:
        flat = traverse_util.flatten_dict(params)
        vectors = {}
        for path in self.kernels(params):
            _, d_out = flat[tuple(path.split("/"))].shape
            module = tuple(path.split("/")[:-1])
            vectors[module + (LAMBDA_B,)] = jnp.zeros((d_out,), jnp.float32)
            vectors[module + (LAMBDA_D,)] = jnp.full((self.rank,), self.d_initial, jnp.float32)
        return traverse_util.unflatten_dict(vectors)

    def buffers(self, params: Params) -> dict:
        """The shared A (r, largest d_in) and B (largest d_out, r): the given projections, or
        kaiming-uniform draws from the seed (bound 1 / sqrt(fan_in), fan_in = the second axis, as
        torch's kaiming_uniform_(a=sqrt 5))."""
        flat = traverse_util.flatten_dict(params)
        shapes = {path: flat[tuple(path.split("/"))].shape for path in self.kernels(params)}
        if self.projections is not None:
            a, b = (jnp.asarray(np.asarray(m), jnp.float32) for m in self.projections)
        else:
            a_shape = (self.rank, max(d_in for d_in, _ in shapes.values()))
            b_shape = (max(d_out for _, d_out in shapes.values()), self.rank)
            key_a, key_b = jax.random.split(jax.random.key(self.projection_seed))
            a = jax.random.uniform(key_a, a_shape, jnp.float32, -1, 1) / math.sqrt(a_shape[1])
            b = jax.random.uniform(key_b, b_shape, jnp.float32, -1, 1) / math.sqrt(b_shape[1])
        for path, (d_in, d_out) in shapes.items():
            if d_in > a.shape[1] or d_out > b.shape[0] or self.rank > min(a.shape[0], b.shape[1]):
                raise ValueError(f"VeRA projections A {a.shape}, B {b.shape} are too small for "
                                 f"{path} ({d_in} x {d_out}) at rank {self.rank}")
        return {SHARED_A: a, SHARED_B: b}

    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        def output(module, own, x, y, dropped):
            x = x.astype(y.dtype)
            a, b = self._slices(buffers, x.shape[-1], own[LAMBDA_B].shape[0])
            h = (x @ a.T.astype(y.dtype)) * own[LAMBDA_D].astype(y.dtype)
            return y + (h @ b.T.astype(y.dtype)) * own[LAMBDA_B].astype(y.dtype)

        return intercept_dense(modules_of(added), rng, self.dropout, output, "VeRA")

    def _slices(self, buffers: Params, d_in: int, d_out: int) -> tuple[jax.Array, jax.Array]:
        return buffers[SHARED_A][:self.rank, :d_in], buffers[SHARED_B][:d_out, :self.rank]

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        def delta(module, own, w):
            a, b = self._slices(buffers, w.shape[0], w.shape[1])
            return ((own[LAMBDA_B][:, None] * b) @ (own[LAMBDA_D][:, None] * a)).T

        return fold_into_kernels(params, added, delta)

    def describe(self) -> str:
        return f"vera(r={self.rank})"


def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.targets = (r"/query/kernel", r"/value/kernel")
    c.rank = 256
    c.d_initial = 0.1
    c.dropout = 0.0
    c.projection_seed = 0
    return c


# --- In PEFT's format ----------------------------------------------------------------------------
# PEFT's VeRA state dict, adapter name removed as `save_pretrained` writes it:
#
#     base_model.vera_A                                           (r, d_in_max)   shared
#     base_model.vera_B                                           (d_out_max, r)  shared
#     base_model.model.transformer.h.0.attn.c_attn.vera_lambda_b  (d_out,)
#     base_model.model.transformer.h.0.attn.c_attn.vera_lambda_d  (r,)
#     base_model.model.classifier.out_proj.weight                 a `modules_to_save` tensor

PEFT_SHARED = {SHARED_A: "base_model.vera_A", SHARED_B: "base_model.vera_B"}
PEFT_VECTORS = {LAMBDA_B: "vera_lambda_b", LAMBDA_D: "vera_lambda_d"}


class VeraPeft(PeftCodec):
    """VeRA as a PEFT VeRA adapter, its shared projections stored (`save_projection`)."""

    peft_types = ("VERA",)
    needs_frozen = True  # the shared projections are the method's buffers

    def save(self, directory: pathlib.Path, method: Method, trainable: Params,
             frozen: Params | None, *, model_type: str, task: str | None,
             base_model_name_or_path: str | None = None) -> pathlib.Path:
        """Writes `trainable` ({'vera': per-module vectors, 'params': leaves trained in full})
        with the shared A and B of the frozen tree."""
        buffers = frozen[method.name]
        root = pa.hf_root(model_type, task)
        tensors = {key: np.asarray(jax.device_get(buffers[name]), np.float32)[
            (slice(0, method.rank), slice(None)) if name == SHARED_A else
            (slice(None), slice(0, method.rank))] for name, key in PEFT_SHARED.items()}
        targets = []
        for module, own in modules_of(trainable[method.name]).items():
            name = root + hub.hf_module_name("/".join(module))
            targets.append(name)
            for leaf, key in PEFT_VECTORS.items():
                tensors[f"{pa.PREFIX}{name}.{key}"] = np.asarray(jax.device_get(own[leaf]),
                                                             np.float32)
        saved, full = pa.modules_to_save(trainable.get("params", {}), model_type, task)
        tensors.update(full)
        config = {
            **pa.config_fields("VERA", model_type, task, base_model_name_or_path, saved),
            "r": method.rank,
            "target_modules": sorted(targets), "projection_prng_key": method.projection_seed,
            "save_projection": True, "vera_dropout": method.dropout, "d_initial": method.d_initial,
            "init_weights": True,
        }
        return pa.write_adapter_dir(pathlib.Path(directory), config, tensors,
                                    metadata={"format": "pt"})

    def load(self, directory: pathlib.Path, params: Params, family: Any,
             task: str | None) -> tuple[Method, dict]:
        """(VeRA with the file's projections, trainable tree) for `params`.

        Raises:
          FileFormatError: no stored projections, or a tensor of the wrong shape (named).
          ValueError: a module `params` lacks, or an unsupported PEFT feature.
        """
        model_type = family.model_type
        config, tensors = pa.read_adapter(directory, peft_types=("VERA",))
        if not config.get("save_projection", True) or PEFT_SHARED[SHARED_A] not in tensors:
            raise FileFormatError(
                f"{directory}: the VeRA projections are not stored (save_projection=false); PEFT "
                "re-draws them with torch's generator, which lora_jax cannot replay. Save the "
                "adapter from PEFT with save_projection=True")
        rank = config["r"]
        shared = {name: tensors.pop(key) for name, key in PEFT_SHARED.items()}
        vectors, full = pa.module_tensors(directory, tensors, params, model_type, task,
                                          {v: k for k, v in PEFT_VECTORS.items()})
        flat = traverse_util.flatten_dict(params)
        for path, value in vectors.items():
            d_out = flat[path[:-1] + ("kernel",)].shape[1]
            want = (d_out,) if path[-1] == LAMBDA_B else (rank,)
            if value.shape != want:
                raise FileFormatError(f"{directory / pa.WEIGHTS_NAME}: {'/'.join(path)} is "
                                      f"{value.shape}, expected {want}")
        modules = sorted({p[:-1] for p in vectors})
        method = VeRA(tuple(pa.exact_pattern(m + ("kernel",), "$") for m in modules),
                      rank=rank, d_initial=float(config.get("d_initial", 0.1)),
                      dropout=float(config.get("vera_dropout") or 0.0),
                      projection_seed=int(config.get("projection_prng_key", 0)),
                      projections=(shared[SHARED_A], shared[SHARED_B]))
        method.buffers(params)  # checks the projections fit every module
        trainable = {"params": pa.float32_tree(full), method.name: traverse_util.unflatten_dict(
            {p: jnp.asarray(v, jnp.float32) for p, v in vectors.items()})}
        return method, trainable


PEFT = VeraPeft()
REGISTRATION = Registration(
    _defaults,
    {"targets": rules.regexes, "rank": rules.integer(1), "d_initial": rules.number(-math.inf),
     "dropout": rules.number(0, 1, high_open=True), "projection_seed": rules.integer(0)},
    lambda c, family: VeRA(tuple(c.targets), rank=c.rank, d_initial=c.d_initial,
                           dropout=c.dropout, projection_seed=c.projection_seed),
    peft=lambda: PEFT, kernels=ADDS)
