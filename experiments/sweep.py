"""Runs a sweep of named LoRA runs one after another, then tabulates and plots them.

    python -m experiments.sweep --config configs/ablations.py:study=rank,task=sst2 --out DIR \
        [--only REGEX] [--set base.train.max_steps=100 ...]

The config (see configs/ablations.py) holds `base`, `runs` (each {name, rank, targets, seed,
overrides}) and `study`. Run <name> trains in DIR/<name>; once it has exported its adapter and
its record (DIR/<name>/record.json) is written, a rerun skips it, so an interrupted sweep resumes
(an unfinished run resumes from its own checkpoint). Writes DIR/results.csv and DIR/results.md
(one row per run, then the median / min / max per setting, the way the paper reports seeds) and
DIR/<study>.png.

`--together` trains the runs that can share one program (LoRA runs differing in seed, rank,
targets, alpha or learning rate: `lora_jax.training.members`) as one, each still writing its own
run directory and record; the others train one after another.

`--records RDIR` keeps a second copy of each finished run's record as RDIR/<name>.json and skips
any run whose record is there: records are a few hundred bytes where a run directory holds
checkpoints and exports, so RDIR can be committed and a long sweep resumed on another machine.
"""

import argparse
import ast
import copy
import csv
import json
import pathlib
import re
import statistics
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

from lora_jax.config import set_dotted

RECORD = "record.json"
FIELDS = ("name", "method", "targets", "rank", "seed", "trained_params", "lora_params", "metric",
          "final", "best", "best_step", "wall_s")
SUMMARY_FIELDS = ("method", "targets", "rank", "trained_params", "runs", "median", "min", "max",
                  "final_median")


# --- Configs ------------------------------------------------------------------------------------

def run_config(base: ml_collections.ConfigDict, run: dict) -> ml_collections.ConfigDict:
    """A copy of `base` with the run's dotted overrides applied."""
    config = copy.deepcopy(base)
    for dotted, value in run["overrides"].items():
        set_dotted(config, dotted, value)
    return config


def parse_set(item: str) -> tuple[str, Any]:
    """'base.data.max_len=32' -> ('base.data.max_len', 32); values are Python literals or strings."""
    key, sep, text = item.partition("=")
    if not sep:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. base.train.max_steps=100")
    try:
        return key, ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return key, text


# --- One run ------------------------------------------------------------------------------------

def is_finished(workdir: pathlib.Path) -> bool:
    """A run is done once its adapter is exported and its record written (the record comes last)."""
    from lora_jax import exports

    exported = any((workdir / "adapter" / name).is_file()
                   for name in ("adapter_config.json", exports.CONFIG_NAME))
    return exported and (workdir / RECORD).is_file()


def count_adapter_params(workdir: pathlib.Path) -> tuple[int, int]:
    """(LoRA A and B scalars, all trained scalars incl. fully-trained heads) of a finished run.

    LoRA scalars are counted on the adapters as trained: a slice of a fused projection (GPT-2's
    c_attn q, k or v) is r x (d_in + d_slice), although its PEFT export pads B to all of c_attn.
    A method's own export (lora_jax format) holds the trained tree as trained.
    """
    from safetensors import safe_open

    from lora_jax.analysis.compare import load_adapters
    from lora_jax import exports

    native = workdir / "adapter" / exports.WEIGHTS_NAME
    if native.is_file():
        with safe_open(str(native), framework="numpy") as f:
            sizes = {key: int(np.prod(f.get_slice(key).get_shape())) for key in f.keys()}
        return sum(n for k, n in sizes.items() if k.startswith("lora/")), sum(sizes.values())
    (matrices,) = load_adapters([workdir])
    lora_params = sum(m.a.size + m.b.size for m in matrices.values())
    other = 0
    with safe_open(str(workdir / "adapter" / "adapter_model.safetensors"), framework="numpy") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                other += int(np.prod(f.get_slice(key).get_shape()))
    return lora_params, lora_params + other


