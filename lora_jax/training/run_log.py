"""What a run writes beside its checkpoints: metrics.jsonl, TensorBoard events and a progress
bar (config.json and inputs.json are the workdir's, see workdir.py). Only process 0 writes; the
others keep the same object, silent."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import tqdm

from lora_jax.training import environment


class RunLog:
    """Progress bar, `metrics.jsonl` (one JSON object per line) and TensorBoard events.

    Nothing is written before `start`: a run that fails while setting up leaves no trace.
    """

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        self.workdir = workdir
        self.metrics_path = workdir / "metrics.jsonl"
        self._bar = None
        self._writer = None

    def start(self, step: int) -> None:
        """Opens the TensorBoard writer and records where the steps from `step` on run (an
        'environment' record: `lora_jax.training.environment`); a resumed run (step > 0) first
        drops the records past `step` (written after the checkpoint it resumes from, and about
        to be written again)."""
        if not self.enabled:
            return
        if step > 0:
            kept = [r for r in self._records() if r["step"] <= step]
            self.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        from tensorboardX import SummaryWriter

        self._writer = SummaryWriter(str(self.workdir / "tensorboard"))
        # Each start, not only the first: a run may resume on another machine, and is then no
        # longer bit-identical to an uninterrupted run on either.
        here = environment.describe()
        before = self.environments()
        if before and before[-1] != here:
            self.info(f"note: resuming at step {step} on another environment than the run's "
                      "last start; its numbers will not be bit-identical to an uninterrupted "
                      "run's: " + "; ".join(environment.differences(before[-1], here)))
        self._append({"step": step, "split": "environment", **here})

    def environments(self) -> list[dict[str, Any]]:
        """The distinct environments the run's steps ran in, first first."""
        found = []
        for r in self._records() if self.enabled else []:
            if r["split"] == "environment":
                described = {k: v for k, v in r.items() if k not in ("step", "split")}
                if described not in found:
                    found.append(described)
        return found

    def _records(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line]

    def _append(self, record: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in record.items():
            if name not in ("step", "split") and isinstance(value, (int, float)):
                self._writer.add_scalar(f"{record['split']}/{name}", value, record["step"])

    def info(self, message: str) -> None:
        if self.enabled:
            tqdm.tqdm.write(message)

    def train(self, steps: list[tuple[int, float, float]], tokens_per_s: float,
              total: int) -> None:
        """Records (step, loss, lr) for each step since the last call; moves the progress bar
        (which shows the ETA) once, to the last of them."""
        if not self.enabled or not steps:
            return
        if self._bar is None:
            self._bar = tqdm.tqdm(total=total, initial=steps[0][0] - 1, unit="step",
                                  dynamic_ncols=True)
        for step, loss, lr in steps:
            self._append({"step": step, "split": "train", "loss": loss, "lr": lr,
                          "tokens_per_s": tokens_per_s})
        step, loss, lr = steps[-1]
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}",
                              refresh=False)
        self._bar.update(step - self._bar.n)

    def compile(self, step: int, figures: dict[str, float | int]) -> None:
        """Records what compiling cost the run so far (`CompileClock.record`, and the time to
        the first step) at `step`, and says it."""
        if self.enabled:
            self._append({"step": step, "split": "compile", **figures})
            self.info(f"compiling: {figures['programs_compiled']} programs compiled and "
                      f"{figures['cache_hits']} read from the cache in {figures['compile_s']:.1f} "
                      f"s; first step done {figures['first_step_s']:.1f} s after the run started")

    def best(self) -> dict[str, Any]:
        """The best evaluation recorded so far (survives a resume)."""
        evals = [r for r in self._records() if r["split"] == "eval"] if self.enabled else []
        best = {"step": None, "metric": None, "value": None}
        for r in evals:
            best = self._better(best, r)
        return best

    @staticmethod
    def _better(best: dict, record: dict) -> dict:
        metric, value = record["main_metric"], record[record["main_metric"]]
        higher = record["higher_is_better"]
        if not math.isfinite(value):  # a NaN metric compares False with everything: never best
            return best
        if best["value"] is None or (value > best["value"] if higher else value < best["value"]):
            return {"step": record["step"], "metric": metric, "value": value}
        return best

    def eval(self, step: int, metrics: dict[str, float], main_metric: str,
             higher_is_better: bool) -> dict[str, Any]:
        """Records an evaluation; returns the best one so far."""
        record = {"step": step, "split": "eval", **metrics, "main_metric": main_metric,
                  "higher_is_better": higher_is_better}
        best = self._better(self.best(), record) if self.enabled else {}
        if self.enabled:
            self._append(record)
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            self.info(f"step {step}: eval {shown}")
        return best

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
