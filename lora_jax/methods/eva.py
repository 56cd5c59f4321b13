"""EVA (Paischer et al. 2024, "One Initialization to Rule them All: Fine-tuning via Explained
Variance Adaptation"): LoRA whose A starts as the principal directions of each target's inputs
on the run's first batches, with the ranks redistributed across the targets by how much of the
inputs' variance each direction explains.

For each adapted kernel, an incremental PCA (Ross et al. 2008, as scikit-learn's
`IncrementalPCA`: the inputs centred, one SVD step per batch) over its input rows, the real
tokens of each batch (with `use_label_mask`, the tokens the loss is on, where the batch marks
them), keeps k = round(r rho) components. After each batch the ranks are redistributed: the
explained-variance ratios of all targets' k components are ranked together and the top sum(r)
give each target its rank (some get up to r rho, some none, and a target with none gets no
adapter). A target stops fitting once its components that the current ranks need have converged
(cosine similarity of each with its previous value >= tau), and resumes if a redistribution
asks for more of them; the batches are cycled until every target has converged. Then

    A0 = the rank's top components (divided by sqrt of their singular values with `whiten`),
    B0 = 0,

so the model starts as the base, which stays as it is (EVA adds, as LoRA; over a quantized base
too). With `adjust_scaling_factors` a target's alpha is multiplied by new rank / r, keeping the
scale alpha / r of every target as configured. Targets that read the same input (q, k and v)
share one PCA, as in the reference.

This follows PEFT's `initialize_lora_eva_weights` step for step, with two documented
differences: (1) PEFT's IncrementalPCA takes torch's randomised `svd_lowrank` (q = 2k, 4
iterations, seed 42); we take the exact SVD in float64, which that approximates (the tests
compare with PEFT's algorithm run with the exact SVD); (2) where explained-variance ratios tie
(targets sharing an input), PEFT's order is torch's unstable argsort; ours is the targets' order
in the params tree, so a shared input's first target gets at least the others' rank, which PEFT then
enforces by a swap. PEFT cycles the batches without bound; we cycle them at most MAX_PASSES
times and say which targets did not converge.

The start lives in the calibrated method: its spec names every adapted kernel with its rank and
alpha (`rank_pattern`, `alpha_pattern`), and `components` holds A0, which the trainer keeps in
the workdir (`lora_jax.training.calibration`). Saved as a plain PEFT LoRA with those patterns,
which PEFT's own EVA adapters are on the original base.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from itertools import cycle
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lora_jax import config_rules as rules
from lora_jax.methods import calibration, lora
from lora_jax.methods.base import Params, SettingError

MAX_PASSES = 20  # passes over the calibration batches before an unconverged target is an error


class Pca(NamedTuple):
    """One input's incremental PCA (scikit-learn's `IncrementalPCA` state), float64."""

    n_components: int
    count: int = 0
    mean: np.ndarray | None = None
    sum_squares: np.ndarray | None = None  # per feature, about the mean
    components: np.ndarray | None = None  # (k, d), unit rows
    singular_values: np.ndarray | None = None
    explained_variance_ratio: np.ndarray | None = None


def pca_step(pca: Pca, rows: np.ndarray) -> Pca:
    """`pca` after one batch of input rows (n, d): one SVD of the kept components (scaled by
    their singular values), the batch centred on its mean, and the mean correction; signs fixed
    so each component's largest entry is positive (scikit-learn's `svd_flip` on V)."""
    x = np.asarray(rows, np.float64)
    n = x.shape[0]
    total = pca.count + n
    batch_mean = x.mean(axis=0)
    batch_squares = np.square(x - batch_mean).sum(axis=0)
    if pca.count == 0:
        mean, sum_squares, stacked = batch_mean, batch_squares, x - batch_mean
    else:
        delta = batch_mean - pca.mean
        mean = pca.mean + delta * n / total
        sum_squares = pca.sum_squares + batch_squares + np.square(delta) * pca.count * n / total
        correction = np.sqrt(pca.count * n / total) * (pca.mean - batch_mean)
        stacked = np.vstack([pca.singular_values[:, None] * pca.components, x - batch_mean,
                             correction[None]])
    _, s, vt = np.linalg.svd(stacked, full_matrices=False)
    largest = np.argmax(np.abs(vt), axis=1)
    vt = vt * np.sign(vt[np.arange(vt.shape[0]), largest])[:, None]
    k = pca.n_components
    return Pca(k, total, mean, sum_squares, vt[:k], s[:k],
               (np.square(s) / sum_squares.sum())[:k])


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-8)
    return np.sum(a * b, axis=1) / norms


def redistributed_ranks(ratios: Mapping[str, np.ndarray], budget: int) -> dict[str, int]:
    """Each target's rank: how many of the `budget` largest explained-variance ratios, ranked
    over all targets together (ties in the targets' order), are its own. `ratios`: target ->
    its components' ratios, in the targets' order."""
    values = [(value, index, path) for index, (path, row) in enumerate(ratios.items())
              for value in row]
    chosen = sorted(values, key=lambda v: (-v[0], v[1]))[:budget]
    ranks = dict.fromkeys(ratios, 0)
    for _, _, path in chosen:
        ranks[path] += 1
    return ranks


@dataclasses.dataclass(frozen=True)
class EVA(lora.LoRA):
    """LoRA started from its targets' input principal directions, ranks redistributed (see the
    module docstring).

    Attributes:
      rho: a target's rank may grow to round(r rho) (>= 1; 1: no redistribution).
      tau: cosine similarity of successive components at which a target has converged.
      whiten: divide A0's rows by the square root of their singular values.
      adjust_scaling_factors: alpha follows the rank (alpha r' / r), keeping alpha / r.
      use_label_mask: fit only the tokens the loss is on, where the batches mark them.
      calibration_batches: the run's first training batches the PCA cycles over.
      components: kernel path -> A0 (rank, d_in), set by `calibrated`; the spec then names
        each adapted kernel's rank and alpha.
    """

    name = "eva"

    rho: float = 2.0
    tau: float = 0.99
    whiten: bool = False
    adjust_scaling_factors: bool = True
    use_label_mask: bool = True
    calibration_batches: int = 8
    components: Mapping[str, Any] | None = dataclasses.field(default=None, compare=False,
                                                             repr=False)

    def max_components(self, path: str) -> int:
        return round(self.spec.rank_for(path) * self.rho)

    def check(self, path: str, kernel_shape: tuple[int, int]) -> None:
        """Raises a `SettingError` for a target EVA cannot start: a split output (EVA's ranks
        are per kernel), or round(r rho) components over the kernel's size."""
        if len(self.spec.parts_for(path)) > 1:
            raise SettingError("split_outputs", f"EVA redistributes ranks per kernel, and "
                               f"{path} is split into parts; target whole kernels", self.name)
        k = self.max_components(path)
        if k > min(kernel_shape):
            raise SettingError("rho", f"EVA keeps round(r rho) = {k} components of {path}'s "
                               f"inputs, more than its kernel {tuple(kernel_shape)} allows; "
                               "lower rank or rho", self.name)

    def checked_targets(self, params: Params) -> list[str]:
        """The target kernel paths, each `check`ed against its kernel's shape."""
        flat = traverse_util.flatten_dict(params)
        paths = lora.target_kernels(self.spec, params)
        for path in paths:
            self.check(path, flat[tuple(path.split("/"))].shape)
        return paths

    def init(self, params: Params, key: jax.Array) -> dict:
        if self.components is None:
            flat = traverse_util.flatten_dict(params)
            paths = self.checked_targets(params)
            if paths and not isinstance(flat[tuple(paths[0].split("/"))], jax.core.Tracer):
                raise SettingError("targets", f"eva has no input components for {paths[0]}: "
                                   "calibrate it on batches of the task first (`calibrated`)",
                                   self.name)
            # The split evaluated in shapes (the config checks, before any batch is read).
            return super().init(params, key)
        flat = traverse_util.flatten_dict(params)
        adapters = {}
        for path in lora.target_kernels(self.spec, params):
            a = jnp.asarray(self.components[path], jnp.float32)
            d_out = flat[tuple(path.split("/"))].shape[1]
            module = tuple(path.split("/")[:-1])
            adapters[module + (lora.LORA_A,)] = a
            adapters[module + (lora.LORA_B,)] = jnp.zeros((d_out, a.shape[0]), jnp.float32)
        return traverse_util.unflatten_dict(adapters)

    def calibration(self) -> int:
        return 0 if self.components is not None else self.calibration_batches

    def calibrated(self, data: calibration.Batches) -> "EVA":
        """With A0 and the ranks taken from the batches of `data` (see the module docstring).

        Raises:
          SettingError: a target EVA cannot start (`check`), or one whose components did not
            converge in MAX_PASSES passes over the batches.
        """
        paths = self.checked_targets(data.params)
        return self.with_calibration(self.fit(data, paths))

    def fit(self, data: calibration.Batches, paths: Sequence[str]) -> dict[str, np.ndarray]:
        """kernel path -> A0 (its redistributed rank, d_in) for every target with a rank."""
        first = calibration.input_rows(data, paths, 0, self.use_label_mask)
        # Targets whose inputs are equal on the first batch share the first such target's PCA.
        shared: dict[str, str] = {}
        for path in paths:
            shared[path] = next((p for p in dict.fromkeys(shared.values())
                                 if np.array_equal(first[p], first[path])), path)
        fitted = list(dict.fromkeys(shared.values()))
        k = {p: max(self.max_components(q) for q in paths if shared[q] == p) for p in fitted}
        budget = sum(self.spec.rank_for(p) for p in paths)
        pcas = {p: Pca(k[p]) for p in fitted}
        converged = {p: np.zeros(k[p], bool) for p in fitted}
        done = dict.fromkeys(fitted, False)  # converged and not fitting
        ranks = {p: k[shared[p]] for p in paths}
        batches = cycle(range(len(data.batches)))
        for step in range(MAX_PASSES * len(data.batches)):
            for p in fitted:  # PEFT's order: convergence is checked before each batch
                done[p] = bool(converged[p][:ranks[p]].all())
            if all(done.values()):
                break
            index = next(batches)
            inputs = first if step == 0 else calibration.input_rows(
                data, [p for p in fitted if not done[p]], index, self.use_label_mask)
            for p in fitted:
                if done[p] or inputs[p].shape[0] < k[p]:
                    continue  # too few tokens for k components: PEFT skips the batch too
                previous = pcas[p].components
                pcas[p] = pca_step(pcas[p], inputs[p])
                if previous is not None:
                    converged[p] = _cosines(pcas[p].components, previous) >= self.tau
            if all(pcas[p].components is not None for p in fitted):
                ranks = redistributed_ranks(
                    {q: pcas[shared[q]].explained_variance_ratio[:k[shared[q]]] for q in paths},
                    budget)
        else:
            late = [p for p in fitted if not done[p]]
            raise SettingError("tau", f"EVA's input components of {', '.join(late)} did not "
                               f"converge to tau = {self.tau} in {MAX_PASSES} passes over "
                               f"{len(data.batches)} batches; raise calibration_batches or "
                               "lower tau", self.name)
        found = {}
        for path in paths:
            pca, rank = pcas[shared[path]], ranks[path]
            if rank:
                a = pca.components[:rank]
                found[path] = (a / np.sqrt(pca.singular_values[:rank])[:, None] if self.whiten
                               else a).astype(np.float32)
        return found

    def calibration_state(self) -> dict[str, Any]:
        return dict(self.components or {})

    def with_calibration(self, state: Mapping[str, Any]) -> "EVA":
        """With the A0 of `state` (kernel path -> (rank, d_in)): the spec then adapts exactly
        those kernels, each with its rank, and its alpha adjusted (`adjust_scaling_factors`)."""
        exact = {path: "^" + re.escape(path) + "$" for path in state}
        ranks = {exact[p]: int(np.shape(a)[0]) for p, a in state.items()}
        alphas = {}
        for path, pattern in exact.items():
            alpha = self.spec.alpha_for(path)
            if self.adjust_scaling_factors:
                alpha *= ranks[pattern] / self.spec.rank_for(path)
            alphas[pattern] = alpha
        spec = dataclasses.replace(self.spec, targets=tuple(exact.values()), rank_pattern=ranks,
                                   alpha_pattern=alphas)
        return dataclasses.replace(self, spec=spec,
                                   components={p: np.asarray(a) for p, a in state.items()})

    def describe(self) -> str:
        if self.components is None:
            return f"eva(r={self.spec.rank}, rho={self.rho})"
        ranks = sorted(np.shape(a)[0] for a in self.components.values())
        return (f"eva(r={self.spec.rank}, ranks {ranks[0]}..{ranks[-1]} over {len(ranks)} "
                "kernels)")


REGISTRATION = lora.variant_registration(
    EVA, {"rho": (2.0, rules.number(1)), "tau": (0.99, rules.number(0, 1)),
          "whiten": (False, rules.boolean), "adjust_scaling_factors": (True, rules.boolean),
          "use_label_mask": (True, rules.boolean),
          "calibration_batches": (8, rules.integer(1))},
    without=("init",))
