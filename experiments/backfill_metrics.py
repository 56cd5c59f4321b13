"""Give records written before `sweep.make_record` kept every dev metric their `metrics`, from
a rerun of the same runs, and check on the way that the rerun reproduced each record.

    TASKS=mrpc:300 RECORDS=runs/backfill/records bash experiments/table2.sh runs/backfill
    python -m experiments.backfill_metrics --skip-unreproduced runs/backfill/records/mrpc experiments/results/table2/records/mrpc

For every rerun record (RERUN/<run>.json) whose run is also in RECORDS: if the rerun's main
metric, its best value and best step equal the record's exactly (runs are deterministic on one
machine and software stack), the record gains the rerun's `metrics`; anything else in the
record, its wall time included, stays as it was. A rerun that does not reproduce its record is
reported and nothing at all is written, so a partial or mismatched backfill never mixes runs;
with --skip-unreproduced such records are named and left as they were, and the rest are filled.

A continuous metric (STS-B's Pearson) is not reproduced bit for bit by a rerun on another
machine: one rounding difference in the first step moves it in its seventh digit. With
--within TOL the main metric's final and best values may differ by at most TOL (everything
else in SAME_RUN still exactly); such a record gains the rerun's other metrics, keeps its own
value of the main metric, and says where they came from in `metrics_rerun` (the largest
difference and where the rerun ran), so a reader sees they are a rerun's and by how much it
differed.
"""

from __future__ import annotations

import argparse
import json
import pathlib

from experiments.sweep import dump_record
from lora_jax.training import environment

# What must be equal, bit for bit, for the rerun to count as the same run.
SAME_RUN = ("name", "method", "seed", "trained_params", "metric", "final", "best", "best_step")
# The values that `within` lets differ: the main metric's.
METRIC_VALUES = ("final", "best")
# The report's last digit (x100, one decimal): `within` must stay below it, so that no number
# the report shows can come from a rerun that differed from its record.
REPORT_RESOLUTION = 1e-3


def mismatches(record: dict, rerun: dict, within: float = 0.0) -> list[str]:
    """The SAME_RUN fields in which `rerun` differs from `record`, as 'field: a != b'; the main
    metric's values count as equal when they differ by at most `within`."""
    def same(k):
        a, b = record.get(k), rerun.get(k)
        if k in METRIC_VALUES and isinstance(a, float) and isinstance(b, float):
            return abs(a - b) <= within
        return a == b
    return [f"{k}: {record.get(k)!r} != {rerun.get(k)!r}" for k in SAME_RUN if not same(k)]


def filled(record: dict, rerun: dict) -> dict:
    """`record` with the rerun's metrics; if the rerun was not bit-identical (its main metric
    only within `within`), the record keeps its own main-metric value and names the rerun's
    difference and environment."""
    if all(record[k] == rerun[k] for k in METRIC_VALUES):
        return {**record, "metrics": rerun["metrics"]}
    metrics = {**rerun["metrics"], record["metric"]: record["final"]}
    provenance = {"largest_difference": max(abs(record[k] - rerun[k]) for k in METRIC_VALUES),
                  "environments": rerun.get("environments", [])}
    return {**record, "metrics": metrics, "metrics_rerun": provenance}


def where_each_ran(record: dict, rerun: dict) -> str:
    """What a reader needs to judge a mismatch: whether the two ran on the same software and
    machine (where runs are deterministic, so a mismatch is a change of program) or not (where
    rounding may differ from the first step)."""
    if not record.get("environments"):
        return "the record does not say where it ran"
    if not rerun.get("environments"):
        return "the rerun does not say where it ran"
    recorded, again = record["environments"], rerun["environments"]
    if recorded == again:
        return "same software and machine: the program differs"
    if len(recorded) > 1 or len(again) > 1:
        return f"resumed across environments: {len(recorded)} then, {len(again)} in the rerun"
    return "ran elsewhere: " + "; ".join(environment.differences(recorded[0], again[0]))


def backfill(rerun_dir: pathlib.Path, records_dir: pathlib.Path, *,
             skip_unreproduced: bool = False,
             within: float = 0.0) -> tuple[list[str], list[str]]:
    """Write the rerun's `metrics` into the matching records of `records_dir`; return the names
    of the records that gained them and of those left as they were because their rerun did not
    reproduce them (only with `skip_unreproduced`). Raises ValueError, before writing anything,
    when a rerun has no `metrics`, has no record to fill, or (unless `skip_unreproduced`) did
    not reproduce its record (its main metric within `within`, the rest exactly)."""
    if not 0.0 <= within < REPORT_RESOLUTION:
        raise ValueError(f"within={within}: a rerun may differ in the main metric by at least 0 "
                         f"and less than {REPORT_RESOLUTION} (the report's last digit)")
    reruns = sorted(rerun_dir.glob("*.json"))
    if not reruns:
        raise ValueError(f"no rerun records (*.json) in {rerun_dir}")
    updates, problems, skipped = [], [], []
    for path in reruns:
        rerun = json.loads(path.read_text())
        target = records_dir / path.name
        if not target.exists():
            problems.append(f"{path.name}: no such record in {records_dir}")
            continue
        if "metrics" not in rerun:
            problems.append(f"{path.name}: the rerun record keeps no metrics")
            continue
        record = json.loads(target.read_text())
        if diff := mismatches(record, rerun, within):
            (skipped if skip_unreproduced else problems).append(
                f"{path.stem}: not reproduced ({'; '.join(diff)}); {where_each_ran(record, rerun)}")
            continue
        update = filled(record, rerun)
        if record.get("metrics", update["metrics"]) != update["metrics"]:
            problems.append(f"{path.name}: the record's metrics differ from the rerun's")
            continue
        updates.append((target, update))
    if problems:
        raise ValueError("nothing written:\n  " + "\n  ".join(problems))
    for target, record in updates:
        target.write_text(dump_record(record))
    return [target.stem for target, _ in updates], skipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rerun", type=pathlib.Path, help="the rerun's records of one task")
    parser.add_argument("records", type=pathlib.Path, help="the records to fill, same task")
    parser.add_argument("--skip-unreproduced", action="store_true",
                        help="leave records whose rerun differs as they were; fill the rest")
    parser.add_argument("--within", type=float, default=0.0, metavar="TOL",
                        help="let the main metric's final and best differ by at most TOL "
                             "(a continuous metric rerun on another machine); default 0")
    args = parser.parse_args(argv)
    try:
        names, skipped = backfill(args.rerun, args.records,
                                  skip_unreproduced=args.skip_unreproduced, within=args.within)
    except ValueError as e:
        raise SystemExit(f"backfill_metrics: {e}") from None
    print(f"{len(names)} records of {args.records} gained their metrics: {', '.join(names)}")
    for line in skipped:
        print(f"left as it was: {line}")


if __name__ == "__main__":
    main()
