"""LoRA-FA (Zhang et al. 2023/2025, "LoRA-FA: Efficient and Effective Low Rank Representation
Fine-tuning"): LoRA whose projection-down A is frozen at its random start; only B is trained.

Freezing A keeps the layer's input out of the backward pass (B's gradient needs only A x), and A
needs no gradient and no optimizer state. The paper's second part, which PEFT's
`create_lorafa_optimizer` implements, corrects B's gradient towards the full-weight one:

    g_B <- g_B (A A^T + delta I)^+ / s^2        (delta = 1e-8, s the LoRA scale),

after which AdamW steps on B as usual. `gradient_correction=False` is the plain frozen-A variant
of the paper's first version.

Here A is a fixed array of the method, not a trained leaf: drawn as LoRA draws it (kaiming-
uniform, or `init`) from `a_seed`, held in the frozen tree (`buffers`), so a resumed run and the
export re-derive it, and the trainable tree holds B alone (its count is what LoRA-FA trains).
The correction is applied where A is at hand, in the backward pass of the adapted layers (B
passes through an identity whose gradient is the corrected one), so the run's optimizer is
unchanged. PEFT applies it inside its optimizer, after the trainer's gradient clipping; here the
run's clipping (if any) sees the corrected gradient.

Saved as a plain PEFT LoRA (A and the trained B), which is what it is on the original base.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods import lora, lora_peft
from lora_jax.methods.base import Method, Params, modules_of

FROZEN_A = "a"  # the buffers' key of the frozen A tree
DELTA = 1e-8  # PEFT's damping of A A^T before its pseudo-inverse


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def corrected(b: jax.Array, a: jax.Array, scale: float) -> jax.Array:
    """B itself; its gradient is the paper's corrected one, g (A A^T + delta I)^+ / s^2. For split
    outputs a is (n, r, d_in) and b (n, d_part, r)."""
    return b


def _corrected_fwd(b, a, scale):
    return b, a


def _corrected_bwd(scale, a, g):
    gram = a @ jnp.swapaxes(a, -1, -2)
    inverse = jnp.linalg.pinv(gram + DELTA * jnp.eye(a.shape[-2], dtype=a.dtype))
    return (g @ inverse) / scale**2, jnp.zeros_like(a)


corrected.defvjp(_corrected_fwd, _corrected_bwd)


@dataclasses.dataclass(frozen=True)
class LoraFA(lora.LoRA):
    """LoRA with A frozen at its start and, by default, B's gradient corrected (see the module
    docstring)."""

    name = "lora_fa"
    low_rank_leaves = (lora.LORA_B,)

    a_seed: int = 0
    gradient_correction: bool = True

    def _start(self, params: Params) -> dict:
        return lora.init(self.spec, params, jax.random.key(self.a_seed))

    def init(self, params: Params, key: jax.Array) -> dict:
        """B = 0 for every target (A is a buffer, drawn from `a_seed`: `key` is unused)."""
        flat = traverse_util.flatten_dict(self._start(params))
        return traverse_util.unflatten_dict({k: v for k, v in flat.items()
                                             if k[-1] == lora.LORA_B})

    def buffers(self, params: Params) -> dict:
        flat = traverse_util.flatten_dict(self._start(params))
        return {FROZEN_A: traverse_util.unflatten_dict(
            {k: v for k, v in flat.items() if k[-1] == lora.LORA_A})}

    def adapters(self, added: Params, buffers: Params, correct: bool = False) -> dict:
        """{module: {'lora_a', 'lora_b'}}: the frozen A beside the trained B (passed through
        `corrected` in training, where `correct`)."""
        frozen_a = modules_of(buffers[FROZEN_A])
        out = {}
        for module, own in modules_of(added).items():
            a, b = frozen_a[module][lora.LORA_A], own[lora.LORA_B]
            if correct and self.gradient_correction:
                path = "/".join(module + ("kernel",))
                b = corrected(b, a, self.spec.scale(path, a.shape[-2]))
            out[module + (lora.LORA_A,)] = a
            out[module + (lora.LORA_B,)] = b
        return traverse_util.unflatten_dict(out)

    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        # A is a buffer: no gradient reaches it whatever the correction.
        return super().intercept(self.adapters(added, buffers, correct=True), rng,
                                 {k: v for k, v in buffers.items() if k != FROZEN_A})

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        return super().merge(params, self.adapters(added, buffers), buffers)

    def describe(self) -> str:
        fix = "" if self.gradient_correction else ", uncorrected"
        return f"lora_fa(r={self.spec.rank}{fix})"


class LoraFaPeft(lora_peft.LoraPeft):
    """Saved as the plain LoRA it is (the frozen A beside the trained B). No PEFT file says it
    was trained as LoRA-FA, so none is read as it: PEFT's LoRA-FA adapters load as LoRA."""

    needs_frozen = True  # A is in the frozen tree
    fallback = False

    def claims(self, config: dict) -> bool:
        return False

    def save(self, directory, method: Method, trainable: Params, frozen: Params | None,
             **info: Any):
        adapters = method.adapters(jax.device_get(trainable[method.name]),
                                   jax.device_get(frozen[method.name]))
        return lora_peft.write_lora(directory, method.spec, adapters,
                                    trainable.get("params", {}), **info)


PEFT = LoraFaPeft()
REGISTRATION = lora.variant_registration(
    LoraFA, {"a_seed": (0, rules.integer(0)), "gradient_correction": (True, rules.boolean)},
    peft=lambda: PEFT)