def make_record(run: dict, result: dict, workdir: pathlib.Path, wall_s: float) -> dict:
    """The row a finished run contributes: settings, parameter counts, main metric, wall time,
    every dev metric of the last evaluation (`metrics`: MRPC's F1 beside its accuracy, STS-B's
    Spearman beside its Pearson, the eval loss), and where it ran (`environments`: software,
    devices, CPU; a run is bit-reproducible on the same ones, see
    lora_jax.training.environment)."""
    best = result["best"]
    metric = best["metric"]
    if "trained_params" in result:  # the trainer counts what it trained, whatever the method
        lora_params, trainable = result["lora_params"], result["trained_params"]
    else:
        lora_params, trainable = count_adapter_params(workdir)
    return {"name": run["name"], "method": run.get("method", "lora"), "targets": run["targets"],
            "rank": run["rank"], **({"alpha": run["alpha"]} if "alpha" in run else {}),
            "seed": run["seed"], "trained_params": trainable,
            "lora_params": lora_params,
            "metric": metric, "final": float(result[metric]), "best": float(best["value"]),
            "best_step": best["step"], "wall_s": round(wall_s, 3),
            "metrics": {k: float(v) for k, v in result.items()
                        if k not in ("best", "trained_params", "lora_params", "environments")},
            "environments": result.get("environments", [])}


def dump_record(record: dict) -> str:
    """A record as every record file holds it (the sweep's and a backfill's alike)."""
    return json.dumps(record, indent=1)


def with_current_fields(record: dict) -> dict:
    """A record written before the methods study (no `method`; `trainable_params`) in today's
    fields, so an old sweep resumes into the same tables."""
    record = dict(record)
    record.setdefault("method", "lora")
    if "trainable_params" in record:
        record.setdefault("trained_params", record.pop("trainable_params"))
    return record


def run_one(base: ml_collections.ConfigDict, run: dict, workdir: pathlib.Path,
            records: pathlib.Path | None = None) -> dict:
    """Trains one run (resuming if it had started) unless it has finished, here or in `records`;
    returns its record."""
    kept = records / f"{run['name']}.json" if records is not None else None
    if kept is not None and kept.is_file():
        print(f"skipping {run['name']}: its record is {kept}", flush=True)
        return with_current_fields(json.loads(kept.read_text()))
    if is_finished(workdir):
        print(f"skipping {run['name']}: finished in {workdir}", flush=True)
        record = with_current_fields(json.loads((workdir / RECORD).read_text()))
        if kept is not None:
            kept.write_text(dump_record(record))
        return record
    from lora_jax.train import train  # jax is imported only when something trains

    print(f"training {run['name']} in {workdir}", flush=True)
    tick = time.perf_counter()
    result = train(run_config(base, run), workdir)
    return write_record(run, result, workdir, time.perf_counter() - tick, records)


def write_record(run: dict, result: dict, workdir: pathlib.Path, wall_s: float,
                 records: pathlib.Path | None) -> dict:
    """Writes a finished run's record (and its copy in `records`); returns it."""
    record = make_record(run, result, workdir, wall_s)
    (workdir / RECORD).write_text(dump_record(record))
    if records is not None:
        (records / f"{run['name']}.json").write_text(dump_record(record))
    return record


def train_groups(base: ml_collections.ConfigDict, runs: Sequence[dict], out: pathlib.Path,
                 records: pathlib.Path | None) -> None:
    """Trains the unfinished runs that can share a program (`members.groups`) as one program
    per group (`lora_jax.train.train_members`), writing their records; the others are left for
    `run_one`. A member's wall time is its group's divided by its size."""
    from lora_jax.train import train_members
    from lora_jax.training import members

    def finished(run: dict) -> bool:
        return ((records is not None and (records / f"{run['name']}.json").is_file())
                or is_finished(out / run["name"]))

    pending = [r for r in runs if not finished(r)]
    configs = [run_config(base, r) for r in pending]
    for group in members.groups(configs):
        if len(group) < 2:
            continue
        names = ", ".join(pending[i]["name"] for i in group)
        print(f"training together: {names}", flush=True)
        tick = time.perf_counter()
        results = train_members([configs[i] for i in group],
                                [out / pending[i]["name"] for i in group])
        wall_s = (time.perf_counter() - tick) / len(group)
        for i, result in zip(group, results):
            write_record(pending[i], result, out / pending[i]["name"], wall_s, records)


# --- Tables and plots ---------------------------------------------------------------------------

def summarize(records: Sequence[dict]) -> list[dict]:
    """Median / min / max of the best main metric per (method, targets, rank, alpha) setting
    (alpha where runs name it: the grid study), in first-seen order, with the setting's
    trained-parameter count.

    Example:
      >>> summarize([{"method": "lora", "targets": "qv", "rank": 8, "trained_params": 10,
      ...             "best": b, "final": b} for b in (0.9, 0.7, 0.8)])[0]["median"]
      0.8
    """
    groups: dict[tuple[str, str, int, float | None], list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["targets"], r["rank"], r.get("alpha")), []).append(r)
    rows = []
    for (method, targets, rank, alpha), group in groups.items():
        best = [r["best"] for r in group]
        rows.append({"method": method, "targets": targets, "rank": rank,
                     **({} if alpha is None else {"alpha": alpha}),
                     "trained_params": group[0].get("trained_params"),
                     "runs": len(group), "median": statistics.median(best), "min": min(best),
                     "max": max(best),
                     "final_median": statistics.median(r["final"] for r in group)})
    return rows


