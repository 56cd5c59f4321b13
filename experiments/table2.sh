#!/usr/bin/env bash
# Table 2 in miniature: the methods study on four GLUE tasks with the real all-MiniLM-L6-v2,
# 3 seeds per cell. Resumable: rerun the same command and finished runs are skipped, an
# unfinished one resumes from its checkpoint. Every finished run's record is also kept in
# experiments/results/table2/records/<task>/ (committed), so the sweep resumes from those on a
# machine that has lost OUT_DIR. Usage: bash experiments/table2.sh [OUT_DIR]
# TASKS (e.g. TASKS=mrpc:300) reruns some tasks only; RECORDS elsewhere reruns them from scratch
# beside the committed records (a backfill, or a check that runs reproduce bit for bit).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/table2}
PY=${PY:-.venv/bin/python}
RECORDS=${RECORDS:-experiments/results/table2/records}
# FT, BitFit, Adapter^H, Adapter^P, LoRA, DoRA, PiSSA, VeRA, and LoRA / Adapter^P at the other's
# budget (configs/ablations.py MATCHED_BUDGET); AdapterDrop and LoRA+ are left out for time.
ONLY='^method=(full|bitfit|adapter_h|adapter_p|lora|dora|pissa|vera|lora_r64|adapter_p_r15),'
# Sized to about four hours of this 2-core machine (120 runs). Steps per task from LoRA probes
# (experiments/README.md): SST-2 learns in 250 steps; MRPC needs about 300 to leave the majority
# class (pairs, max length 128, cost about twice a single sentence's step); STS-B 300; CoLA's
# Matthews correlation stays 0 for 300 steps and reaches 0.13 at 600, so it gets 500.
for task_steps in ${TASKS:-sst2:250 mrpc:300 stsb:300 cola:500}; do
  task=${task_steps%%:*} steps=${task_steps##*:}
  # A task whose sweep fails (exit 1: a diverged run raises) does not keep the others from
  # running; an interrupt (SIGINT, SIGTERM: 130, 143) stops the whole script.
  status=0
  "$PY" -m experiments.sweep --only "$ONLY" \
    --config "configs/ablations.py:study=methods,task=$task,seeds=3,steps=$steps" \
    --out "$OUT/$task" --records "$RECORDS/$task" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "table2.sh: the $task sweep stopped (exit $status); see above" >&2
    [ "$status" -eq 1 ] || exit "$status"
  fi
done
