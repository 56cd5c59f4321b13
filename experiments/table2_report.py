"""Table 2 in miniature: one table over the tasks `experiments/table2.sh` ran, from the runs'
records, so an unfinished sweep reports what it has.

    python -m experiments.table2_report experiments/results/table2/records --out experiments/results/table2

ROOT is either the sweep's records directory (ROOT/<task>/<run>.json, `experiments.sweep
--records`) or its run directories (ROOT/<task>/<run>/record.json).

Writes OUT/table.md: per method, most trained parameters first, their number and per task the
median [min, max] of the best main metric over seeds, x100, with the number of seeds; then each
method's median wall time per task and each task's total; then, where the records keep them, the
tasks' other dev metrics at the last step (MRPC's F1, STS-B's Spearman, the eval loss), saying
which came from a rerun that matched its record only within a tolerance. And OUT/<task>.png
(metric against trained parameters, log scale, seeds as error bars).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections.abc import Sequence

from experiments import sweep

TASK_ORDER = ("sst2", "cola", "mrpc", "stsb", "rte")


def task_records(root: pathlib.Path) -> dict[str, list[dict]]:
    """Task -> the records of its finished runs (ROOT/<task>/<run>.json or <run>/record.json)."""
    out = {}
    for task_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        paths = sorted(task_dir.glob("*.json")) or sorted(task_dir.glob(f"*/{sweep.RECORD}"))
        records = [sweep.with_current_fields(json.loads(p.read_text())) for p in paths]
        if records:
            out[task_dir.name] = records
    return dict(sorted(out.items(), key=lambda kv: (TASK_ORDER + (kv[0],)).index(kv[0])))


def by_method(per_task: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Method -> task -> its records; most trained parameters first, as the paper's tables run
    from FT down."""
    params = {r["method"]: r["trained_params"] for records in per_task.values() for r in records}
    return {method: {task: [r for r in records if r["method"] == method]
                     for task, records in per_task.items()}
            for method in sorted(params, key=lambda m: -params[m])}


def table(per_task: dict[str, list[dict]]) -> str:
    """The metric table (see the module docstring)."""
    header = ["method", "trained params"] + [
        f"{task} ({records[0]['metric']})" for task, records in per_task.items()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, tasks in by_method(per_task).items():
        cells, params = [], None
        for mine in tasks.values():
            if not mine:
                cells.append("-")
                continue
            params = params or mine[0]["trained_params"]
            cells.append(spread([r["best"] for r in mine], 100.0, 1) + f" n={len(mine)}")
        lines.append(f"| {method} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wall_table(per_task: dict[str, list[dict]]) -> str:
    """Median wall seconds of each method's runs per task, and each task's total in hours."""
    header = ["method"] + [f"{task} wall s" for task in per_task]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, tasks in by_method(per_task).items():
        cells = [f"{statistics.median(r['wall_s'] for r in mine):.0f}" if mine else "-"
                 for mine in tasks.values()]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    totals = [f"{sum(r['wall_s'] for r in records) / 3600:.2f} h ({len(records)} runs)"
              for records in per_task.values()]
    lines.append("| all runs | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def spread(values: Sequence[float], scale: float, digits: int) -> str:
    """median [min, max] of `values` times `scale`."""
    # + 0.0 turns a rounded -0.0 (a Matthews of -1e-5) into 0.0.
    values = [round(scale * v, digits) + 0.0 for v in values]
    return (f"{statistics.median(values):.{digits}f} "
            f"[{min(values):.{digits}f}, {max(values):.{digits}f}]")


def other_metrics_table(per_task: dict[str, list[dict]]) -> str | None:
    """Each task's other dev metrics at the last step (MRPC's F1, STS-B's Spearman, the eval
    loss), median [min, max] over the seeds whose records hold them (`metrics`; records written
    before it was kept have none); None when no record holds them."""
    columns = [(task, name) for task, records in per_task.items()
               for name in dict.fromkeys(k for r in records for k in r.get("metrics", {}))
               if name != records[0]["metric"]]
    if not columns:
        return None
    header = ["method"] + [f"{task} {name}" for task, name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, tasks in by_method(per_task).items():
        cells = []
        for task, name in columns:
            values = [r["metrics"][name] for r in tasks[task] if name in r.get("metrics", {})]
            loss = name.endswith("loss")  # a loss is not a percentage
            cells.append(spread(values, 1.0 if loss else 100.0, 3 if loss else 1)
                         + f" n={len(values)}" if values else "-")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rerun_provenance(per_task: dict[str, list[dict]]) -> str | None:
    """Where other metrics were backfilled from reruns that matched their records' main metric
    only within a tolerance (`metrics_rerun`, backfill_metrics --within): which tasks, how many
    records and the largest difference; None when there are none."""
    lines = []
    for task, records in per_task.items():
        if differences := [r["metrics_rerun"]["largest_difference"] for r in records
                           if "metrics_rerun" in r]:
            lines.append(f"{task}: {len(differences)} records' other metrics are a rerun's, "
                         f"whose {records[0]['metric']} differed from the record's by at most "
                         f"{max(differences):.1e}")
    return "; ".join(lines) + "." if lines else None


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=pathlib.Path, help="the directory table2.sh wrote")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(f"{args.root} is not a directory")
    per_task = task_records(args.root)
    if not per_task:
        raise SystemExit(f"{args.root} holds no finished run (no */*.json, no */*/{sweep.RECORD})")
    args.out.mkdir(parents=True, exist_ok=True)
    text = table(per_task)
    runs = sum(len(r) for r in per_task.values())
    (args.out / "table.md").write_text(
        f"# Table 2 in miniature ({runs} finished runs)\n\nMetric x100, median [min, max] "
        "over seeds; trained parameters include the task head (of the first task's size).\n\n"
        + text + "\n\nWall time per run (median over seeds) and per task (all runs):\n\n"
        + wall_table(per_task) + "\n"
        + (f"\nThe other dev metrics at the last step (x100; losses as they are):\n\n{other}\n"
           if (other := other_metrics_table(per_task)) else "")
        + (f"\n{note}\n" if (note := rerun_provenance(per_task)) else ""))
    for task, records in per_task.items():
        sweep.plot("methods", sweep.summarize(records), records[0]["metric"],
                   args.out / f"{task}.png", title=task)
    print(text)
    return text


if __name__ == "__main__":
    main()
