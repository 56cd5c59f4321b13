"""Evaluate a training run's adapters: E2E generation scores or GLUE dev metrics.

    python -m lora_jax.evaluate --workdir runs/e2e [--split dev|test]
    python -m lora_jax.evaluate --workdir runs/quickstart

Reads the run's `config.json` and its exported `adapter/` (PEFT format), rebuilds the same base
model, and writes into the workdir:
  - E2E: `predictions[-<split>].txt` (one generated line per MR, in file order; beam search with
    the config's `generate` settings, adapters merged) and `scores[-<split>].json` (BLEU, NIST,
    METEOR, ROUGE-L, CIDEr as the official E2E script computes them).
  - GLUE and instruct: `scores[-dev].json` with the task's dev metrics (an LM's: loss and
    perplexity).
The task's registry entry (`lora_jax.data.tasks.TASKS`) says which of the two applies.
"""

from __future__ import annotations

import json
import logging
import pathlib
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags

from lora_jax.training import evaluation, fingerprints, setup
from lora_jax import generate
from lora_jax.data.tasks import task_entry
from lora_jax.errors import RunError, WorkdirError
from lora_jax.json_files import read_json_object
from lora_jax.training.fingerprints import FILE_NAME

FLAGS = flags.FLAGS


def load_run(workdir: pathlib.Path, split: str = "dev") -> setup.Run:
    """A finished run: the base model its config.json rebuilds, with its exported adapter/.

    Raises:
      WorkdirError: the base checkpoint, tokenizer or data files now differ from those the run
        trained on (its inputs.json), e.g. LORA_JAX_DATA_DIR points elsewhere.
    """
    path = workdir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{workdir} has no config.json: is it a lora_jax.train workdir?")
    config = ml_collections.ConfigDict(read_json_object(path, what="run config"))
    current = check_inputs(workdir, config, split)
    adapter = workdir / "adapter"
    if not adapter.is_dir():
        raise FileNotFoundError(f"{adapter} does not exist: the run has not finished training")
    devices = jax.device_count()
    if any(n != -1 and devices % n for n in (config.mesh.data, config.mesh.fsdp)):
        config.mesh.data, config.mesh.fsdp = -1, 1  # trained on another machine: split the batch
    return setup.build(config, export=adapter, base_record=current["base"])


def check_inputs(workdir: pathlib.Path, config: ml_collections.ConfigDict,
                 split: str) -> dict:
    """Refuses to evaluate on another base, tokenizer or data than the run trained on; returns
    the record of what evaluation reads (`fingerprints.run_inputs`).

    Compared: every base and tokenizer file, and the data files both read (the E2E test split is
    new to evaluation). A run from before inputs were recorded is evaluated with a warning.
    """
    path = workdir / FILE_NAME
    # A split the task has no public labels for is refused later; dev is what could be read.
    splits = (split,) if split in task_entry(config.data.task).eval_splits else ("dev",)
    current = fingerprints.run_inputs(config, splits=splits)
    if not path.is_file():
        logging.warning("%s has no %s: the base and data cannot be checked", workdir, FILE_NAME)
        return current
    recorded = read_json_object(path, what="record of a run's inputs")
    differences = fingerprints.differences(recorded, current, only_common_files=True)
    if differences:
        raise WorkdirError(f"{workdir} was trained on other inputs than these ({path}); its "
                           "scores here would describe neither. Differences:\n  "
                           + "\n  ".join(differences))
    return current


