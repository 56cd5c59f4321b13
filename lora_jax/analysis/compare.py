"""Compare the adapters of two runs: subspace similarity heatmaps and amplification (Section 7).

    python -m lora_jax.analysis.compare RUN_1 RUN_2 --out DIR [--module REGEX] [--side right|left]
    python -m lora_jax.analysis.compare ADAPTER_1 ADAPTER_2 --out DIR \\
        --base configs/glue.py:task=sst2,model=minilm

Each of RUN_1, RUN_2 is a `lora_jax.train` workdir (its config.json and final exported adapter/
are read as `evaluate.load_run` reads them) or a PEFT adapter directory, whose base model `--base`
names as a lora_jax config (its `model` section and seed rebuild the base params). A randomly
initialised base (model=tiny) depends on the seed, so two such runs with different seeds adapt
different bases; a pretrained base is the same for every seed.

A run's adapter/ holds split outputs (GPT-2's c_attn adapted on q and v) fused into one rank-2r
PEFT adapter; they are split back, exactly, into one matrix per part, named e.g.
'h_0/attn/c_attn[q]' and 'h_0/attn/c_attn[v]'. A PEFT directory given with --base is read as it
is: a fused c_attn stays one rank-2r matrix.

Writes into DIR:
  similarity.json   per matrix both runs adapt: the grid phi(i, j) (nested lists, i over run 1's
                    rank, j over run 2's), phi(1, 1), the mean over the grid, and the same for a
                    control pair of random Gaussian matrices of the same shapes (Figure 4).
  phi_<matrix>.png  per matrix, Figure 3 style: the runs' grid next to the random control.
  summary.png       every matrix's grid in one figure.
  amplification.json  per matrix of RUN_1: Table 7's quantities (see `amplification`).
  init_similarity.json  with --against-init (run workdirs): per run and matrix, how far the final A
                    moved from its initial A (`movement_from_init`).
  intruders.json    per run and matrix, its intruder dimensions (`analysis.intruders`: of the
                    top-k singular vectors of W + dW, those no singular vector of W resembles;
                    k = 10, epsilon = 0.5 unless --intruder-k / --intruder-epsilon say).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Mapping, Sequence

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lora_jax.interop import peft_adapters
from lora_jax.methods import lora, lora_peft
from lora_jax.analysis import intruders
from lora_jax.analysis.amplification import amplification
from lora_jax.analysis.subspace import Side, random_gaussian_like, similarity_grid
from lora_jax.config import load_config
from lora_jax.models import fused_part_names
from lora_jax.training import setup

@dataclasses.dataclass(frozen=True)
class AdaptedMatrix:
    """One adapted weight matrix, in the paper's orientation: dW = scale * b @ a."""

    a: np.ndarray  # (r, d_in)
    b: np.ndarray  # (d_out, r)
    scale: float
    w: np.ndarray  # the frozen W, (d_out, d_in)