def markdown_table(rows: Sequence[dict], fields: Sequence[str]) -> str:
    def cell(value) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(cell(row[f]) for f in fields) + " |" for row in rows]
    return "\n".join(lines)


def higher_is_better(metric: str) -> bool:
    """A main metric's direction, as the trainer's: a language model's loss falls, GLUE's rise."""
    return metric != "loss"


def with_alpha(fields: Sequence[str], rows: Sequence[dict]) -> tuple[str, ...]:
    """`fields` with 'alpha' after 'rank' when the rows name one (the grid study)."""
    if not any("alpha" in r for r in rows):
        return tuple(fields)
    at = list(fields).index("rank") + 1
    return (*fields[:at], "alpha", *fields[at:])


def write_tables(records: Sequence[dict], out: pathlib.Path, title: str) -> None:
    """results.csv (one row per run) and results.md (per run, then per setting)."""
    fields, summary = with_alpha(FIELDS, records), summarize(records)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: r.get(k) for k in fields} for r in records)
    metric = records[0]["metric"] if records else "metric"
    best = ""
    if any("alpha" in r for r in summary):
        top = (max if higher_is_better(metric) else min)(summary, key=lambda r: r["median"])
        best = (f"Best setting: r={top['rank']}, alpha={top['alpha']:g} (alpha/r "
                f"{top['alpha'] / top['rank']:g}), median {metric} {top['median']:.4f}.\n\n")
    (out / "results.md").write_text(
        f"# {title}\n\nMain metric: {metric} ('best' is the best evaluation of the run).\n\n"
        f"{best}## Runs\n\n{markdown_table(records, fields)}\n\n"
        f"## Per setting (median over seeds, as in the paper; min / max the spread)\n\n"
        f"{markdown_table(summary, with_alpha(SUMMARY_FIELDS, summary))}\n")


def matrices(targets: str) -> str:
    """'qv' -> 'Wq,Wv'."""
    return ",".join(f"W{m}" for m in targets)