def stop_ids(run: setup.Run) -> tuple[int, ...]:
    """The ids that end a generated text: the family's (GPT-2's), else the tokenizer's EOS.

    Raises:
      ValueError: neither the family nor the tokenizer names one.
    """
    if run.family.stop_ids:
        return tuple(run.family.stop_ids)
    # Llama-family vocabularies differ from checkpoint to checkpoint: their tokenizer knows.
    eos = getattr(run.tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError(f"{run.family.model_type} has no stop ids and its tokenizer no "
                         "eos_token_id: generation would never end")
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def evaluate_generation(run: setup.Run, split: str, max_examples: int,
                        batch_size: int) -> tuple[list[str], dict[str, float]]:
    """Beam-searches one output per source of `split` (E2E: per MR); returns the lines and their
    scores (E2E's five), as the task's registry entry (`data.tasks.Generation`) says.

    Mergeable methods (LoRA, BitFit, FT) are folded into the weights first (no added latency);
    the others (adapters, prefixes) run kept apart.
    """
    config, tokenizer = run.config, run.tokenizer
    generation = task_entry(config.data.task).generation
    groups = generation.references(config.data, split)
    if max_examples:
        groups = groups[:max_examples]
    frozen, trainable = jax.device_get((run.frozen, run.trainable))
    if run.stack.mergeable:
        apply_fn, params = run.model.apply, {"params": run.stack.merge(frozen, trainable)}
    else:
        adapted = run.stack.adapt(run.model.apply)
        apply_fn, params = (lambda p, *a, **k: adapted(p[0], p[1], *a, **k), (frozen, trainable))
    g = config.generate
    vocab_size = run.vocab_size
    prompts = [run.stack.prepare_prompt(generation.prompt(source, tokenizer), vocab_size)
               for source, _ in groups]
    outputs = generate.beam_search(
        apply_fn, params, prompts, num_beams=g.beam_size,
        length_penalty=g.length_penalty, no_repeat_ngram_size=g.no_repeat_ngram_size,
        max_new_tokens=g.max_new_tokens, eos_ids=(stop := stop_ids(run)),
        pad_id=stop[0], batch_size=batch_size)
    lines = [" ".join(tokenizer.decode(ids, skip_special_tokens=True).split()) for ids in outputs]
    return lines, generation.score([refs for _, refs in groups], lines)


def evaluate_metrics(run: setup.Run, max_examples: int) -> dict[str, float]:
    """The task's dev metrics (GLUE's, or an LM's loss and perplexity), as the trainer computes
    them."""
    data = ml_collections.ConfigDict(run.config.data.to_dict())
    if max_examples:
        data.max_eval_examples = max_examples
    task = run.task(data, with_train=False)
    return evaluation.evaluate(task, run.eval_step(task.kind), run.frozen, run.trainable,
                               run.mesh, run.config.data.eval_batch_size)


def main(argv: list[str]) -> None:
    del argv
    if FLAGS.workdir is None:
        raise app.UsageError("--workdir is required")
    workdir = pathlib.Path(FLAGS.workdir)
    try:
        run = load_run(workdir, FLAGS.split)
    except (RunError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 1))
    suffix = "" if FLAGS.split == "dev" else f"-{FLAGS.split}"
    entry = task_entry(run.config.data.task)
    if FLAGS.split not in entry.eval_splits:
        raise app.UsageError(f"data.task {run.config.data.task!r} is evaluated on "
                             f"{', '.join(entry.eval_splits)} (GLUE test labels are not "
                             "public): use --split dev")
    if entry.generation is not None:
        lines, scores = evaluate_generation(run, FLAGS.split, FLAGS.max_examples,
                                            FLAGS.batch_size)
        (workdir / f"predictions{suffix}.txt").write_text("".join(line + "\n" for line in lines))
    else:
        scores = evaluate_metrics(run, FLAGS.max_examples)
    scores = {k: float(v) for k, v in scores.items() if np.isscalar(v)}
    (workdir / f"scores{suffix}.json").write_text(json.dumps(scores, indent=2) + "\n")
    print(json.dumps(scores))


def define_flags() -> None:
    """The command line; defined only when run as a program (see train.define_flags)."""
    flags.DEFINE_string("workdir", None, "A training run's workdir (config.json + adapter/).")
    flags.DEFINE_enum("split", "dev", ["dev", "test"], "Which split to evaluate (E2E has both).")
    flags.DEFINE_integer("max_examples", 0, "Evaluate only the first N MRs / examples (0: all).")
    flags.DEFINE_integer("batch_size", 16, "Prompts decoded together.")


if __name__ == "__main__":
    define_flags()
    app.run(main)