def unfuse(a: np.ndarray, b: np.ndarray, parts: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of the PEFT export's fusing of split outputs: (n*r, d_in), (d_out, n*r) ->
    (n, r, d_in), (n, d_part, r).

    Raises:
      ValueError: B is not block-structured as `export_peft` writes it (part j's B in its output
        rows and columns j*r..(j+1)*r, zeros elsewhere), i.e. it is a genuine rank-n*r adapter.
    """
    n = sum(parts)
    rank, d_part = a.shape[0] // n, b.shape[0] // len(parts)
    if a.shape[0] != n * rank or b.shape != (len(parts) * d_part, n * rank):
        raise ValueError(f"A {a.shape} and B {b.shape} do not split into {n} adapted parts of "
                         f"{len(parts)}")
    blocks, rebuilt = [], np.zeros_like(b)
    for p, j in lora.adapted_slots(parts):
        rows, cols = slice(p * d_part, (p + 1) * d_part), slice(j * rank, (j + 1) * rank)
        blocks.append(b[rows, cols])
        rebuilt[rows, cols] = b[rows, cols]
    if not np.array_equal(rebuilt, b):
        raise ValueError(f"B {b.shape} has entries outside the blocks of split outputs "
                         f"{tuple(parts)}: it is not a fused split-output adapter")
    return a.reshape(n, rank, a.shape[1]), np.stack(blocks)


def adapted_matrices(spec: lora.LoraSpec, frozen: Mapping, trainable: Mapping,
                     split_outputs: Mapping[str, Sequence[bool]] | None = None
                     ) -> dict[str, AdaptedMatrix]:
    """Every adapted matrix of a trainable tree, one per adapted part of a split output.

    Args:
      spec: the spec `trainable` fits (from `lora.split` or `load_peft`).
      frozen: the base params holding the adapted kernels (d_in, d_out).
      trainable: {'lora': ...} as `lora.split` or `load_peft` make it.
      split_outputs: the training run's split_outputs, to split adapters that were fused on
        export back into parts; default: `spec.split_outputs`.

    Returns:
      Name -> AdaptedMatrix, in tree order; names are module paths, with the part's name as
      the family declares it ('[q]', '[v]' for GPT-2's c_attn; else '[<part index>]') appended
      for parts of a split output.
    """
    splitter = lora.LoraSpec(targets=(), split_outputs=dict(
        spec.split_outputs if split_outputs is None else split_outputs))
    flat = traverse_util.flatten_dict(frozen)
    matrices = {}
    for module, ab in lora.adapter_modules(trainable).items():
        path = "/".join(module + ("kernel",))
        a, b = np.asarray(ab[lora.LORA_A], np.float64), np.asarray(ab[lora.LORA_B], np.float64)
        scale = spec.scale(path, a.shape[-2])  # a fused export keeps alpha / r per part
        kernel = np.asarray(flat[module + ("kernel",)], np.float64)
        parts = splitter.parts_for(path)
        if len(parts) == 1:
            matrices["/".join(module)] = AdaptedMatrix(a, b, scale, kernel.T)
            continue
        if a.ndim == 2:
            a, b = unfuse(a, b, parts)
        d_part = kernel.shape[1] // len(parts)
        names = fused_part_names("/".join(module))  # GPT-2's c_attn: 'qkv'
        for p, j in lora.adapted_slots(parts):
            label = names[p] if len(parts) == len(names) else str(p)
            w = kernel[:, p * d_part:(p + 1) * d_part].T
            matrices[f"{'/'.join(module)}[{label}]"] = AdaptedMatrix(a[j], b[j], scale, w)
    return matrices


def _locate(source: pathlib.Path, base: str | None):
    """(config naming the base model and seed, adapter directory, split_outputs to undo)."""
    if (source / "config.json").is_file():
        config = ml_collections.ConfigDict(json.loads((source / "config.json").read_text()))
        adapter = source / "adapter"
        if not adapter.is_dir():
            raise FileNotFoundError(f"{adapter} does not exist: the run has not finished training")
        parts = lora_section(config).split_outputs
        return config, adapter, {k: tuple(v) for k, v in parts.items()}
    if (source / peft_adapters.CONFIG_NAME).is_file():
        if base is None:
            raise ValueError(f"{source} is a PEFT adapter directory: name its base model with "
                             "--base CONFIG, e.g. --base configs/glue.py:task=sst2,model=minilm")
        return load_config(base), source, None  # a PEFT directory's fused adapters stay fused
    raise FileNotFoundError(f"{source} is neither a lora_jax run workdir (config.json) nor a "
                            f"PEFT adapter directory ({peft_adapters.CONFIG_NAME})")


def load_adapters(sources: Sequence[str | pathlib.Path], base: str | None = None
                  ) -> list[dict[str, AdaptedMatrix]]:
    """The adapted matrices of run workdirs or of PEFT adapter directories on `base`.

    A run is read as `evaluate.load_run` reads it (config.json rebuilds the base model from the
    run's seed; adapter/ holds the final adapters), except that each distinct base (model config
    and seed) is built only once for all sources.

    Args:
      sources: `lora_jax.train` workdirs, or directories with adapter_config.json.
      base: for PEFT directories, a config path such as 'configs/glue.py:task=sst2,model=minilm'.

    Returns:
      One dict per source, as `adapted_matrices` gives it.

    Raises:
      FileNotFoundError: a source is neither; a run that has not exported its adapter yet.
      ValueError: a PEFT directory without `base`; adapters that do not fit their base.
    """
    located = [_locate(pathlib.Path(s), base) for s in sources]  # all checked before any build
    bases, loaded = {}, []
    for config, adapter, split_outputs in located:
        key = (json.dumps(config.model.to_dict(), sort_keys=True, default=str), config.seed)
        if key not in bases:
            bases[key] = setup.base(config)  # the trainer's own base model, from the same seed
        b = bases[key]
        params = b.params
        spec, trainable = lora_peft.load_peft(adapter, params, model_type=b.info["model_type"],
                                              task=b.info["task"])
        loaded.append(adapted_matrices(spec, params, trainable, split_outputs))
    return loaded


def initial_adapters(run: str | pathlib.Path) -> dict[str, AdaptedMatrix]:
    """The adapted matrices a run started from (B = 0, A as initialised), re-derived from its
    config and seed exactly as `lora_jax.train` drew them.

    Comparing a run's final A with these shows how far training moved A's row space; when it
    barely moved, phi between two runs mostly measures their initialisations.

    Raises:
      FileNotFoundError: `run` is not a `lora_jax.train` workdir (a PEFT directory has no seed).
    """
    run = pathlib.Path(run)
    if not (run / "config.json").is_file():
        raise FileNotFoundError(f"{run} is not a lora_jax.train workdir (no config.json): "
                                "only a run's seed says how its adapters were initialised")
    config = ml_collections.ConfigDict(json.loads((run / "config.json").read_text()))
    if "method" not in config:  # a run from before the method seam
        config.method = lora_section(config, whole=True)
    config.mesh.data, config.mesh.fsdp = -1, 1  # whatever devices this machine has
    # The trainer's own setup and split, not a re-implementation: the same A for the same seed.
    built = setup.build(config)
    specs = [m.spec for m in built.stack.methods if isinstance(m, lora.LoRA)]
    if not specs:
        raise ValueError(f"{run} trained {built.stack.describe()}, not LoRA: it has no A to "
                         "compare")
    frozen, trainable = jax.device_get((built.frozen, built.trainable))
    return adapted_matrices(specs[0], frozen, trainable)


def lora_section(config: ml_collections.ConfigDict, whole: bool = False):
    """The LoRA settings of a run's config (config.method.lora; config.lora in runs from before
    the method seam); `whole`: the whole config.method section, as the trainer builds it."""
    name = lora.LoRA.name  # LoRA's section of config.method
    if "method" in config:
        return config.method if whole else config.method[name]
    legacy = ml_collections.ConfigDict({"use": (name,), "also_train": config.lora.also_train,
                                        name: {k: v for k, v in config.lora.items()
                                               if k != "also_train"}})
    legacy[name].bias = "none"
    return legacy if whole else legacy[name]


def movement_from_init(final: Mapping[str, AdaptedMatrix], initial: Mapping[str, AdaptedMatrix]
                       ) -> dict[str, dict]:
    """Per matrix: phi(A, A_0, r, r) (1 = the same row space as at the start), phi(1, 1), and
    ||A - A_0||_F / ||A_0||_F."""
    moved = {}
    for name, m in final.items():
        a, a0 = m.a, initial[name].a
        grid = similarity_grid(a, a0)
        moved[name] = {"phi_rr": float(grid[-1, -1]), "phi_11": float(grid[0, 0]),
                       "relative_change": float(np.linalg.norm(a - a0) / np.linalg.norm(a0))}
    return moved


def intruder_counts(run: Mapping[str, AdaptedMatrix], k: int = intruders.TOP_K,
                    epsilon: float = intruders.EPSILON) -> dict[str, int]:
    """Per adapted matrix, the intruder dimensions of W + dW against W (`intruders.intruder_count`)."""
    return {name: intruders.intruder_count(m.w, m.w + m.scale * (m.b @ m.a), k, epsilon)
            for name, m in run.items()}


def _summary(grid: np.ndarray) -> dict:
    return {"shape": list(grid.shape), "phi_11": float(grid[0, 0]), "mean": float(grid.mean()),
            "grid": grid.tolist()}


def compare_adapters(run1: Mapping[str, AdaptedMatrix], run2: Mapping[str, AdaptedMatrix],
                     names: Sequence[str], *, side: Side, key: jax.Array) -> dict[str, dict]:
    """Subspace similarity of the two runs' matrices, next to a random Gaussian control.

    Args:
      run1, run2: as `load_adapters` gives them.
      names: the matrices to compare (in both runs).
      side: "right" compares A's row spaces (the paper's Figures 3, 4), "left" B's column spaces.
      key: PRNG key for the control pairs (one pair per matrix, of the compared shapes).

    Returns:
      Name -> {shape: [r1, r2], phi_11, mean, grid: phi(i, j) as nested lists, random: the same
      four for the control}.
    """
    results = {}
    for index, name in enumerate(names):
        m1, m2 = ((r[name].a if side == "right" else r[name].b) for r in (run1, run2))
        k1, k2 = jax.random.split(jax.random.fold_in(key, index))
        control = similarity_grid(random_gaussian_like(m1, k1), random_gaussian_like(m2, k2),
                                  side=side)
        results[name] = {**_summary(similarity_grid(m1, m2, side=side)),
                         "random": _summary(control)}
    return results


def _heatmap(ax, grid: np.ndarray, title: str, labels: tuple[str, str], fontsize: float = 10):
    r1, r2 = grid.shape
    # i = 1 at the top, as the paper draws it; cell (i, j) centred on integer ticks.
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                      interpolation="nearest", extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5))
    ax.set_title(title, fontsize=fontsize)
    ax.set(xlabel=f"j ({labels[1]})", ylabel=f"i ({labels[0]})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    return image


def write_figures(out: pathlib.Path, results: Mapping[str, dict], labels: tuple[str, str]) -> None:
    """phi_<name>.png per matrix (runs | random control) and summary.png (all runs' grids)."""
    for name, entry in results.items():
        fig = Figure(figsize=(10, 4), layout="constrained")
        axes = fig.subplots(1, 2)
        image = _heatmap(axes[0], np.array(entry["grid"]), name, labels)
        _heatmap(axes[1], np.array(entry["random"]["grid"]), "random Gaussian", labels)
        fig.colorbar(image, ax=axes, label="phi(i, j)")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")  # 'h_0/attn/c_attn[q]'
        fig.savefig(out / f"phi_{safe}.png", dpi=100)

    cols = min(len(results), 4)
    rows = math.ceil(len(results) / cols)
    fig = Figure(figsize=(3.5 * cols + 1, 3 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (name, entry) in zip(axes, results.items()):
        image = _heatmap(ax, np.array(entry["grid"]), name, labels, fontsize=7)
    for ax in axes[len(results):]:
        ax.set_axis_off()
    fig.colorbar(image, ax=axes.tolist(), label="phi(i, j)")
    fig.savefig(out / "summary.png", dpi=100)


def _number_text(x: float | None) -> str:
    return "inf" if x is None else f"{x:.3g}"


def _json_number(x: float | int) -> float | int | None:
    return x if math.isfinite(x) else None  # strict JSON has no Infinity


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora_jax.analysis.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs=2, metavar="RUN",
                        help="two run workdirs or PEFT adapter directories")
    parser.add_argument("--out", required=True, help="directory for the JSON files and figures")
    parser.add_argument("--module", default="", help="regex; compare only matching matrices")
    parser.add_argument("--side", choices=("right", "left"), default="right",
                        help="right: A's row spaces (the paper's); left: B's column spaces")
    parser.add_argument("--base", help="config naming the base model of PEFT adapter directories "
                        "(run workdirs name their own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random controls")
    parser.add_argument("--against-init", action="store_true",
                        help="also compare each run's final A with its initial A (run workdirs "
                        "only): writes init_similarity.json")
    parser.add_argument("--intruder-k", type=int, default=intruders.TOP_K,
                        help="top singular vectors of W + dW examined for intruders")
    parser.add_argument("--intruder-epsilon", type=float, default=intruders.EPSILON,
                        help="a direction whose largest |cos| with W's is below this intrudes")
    args = parser.parse_args(argv)

    try:
        run1, run2 = load_adapters(args.runs, args.base)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))  # a wrong path or a missing --base: usage, not a crash
    names = [n for n in run1 if n in run2 and re.search(args.module, n)]
    if not names:
        raise SystemExit(f"no adapted matrix is in both runs and matches --module "
                         f"{args.module!r}; run 1 has {list(run1)}, run 2 has {list(run2)}")
    key_similarity, key_amplification = jax.random.split(jax.random.key(args.seed))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    results = compare_adapters(run1, run2, names, side=args.side, key=key_similarity)
    (out / "similarity.json").write_text(json.dumps(
        {"runs": list(args.runs), "side": args.side, "matrices": results}) + "\n")
    write_figures(out, results, labels=tuple(pathlib.Path(r).name or r for r in args.runs))

    table = {}
    for index, name in enumerate(names):
        m = run1[name]
        stats = amplification(m.w, m.a, m.b, m.scale, jax.random.fold_in(key_amplification, index))
        table[name] = {k: _json_number(v) for k, v in stats.items()}
    (out / "amplification.json").write_text(json.dumps(
        {"run": args.runs[0], "matrices": table}, indent=2) + "\n")

    if args.against_init:
        try:
            moved = {run: movement_from_init(adapters, initial_adapters(run))
                     for run, adapters in zip(args.runs, (run1, run2))}
        except FileNotFoundError as error:
            parser.error(str(error))
        (out / "init_similarity.json").write_text(json.dumps(moved, indent=2) + "\n")
        for run, per_matrix in moved.items():
            phis = [t["phi_rr"] for t in per_matrix.values()]
            print(f"{run}: phi(A, A_0, r, r) from {min(phis):.3f} to {max(phis):.3f} over "
                  f"{len(phis)} matrices")

    try:
        counted = {run: intruder_counts(adapters, args.intruder_k, args.intruder_epsilon)
                   for run, adapters in zip(args.runs, (run1, run2))}
    except ValueError as error:  # k or epsilon out of range for these matrices
        parser.error(str(error))
    (out / "intruders.json").write_text(json.dumps(
        {"k": args.intruder_k, "epsilon": args.intruder_epsilon, "runs": counted}, indent=2)
        + "\n")
    for run, counts in counted.items():
        print(f"{run}: {sum(counts.values())} intruder dimensions over {len(counts)} matrices "
              f"(top {args.intruder_k}, epsilon {args.intruder_epsilon:g})")

    for name in names:
        r = results[name]
        print(f"{name}: phi(1,1) {r['phi_11']:.3f} (random {r['random']['phi_11']:.3f}), "
              f"mean {r['mean']:.3f} (random {r['random']['mean']:.3f}), "
              f"amplification {_number_text(table[name]['amplification'])}")


if __name__ == "__main__":
    main()
