#!/usr/bin/env bash
# Wheels the device machine's image lacks (its python3 already has jax with CUDA, flax, optax,
# orbax, torch, transformers and peft; /work/.library/device/KINDS.md), downloaded here into
# .whl/ (git-ignored) for `run` to carry. lora_jax imports ml_collections at the top of its
# config and training modules; the quantized stage's PEFT case needs bitsandbytes (43 MB, under
# the tool's 64 MiB carry).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 \
  --platform any -d .whl \
  "ml_collections==$("$PY" -c 'import importlib.metadata as m; print(m.version("ml_collections"))')" \
  "bitsandbytes==$("$PY" -c 'import importlib.metadata as m; print(m.version("bitsandbytes"))')"
ls -l .whl
