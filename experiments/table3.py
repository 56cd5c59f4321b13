"""Table 3 in miniature: trains, decodes and scores every run of configs/table3.py; resumable.

    python -m experiments.table3 --config configs/table3.py --out runs/table3 \
        --records experiments/results/table3/records [--only REGEX]

Each run (a row of the table and a seed) goes through two phases, each in its own process so
that the peak memory recorded for it is its own (the process's resident high-water mark):
  train  `lora_jax.train` into OUT/<name> (an interrupted run resumes from its checkpoint);
         writes OUT/<name>/train_phase.json. The zero-shot floor (train=False) has none.
  score  builds the run as `lora_jax.evaluate` does (the floor: as its config builds it, LoRA's
         B = 0), then by one code path for every row: beam-searches the split's MRs
         (predictions-<split>.txt) and scores them with the official E2E metrics; the held-out
         loss of the run and of its untrained base (`analysis.forgetting`); and, for the rows
         in scoring.intruder_rows, the intruder dimensions of every block matrix
         (`analysis.intruders`). Writes OUT/<name>/score_phase.json.
Then the run's record: OUT/<name>/record.json and RECORDS/<name>.json (committed; a run whose
record is in RECORDS is skipped, so the table resumes on a machine that lost OUT). While the file
OUT/PAUSE exists no new phase starts (the running one finishes): the cores can be lent to another
job without stretching a recorded time.
`python -m experiments.table3_report` builds the table and figures from the records.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import re
import resource
import subprocess
import sys
import time
from collections.abc import Sequence

import ml_collections

from experiments import sweep
from lora_jax.config import load_config

TRAIN_PHASE, SCORE_PHASE = "train_phase.json", "score_phase.json"
PAUSE = "PAUSE"  # touch OUT/PAUSE: the next phase waits until it is removed


def peak_rss_bytes() -> int:
    """This process's resident-set high-water mark, in bytes.

    Read from /proc/self/status (VmHWM: this address space's own mark) where Linux has it:
    getrusage's ru_maxrss carries the parent's mark across fork and exec, so a phase started by
    a large process (a test worker) would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kibibytes on Linux


def cpu_s() -> float:
    """CPU seconds this process has used (user + system, all its threads). Unlike wall time it
    does not grow while the process waits for cores another job holds, or is stopped."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def find_run(config: ml_collections.ConfigDict, name: str) -> dict:
    for run in config.runs:
        if run["name"] == name:
            return run
    raise ValueError(f"no run named {name!r}; the runs are: "
                     + ", ".join(r["name"] for r in config.runs))


# --- The phases (each runs in its own process) --------------------------------------------------

def train_phase(config: ml_collections.ConfigDict, run: dict, workdir: pathlib.Path) -> dict:
    """Trains the run (resuming), returns what its record keeps of training."""
    from lora_jax.train import train

    # A phase that resumes from a checkpoint times only its own part of the training.
    checkpoints = workdir / "checkpoints"
    resumed = checkpoints.is_dir() and any(checkpoints.iterdir())
    tick = time.perf_counter()
    result = train(sweep.run_config(config.base, run), workdir)
    return {"wall_s": round(time.perf_counter() - tick, 3), "cpu_s": round(cpu_s(), 3),
            "resumed": resumed, "peak_rss_bytes": peak_rss_bytes(),
            "trained_params": int(result.get("trained_params", 0)),
            "dev": {k: float(v) for k, v in result.items()
                    if k not in ("best", "trained_params", "lora_params", "environments")},
            "environments": result.get("environments", [])}


def untrained(run_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The run's base model as a config builds it untrained: plain LoRA, whose B starts at 0, on
    the run's model section (its quantization included)."""
    base = ml_collections.ConfigDict(run_config.to_dict())
    base.method.use = ("lora",)
    return base


def base_heldout_loss(run_cfg: ml_collections.ConfigDict, texts: Sequence[str],
                      out: pathlib.Path) -> dict:
    """The held-out loss of the run's untrained base, computed once per base model and texts
    (rows share it: every row but the quantized ones starts from the same model) and kept in
    OUT/heldout_base/<digest>.json."""
    from lora_jax.analysis import forgetting
    from lora_jax.training import setup

    config = untrained(run_cfg)
    key = json.dumps([config.model.to_dict(), config.data.max_len, list(texts)], sort_keys=True,
                     default=str)
    path = out / "heldout_base" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"
    if path.is_file():
        return json.loads(path.read_text())
    loss = forgetting.heldout_loss(setup.build(config), texts, config.data.eval_batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(loss) + "\n")
    return loss


def score_phase(config: ml_collections.ConfigDict, run: dict, workdir: pathlib.Path) -> dict:
    """Decodes and scores the run (see the module docstring); returns what its record keeps."""
    import jax

    from lora_jax import evaluate
    from lora_jax.analysis import forgetting, intruders
    from lora_jax.training import setup

    scoring, run_cfg = config.scoring, sweep.run_config(config.base, run)
    built = (evaluate.load_run(workdir, scoring.split) if run["train"]
             else setup.build(run_cfg))
    tick, cpu_tick = time.perf_counter(), cpu_s()
    lines, scores = evaluate.evaluate_generation(built, scoring.split, scoring.max_examples,
                                                 scoring.decode_batch_size)
    decode_s, decode_cpu_s = time.perf_counter() - tick, cpu_s() - cpu_tick
    (workdir / f"predictions-{scoring.split}.txt").write_text("".join(f"{x}\n" for x in lines))
    texts = forgetting.read_heldout(tuple(scoring.heldout), run_cfg.data.data_dir,
                                    scoring.max_heldout)
    tick = time.perf_counter()
    after = forgetting.heldout_loss(built, texts, run_cfg.data.eval_batch_size)
    heldout_s = time.perf_counter() - tick
    before = after if not run["train"] else base_heldout_loss(run_cfg, texts, workdir.parent)
    record = {"scores": {k: float(v) for k, v in scores.items()},
              "decode_s": round(decode_s, 3), "decode_cpu_s": round(decode_cpu_s, 3),
              "heldout_s": round(heldout_s, 3),
              "outputs": len(lines),
              "mean_output_words": sum(len(x.split()) for x in lines) / max(len(lines), 1),
              "heldout": after, "heldout_base": before,
              "forgetting": after["loss"] - before["loss"]}
    if run["method"] in scoring.intruder_rows:
        base_params = setup.base(run_cfg).params
        tuned = built.stack.merge(*jax.device_get((built.frozen, built.trainable)))
        record["intruders"] = intruders.intruders_per_matrix(base_params, tuned)
    record["peak_rss_bytes"] = peak_rss_bytes()
    return record


def run_phase(config_arg: str, out: pathlib.Path, name: str, phase: str) -> None:
    """The body of one phase's process: runs it and writes its JSON file."""
    config = load_config(config_arg)
    run = find_run(config, name)
    workdir = out / name
    workdir.mkdir(parents=True, exist_ok=True)
    result = (train_phase if phase == "train" else score_phase)(config, run, workdir)
    path = workdir / (TRAIN_PHASE if phase == "train" else SCORE_PHASE)
    path.write_text(json.dumps(result, indent=1) + "\n")


# --- The driver ---------------------------------------------------------------------------------

def wait_while_paused(out: pathlib.Path) -> None:
    """Holds the next phase while OUT/PAUSE exists, so that another heavy job (the test suite)
    can have the cores without stretching a phase's recorded wall time."""
    flag = out / PAUSE
    if flag.exists():
        print(f"paused: remove {flag} to go on", flush=True)
    while flag.exists():
        time.sleep(10)


def spawn_phase(config_arg: str, out: pathlib.Path, name: str, phase: str) -> dict:
    """Runs one phase in a child process unless its file exists; returns its result."""
    path = out / name / (TRAIN_PHASE if phase == "train" else SCORE_PHASE)
    if not path.is_file():
        wait_while_paused(out)
        print(f"{phase}: {name}", flush=True)
        command = [sys.executable, "-m", "experiments.table3", "--config", config_arg,
                   "--out", str(out), "--phase", phase, "--run", name]
        status = subprocess.run(command).returncode
        if status != 0:
            raise SystemExit(f"table3: the {phase} phase of {name} failed (exit {status}); "
                             f"rerun to resume it")
    return json.loads(path.read_text())


def make_record(config: ml_collections.ConfigDict, run: dict, trained: dict | None,
                scored: dict) -> dict:
    """A finished run's record: its settings, then what its phases measured."""
    base = config.base
    return {"name": run["name"], "method": run["method"], "seed": run["seed"],
            "steps": base.train.max_steps if run["train"] else 0,
            "batch_size": base.data.batch_size, "beam": base.generate.beam_size,
            "split": config.scoring.split,
            "trained_params": trained["trained_params"] if trained else 0,
            "train_wall_s": trained["wall_s"] if trained else 0.0,
            "train_cpu_s": trained.get("cpu_s") if trained else 0.0,
            "train_resumed": trained.get("resumed", False) if trained else False,
            "train_peak_rss_bytes": trained["peak_rss_bytes"] if trained else None,
            "dev": trained["dev"] if trained else {},
            **{k: v for k, v in scored.items() if k != "peak_rss_bytes"},
            "score_peak_rss_bytes": scored["peak_rss_bytes"],
            "environments": trained["environments"] if trained else []}


def table3(config_arg: str, out: pathlib.Path, records: pathlib.Path | None,
           only: str | None = None) -> list[dict]:
    """Runs (or skips) every run matching `only`; returns the records of the finished ones."""
    config = load_config(config_arg)
    runs = [r for r in config.runs if only is None or re.search(only, r["name"])]
    if not runs:
        raise ValueError(f"--only {only!r} matches no run; the runs are: "
                         + ", ".join(r["name"] for r in config.runs))
    out.mkdir(parents=True, exist_ok=True)
    if records is not None:
        records.mkdir(parents=True, exist_ok=True)
    finished = []
    for run in runs:
        kept = records / f"{run['name']}.json" if records is not None else None
        if kept is not None and kept.is_file():
            print(f"skipping {run['name']}: its record is {kept}", flush=True)
            finished.append(json.loads(kept.read_text()))
            continue
        trained = spawn_phase(config_arg, out, run["name"], "train") if run["train"] else None
        scored = spawn_phase(config_arg, out, run["name"], "score")
        record = make_record(config, run, trained, scored)
        text = json.dumps(record, indent=1) + "\n"
        (out / run["name"] / sweep.RECORD).write_text(text)
        if kept is not None:
            kept.write_text(text)
        finished.append(record)
    return finished


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/table3.py",
                        help="e.g. configs/table3.py:seeds=1,steps=50")
    parser.add_argument("--out", required=True, type=pathlib.Path, help="run directories")
    parser.add_argument("--records", type=pathlib.Path,
                        help="keep each finished run's record here; skip the runs recorded here")
    parser.add_argument("--only", help="only the runs whose name matches this regex")
    parser.add_argument("--phase", choices=("train", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.phase:
        run_phase(args.config, args.out, args.run, args.phase)
    else:
        table3(args.config, args.out, args.records, args.only)


if __name__ == "__main__":
    main()
