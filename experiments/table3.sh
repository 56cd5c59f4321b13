#!/usr/bin/env bash
# Table 3 in miniature: E2E NLG on the real SmolLM2-135M-Instruct, every method of the paper's
# Table 3 and today's (zero-shot floor, FT, LoRA on Wq/Wv, LoRA on every linear layer, QLoRA
# over nf4 and over the GGUF file's Q4_1, DoRA, Adapter^L, Adapter^H, PreLayer, PreEmbed), each
# decoded on the 630 test MRs and scored with the official E2E metrics, with forgetting (held-out
# loss) and intruder dimensions. Resumable: rerun the same command; a finished run is skipped, an
# unfinished one resumes from its checkpoint. Every finished run's record is kept in
# experiments/results/table3/records/ (committed), so the table resumes on a machine that has
# lost OUT_DIR, and the table and figures are rebuilt from them at the end.
# Usage: bash experiments/table3.sh [OUT_DIR]; ONLY=REGEX runs some runs only (e.g.
# ONLY='seed=0' for one seed of every row); CONFIG=configs/table3.py:seeds=1 for other settings.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/table3}
PY=${PY:-.venv/bin/python}
RECORDS=${RECORDS:-experiments/results/table3/records}
"$PY" -m experiments.table3 --config "${CONFIG:-configs/table3.py}" --out "$OUT" \
  --records "$RECORDS" ${ONLY:+--only "$ONLY"}
"$PY" -m experiments.table3_report "$RECORDS" --out experiments/results/table3
