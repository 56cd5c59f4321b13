"""AdaLoRA (Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning"):
the rank of each adapter is chosen during training, under a global budget.

Each adapted kernel gets its update in SVD form,

    y = W0 x + b + alpha / (r0 + 1e-5) * B diag(E) A x,    A (r0, d_in), E (r0,), B (d_out, r0)

with A, B ~ N(0, 0.02^2) and E = 0 (the model equals the base at step 0), r0 = `init_rank`.
Training adds an orthogonality penalty on A and B, and after every optimizer step a rank
allocator (an optax wrapper: `Method.optimizer`) scores each triplet (E_i, A_i, B_:i) by its
smoothed sensitivity |w * dL/dw| times its uncertainty, and zeroes the E_i of the lowest-scoring
triplets so that the number kept follows a cubic schedule from r0 per module down to
`target_rank` per module on average:

    steps t <= tinit           all kept, scores accumulate
    tinit < t < T - tfinal     budget b(t) = (b0 - bT) (1 - (t - tinit) / (T - tfinal - tinit))^3
                               + bT, masked every `delta_t` steps
    t = T - tfinal             the final mask, at budget bT; kept fixed and applied every step after

The steps count from 0 (the first step is t = 0), as in PEFT's examples. Where the paper and its
code (QingruZhang/AdaLoRA, which PEFT follows) differ:
  - the orthogonality penalty: Eq. (4) of the paper sums ||P^T P - I||_F^2 + ||Q Q^T - I||_F^2
    over the modules; the code averages the unsquared norms over all A and B matrices.
    `orth_form='paper'` (default) is the paper's, 'code' the code's and PEFT's;
  - the scale alpha / (r0 + 1e-5): the code's; the paper writes none (alpha absorbs it).
The penalty's weight defaults to 0.1, the official GLUE scripts' `--reg_orth_coef` (PEFT's
default is 0.5). The paper's form sums over the modules, so it starts near weight x 2 r0 x
modules (A and B start near zero) and weighs more than the code's mean for the same weight; the
training loss the trainer logs includes it.
PEFT's semantics are followed otherwise: the importance is taken at the updated weights with the
step's gradient, masked E_i are not re-masked between allocations (they may regrow), a removed
triplet keeps its A and B values, and the scale keeps dividing by r0 whatever rank is kept.

Fused projections are adapted whole (no split outputs), as PEFT does. Trainable tree:
{'adalora': {module: {'lora_a', 'lora_e', 'lora_b'}}}; merging folds in the kept triplets.
Saved in PEFT's AdaLoRA format with the kept triplets only and their `rank_pattern`
(`adalora_peft`, beside this file).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods import lora
from lora_jax.methods.base import (ADDS, Method, Params, Path, PeftCodec, Registration,
                                   SettingError, fold_into_kernels, intercept_dense, modules_of)

LORA_A, LORA_E, LORA_B = "lora_a", "lora_e", "lora_b"
ORTH_FORMS = ("paper", "code")


@dataclasses.dataclass(frozen=True)
class AdaLoRA(Method):
    """SVD-form adapters with budgeted rank allocation (see the module docstring).

    Attributes:
      targets: patterns of the Dense kernels adapted.
      init_rank: r0, every module's rank at the start.
      target_rank: the average rank per module at the end (the budget bT / modules).
      alpha: the scale's numerator (PEFT's lora_alpha).
      dropout: dropout on the adapter's input.
      tinit, tfinal, delta_t: the schedule's warm-up steps, final steps and masking interval.
      beta1, beta2: smoothing of the sensitivity and of its uncertainty.
      orth_reg_weight: the orthogonality penalty's weight; orth_form: 'paper' or 'code'.
      total_step: T (0: the run's total steps).
    """

    name = "adalora"
    mergeable = True
    low_rank_leaves = (LORA_A, LORA_B)  # E, the singular values, is counted with the rest

    targets: tuple[str, ...]
    init_rank: int = 12
    target_rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.1
    orth_form: str = "paper"
    total_step: int = 0

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.orth_form not in ORTH_FORMS:
            raise ValueError(f"AdaLoRA orth_form must be one of {ORTH_FORMS}, got "
                             f"{self.orth_form!r}")
        if self.target_rank > self.init_rank:
            raise ValueError(f"AdaLoRA target_rank {self.target_rank} exceeds init_rank "
                             f"{self.init_rank}")

    @property
    def scale(self) -> float:
        return self.alpha / (self.init_rank + 1e-5)

    def init(self, params: Params, key: jax.Array) -> dict:
        flat = traverse_util.flatten_dict(params)
        paths = lora.matching_kernels(self.targets, params, "AdaLoRA")
        added = {}
        for path, k in zip(paths, jax.random.split(key, len(paths))):
            d_in, d_out = flat[tuple(path.split("/"))].shape
            if self.init_rank > min(d_in, d_out):
                raise SettingError("init_rank", f"AdaLoRA init_rank {self.init_rank} exceeds "
                                   f"min(d_in, d_out) = {min(d_in, d_out)} of {path}")
            ka, kb = jax.random.split(k)
            module = tuple(path.split("/")[:-1])
            added[module + (LORA_A,)] = 0.02 * jax.random.normal(ka, (self.init_rank, d_in))
            added[module + (LORA_E,)] = jnp.zeros((self.init_rank,), jnp.float32)
            added[module + (LORA_B,)] = 0.02 * jax.random.normal(kb, (d_out, self.init_rank))
        return traverse_util.unflatten_dict(added)

    def intercept(self, added: Params, rng: jax.Array | None, buffers: Params | None = None):
        def output(module, own, x, y, dropped):
            a, e, b = (own[k].astype(y.dtype) for k in (LORA_A, LORA_E, LORA_B))
            return y + self.scale * (((x.astype(y.dtype) @ a.T) * e) @ b.T)

        return intercept_dense(modules_of(added), rng, self.dropout, output, "AdaLoRA")

    def merge(self, params: Params, added: Params, buffers: Params | None = None) -> dict:
        return fold_into_kernels(
            params, added,
            lambda module, own, w: self.scale * ((own[LORA_B] * own[LORA_E]) @ own[LORA_A]).T)

    def regularizer(self, added: Params) -> jax.Array | float:
        """orth_reg_weight times the orthogonality penalty on every A and B (`orth_form`)."""
        terms = []
        for own in modules_of(added).values():
            for gram in (own[LORA_A] @ own[LORA_A].T, own[LORA_B].T @ own[LORA_B]):
                excess = gram - jnp.eye(gram.shape[0], dtype=gram.dtype)
                terms.append(jnp.sum(excess ** 2) if self.orth_form == "paper"
                             else jnp.linalg.norm(excess))
        if not terms or self.orth_reg_weight == 0:
            return 0.0
        total = sum(terms)
        return self.orth_reg_weight * (total if self.orth_form == "paper" else total / len(terms))

    def optimizer(self, tx: Any, total_steps: int) -> Any:
        return rank_allocation(self, tx, self.total_step or total_steps)

    def schedule(self, total_step: int, modules: int) -> tuple[np.ndarray, np.ndarray]:
        """(budget, whether a new mask is computed) at steps 0..T, as PEFT's `budget_schedule`
        computes them (in float64 on the host, then looked up in the step)."""
        init_bgt, target_bgt = self.init_rank * modules, self.target_rank * modules
        budgets, recompute = [], []
        for t in range(total_step + 1):
            if t <= self.tinit:
                budget, mask = init_bgt, False
            elif t > total_step - self.tfinal:
                budget, mask = target_bgt, False  # the final mask, fixed
            else:
                coeff = 1 - (t - self.tinit) / (total_step - self.tfinal - self.tinit)
                budget = int((init_bgt - target_bgt) * coeff ** 3 + target_bgt)
                mask = t % self.delta_t == 0 or t == total_step - self.tfinal
            budgets.append(budget)
            recompute.append(mask)
        return np.asarray(budgets, np.int32), np.asarray(recompute)

    def describe(self) -> str:
        return f"adalora(r={self.init_rank}->{self.target_rank})"


class AllocatorState(NamedTuple):
    inner: Any
    importance: Any  # smoothed |w * g|, like the method's tree
    uncertainty: Any  # smoothed |importance now - smoothed importance|
    mask: Any  # module -> (r0,) 1.0 kept / 0.0 removed: the latest allocation
    count: jax.Array  # steps done


def rank_allocation(method: AdaLoRA, tx: optax.GradientTransformation,
                    total_step: int) -> optax.GradientTransformation:
    """`tx` followed by AdaLoRA's rank allocation on `trainable[method.name]` (module docstring).

    Raises:
      SettingError: a schedule with no room (tinit >= T - tfinal), as PEFT refuses.
    """
    if method.tinit >= total_step - method.tfinal:
        raise SettingError("tinit", f"AdaLoRA needs tinit < total_step - tfinal, got tinit="
                           f"{method.tinit}, tfinal={method.tfinal}, total_step={total_step} "
                           "(the run's steps where its total_step is 0)", method.name)
    name, final = method.name, total_step - method.tfinal
    # (budgets, recompute) per step, built once on the host, not in every trace of the step.
    schedule = functools.lru_cache(maxsize=None)(method.schedule)

    def init_fn(params):
        own = params[name]
        zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, own)  # noqa: E731 (two buffers)
        mask = {m: jnp.ones_like(leaves[LORA_E]) for m, leaves in modules_of(own).items()}
        return AllocatorState(tx.init(params), zeros(), zeros(), mask, jnp.zeros((), jnp.int32))

    def update_fn(grads, state, params):
        updates, inner = tx.update(grads, state.inner, params)
        own, new = params[name], optax.apply_updates(params[name], updates[name])
        t = state.count
        budgets, recompute_at = schedule(total_step, len(state.mask))
        index = jnp.minimum(t, total_step)  # the schedule holds its last entry past T
        budget, recompute = jnp.asarray(budgets)[index], jnp.asarray(recompute_at)[index]

        # Sensitivity at the updated weights with this step's gradient, until the final phase.
        scoring = t < final
        now = jax.tree_util.tree_map(lambda w, g: jnp.abs(w * g), new, grads[name])
        importance = jax.tree_util.tree_map(
            lambda avg, x: jnp.where(scoring, method.beta1 * avg + (1 - method.beta1) * x, avg),
            state.importance, now)
        uncertainty = jax.tree_util.tree_map(
            lambda avg, x, i: jnp.where(scoring,
                                        method.beta2 * avg + (1 - method.beta2) * jnp.abs(x - i),
                                        avg),
            state.uncertainty, now, importance)

        # A triplet's score: E_i's, plus the means over A's row i and over B's column i.
        element = jax.tree_util.tree_map(lambda i, u: i * u, importance, uncertainty)
        modules = modules_of(element)
        scores = {m: s[LORA_E] + s[LORA_A].mean(axis=1) + s[LORA_B].mean(axis=0)
                  for m, s in modules.items()}
        ordered = jnp.sort(jnp.concatenate([scores[m] for m in state.mask]))
        removed = len(ordered) - budget  # kthvalue's k
        threshold = jnp.where(removed > 0, ordered[jnp.maximum(removed - 1, 0)], -jnp.inf)
        mask = {m: jnp.where(recompute, (scores[m] > threshold).astype(state.mask[m].dtype),
                             state.mask[m]) for m in state.mask}
        masking = recompute | (t > final)

        new_flat = traverse_util.flatten_dict(new)
        for m in mask:
            e = new_flat[m + (LORA_E,)]
            new_flat[m + (LORA_E,)] = jnp.where(masking, e * mask[m], e)
        new = traverse_util.unflatten_dict(new_flat)
        # (PEFT then resets its scores; they are not used again, so they are simply kept.)
        updates = {**updates, name: jax.tree_util.tree_map(lambda n, o: n - o, new, own)}
        return updates, AllocatorState(inner, importance, uncertainty, mask, t + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def kept(added: Params) -> dict[Path, np.ndarray]:
    """Module -> which triplets are kept (E_i != 0), as PEFT's rank_pattern."""
    return {m: np.asarray(own[LORA_E]) != 0 for m, own in modules_of(added).items()}


def _defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.targets = (r"/query/kernel", r"/value/kernel")
    c.init_rank = 12
    c.target_rank = 8
    c.alpha = 8.0
    c.dropout = 0.0
    c.tinit = 0
    c.tfinal = 0
    c.delta_t = 1
    c.beta1 = 0.85
    c.beta2 = 0.85
    c.orth_reg_weight = 0.1
    c.orth_form = "paper"
    c.total_step = 0
    return c


def _related(c: Any) -> list[str]:
    if c.target_rank > c.init_rank:
        return [f"target_rank = {c.target_rank}: must be <= init_rank ({c.init_rank}), the rank "
                "every module starts from"]
    return []


def peft_codec() -> PeftCodec:
    """AdaLoRA's PEFT mapping (`adalora_peft`, beside this file, which builds on it)."""
    from lora_jax.methods import adalora_peft  # deferred: adalora_peft imports this module

    return adalora_peft.PEFT


REGISTRATION = Registration(
    _defaults,
    {"targets": rules.regexes, "init_rank": rules.integer(1), "target_rank": rules.integer(1),
     "alpha": rules.number(0, low_open=True), "dropout": rules.number(0, 1, high_open=True),
     "tinit": rules.integer(0), "tfinal": rules.integer(0), "delta_t": rules.integer(1),
     "beta1": rules.number(0, 1, low_open=True, high_open=True),
     "beta2": rules.number(0, 1, low_open=True, high_open=True),
     "orth_reg_weight": rules.number(0), "orth_form": rules.one_of(*ORTH_FORMS),
     "total_step": rules.integer(0)},
    lambda c, family: AdaLoRA(tuple(c.targets), init_rank=c.init_rank,
                              target_rank=c.target_rank, alpha=c.alpha, dropout=c.dropout,
                              tinit=c.tinit, tfinal=c.tfinal, delta_t=c.delta_t, beta1=c.beta1,
                              beta2=c.beta2, orth_reg_weight=c.orth_reg_weight,
                              orth_form=c.orth_form, total_step=c.total_step),
    peft=peft_codec, kernels=ADDS, related=_related)