def plot(study: str, summary: Sequence[dict], metric: str, path: pathlib.Path,
         title: str = "") -> None:
    """rank: metric vs rank per target set; targets: bars; seeds: median with min-max whiskers;
    methods: metric vs trained parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if study == "grid":
        plot_grid(summary, metric, path, title)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    if study == "methods":
        # Metric against trained parameters (log scale), a point per method, seeds' min-max as
        # error bars: the picture drawn for this comparison. Methods of about the same budget
        # (LoRA, PiSSA, DoRA, Adapter^P at LoRA's) would hide each other on one vertical, so each
        # is drawn 6% right of the one before it within 15%, and named in a legend, each with
        # its own marker; the table holds the exact counts.
        markers = "osD^vP*Xhp<>"
        drawn: list[float] = []
        for i, r in enumerate(summary):
            x = r["trained_params"]
            x *= 1.06 ** sum(abs(p / r["trained_params"] - 1) < 0.15 for p in drawn)
            drawn.append(r["trained_params"])
            ax.errorbar([x], [r["median"]], capsize=3, fmt=markers[i % len(markers)],
                        yerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]],
                        label=r["method"])
        ax.set_xscale("log")
        ax.set_xlabel("trained parameters (points within 15% of each other drawn 6% apart)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.set_size_inches(7.5, 4)
    elif study == "rank":
        for targets in dict.fromkeys(r["targets"] for r in summary):
            rows = sorted((r for r in summary if r["targets"] == targets), key=lambda r: r["rank"])
            ax.plot([r["rank"] for r in rows], [r["median"] for r in rows], marker="o",
                    label=matrices(targets))
        ax.set_xscale("log", base=2)
        ranks = sorted({r["rank"] for r in summary})
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("rank r")
        ax.legend()
    else:
        labels = [f"{matrices(r['targets'])}\nr={r['rank']}" for r in summary]
        medians = [r["median"] for r in summary]
        spread = [[r["median"] - r["min"] for r in summary], [r["max"] - r["median"] for r in summary]]
        if study == "targets":
            bars = ax.bar(labels, medians, yerr=spread, capsize=4)
            ax.bar_label(bars, fmt="%.3f", fontsize=8)
            # Settings differ by points, not tens of points: start the axis near the data.
            low, high = min(r["min"] for r in summary), max(r["max"] for r in summary)
            ax.set_ylim(low - 0.5 * (high - low) - 1e-3, high + 0.25 * (high - low) + 1e-3)
            ax.tick_params(axis="x", labelsize=8)
        else:
            ax.errorbar(labels, medians, yerr=spread, fmt="o", capsize=6)
    ax.set_ylabel(f"{metric} (median over seeds)")
    ax.set_title(f"Methods on {title}" if study == "methods" else f"LoRA {study} study")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grid(summary: Sequence[dict], metric: str, path: pathlib.Path, title: str) -> None:
    """The rank x alpha grid: a heatmap of the median metric (the best setting boxed), and the
    metric against the scale alpha / r per rank (with Adam the step of dW grows with it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r["rank"] for r in summary})
    alphas = sorted({r["alpha"] for r in summary})
    cell = {(r["rank"], r["alpha"]): r["median"] for r in summary}
    grid = np.array([[cell.get((r, a), np.nan) for a in alphas] for r in ranks])
    fig, (heat, scale) = plt.subplots(1, 2, figsize=(11, 4.2))
    image = heat.imshow(grid, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
    heat.set_yticks(range(len(ranks)), [str(r) for r in ranks])
    heat.set(xlabel="alpha", ylabel="rank r")
    for i, j in np.ndindex(grid.shape):
        if np.isfinite(grid[i, j]):
            heat.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                      color="white" if grid[i, j] < np.nanmean(grid) else "black")
    i, j = np.unravel_index((np.nanargmax if higher_is_better(metric) else np.nanargmin)(grid),
                            grid.shape)
    heat.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="red", lw=2))
    heat.set_title(f"{metric} (median over seeds); best r={ranks[i]}, alpha={alphas[j]:g}")
    fig.colorbar(image, ax=heat)
    for r in ranks:
        rows = sorted((s for s in summary if s["rank"] == r), key=lambda s: s["alpha"])
        scale.plot([s["alpha"] / r for s in rows], [s["median"] for s in rows], marker="o",
                   label=f"r={r}")
    scale.set_xscale("log", base=2)
    scale.set(xlabel="alpha / r (LoRA's scale)", ylabel=metric)
    scale.legend(fontsize=8)
    scale.set_title(f"LoRA rank x alpha on {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- Sweep --------------------------------------------------------------------------------------

def sweep(config: ml_collections.ConfigDict, out: pathlib.Path, only: str | None = None,
          records: pathlib.Path | None = None, together: bool = False) -> list[dict]:
    """Runs (or skips) every run whose name matches `only`, then writes tables and the plot;
    `records` (optional) keeps each finished run's record too (see the module docstring);
    `together`: runs that can share a program train as one (`train_groups`)."""
    runs = [r for r in config.runs if only is None or re.search(only, r["name"])]
    if not runs:
        names = "\n  ".join(r["name"] for r in config.runs)
        raise ValueError(f"--only {only!r} matches no run; the runs are:\n  {names}")
    out.mkdir(parents=True, exist_ok=True)
    if records is not None:
        records.mkdir(parents=True, exist_ok=True)
    if together:
        train_groups(config.base, runs, out, records)
    finished = [run_one(config.base, r, out / r["name"], records) for r in runs]
    write_tables(finished, out, f"LoRA {config.study} study on {config.base.data.task}")
    plot(config.study, summarize(finished), finished[0]["metric"], out / f"{config.study}.png",
         title=config.base.data.task)
    return finished


def main(argv: Sequence[str] | None = None) -> list[dict]:
    from lora_jax.config import load_config

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="e.g. configs/ablations.py:study=rank")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="sweep directory")
    parser.add_argument("--only", help="run only the runs whose name matches this regex")
    parser.add_argument("--records", type=pathlib.Path,
                        help="keep each finished run's record here as <name>.json; skip the runs"
                             " recorded here")
    parser.add_argument("--together", action="store_true",
                        help="train the runs that can share a program as one (members.groups)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. base.train.max_steps=100")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    for item in args.set:
        set_dotted(config, *parse_set(item))
    return sweep(config, args.out, args.only, args.records, args.together)


if __name__ == "__main__":
    from lora_jax.errors import RunError

    try:
        main()
    except RunError as error:  # as the trainer's CLI: the message, then its exit code (143: SIGTERM)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
