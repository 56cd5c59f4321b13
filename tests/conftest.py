"""Fixtures shared by the parity tests: right-padded batches, perturbed HF weights, the data dir."""

import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# The tests compile far more than they compute: a tiny model's train step takes seconds to compile
# and milliseconds to run. LLVM's optimisations of the compiled CPU code would save milliseconds
# and cost about half of each compile, so they are off here (and in every child process, which
# inherits the environment; `xla_flags` keeps the setting where a test sets its own flags).
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(*flags: str) -> str:
    """XLA_FLAGS for a child process of the tests: `flags` and the suite's fast compilation."""
    return " ".join([FAST_COMPILE, *flags])


os.environ["XLA_FLAGS"] = xla_flags(*os.environ.get("XLA_FLAGS", "").split())

# One persistent compilation cache for the session, in JAX's own variable, which every run's
# `compilation_cache='auto'` honours: many tests train the same tiny models, and what one compiled
# the next reads back (the cache keys a program by its HLO, flags and versions, so what runs is
# the same either way). The threshold is lowered because fast compilation puts many programs
# under JAX's default of a second.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    SESSION_CACHE = tempfile.mkdtemp(prefix="lora_jax_tests_jit_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_CACHE
else:
    SESSION_CACHE = None  # the user's own cache: kept
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")


def _bitsandbytes_generic_dequantize() -> bool:
    """On an AVX512 CPU, bitsandbytes (0.50.1 and 0.50.2 measured) dequantizes 4-bit weights with
    a native kernel that misreads blocks running across rows (a last dimension under the block
    size, e.g. (64, 48)): its result disagrees with its own codes and absmax, on which every
    other bitsandbytes path agrees. The references of the tests (bitsandbytes, and PEFT's LoftQ
    through it) take bitsandbytes' generic kernel there, the one it uses itself for odd shapes:
    its format's definition (`tests/test_quant_numerics.py` checks it against codes x absmax).
    Returns whether the kernel was replaced."""
    import torch

    if torch.backends.cpu.get_cpu_capability() != "AVX512":
        return False
    try:
        from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
        from bitsandbytes.backends.utils import _get_4bit_code
    except ImportError:
        return False

    def generic(A, absmax, blocksize, quant_type, shape, dtype):
        codes = A.view(torch.uint8) if A.dtype != torch.uint8 else A
        return _dequantize_4bit_compute(codes.reshape(-1), absmax,
                                        _get_4bit_code(quant_type, codes.device), blocksize,
                                        shape, dtype)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that it overrides the native kernel
        torch.library.register_kernel("bitsandbytes::dequantize_4bit", "cpu", generic)
    return True


BITSANDBYTES_GENERIC_DEQUANTIZE = _bitsandbytes_generic_dequantize()


def pytest_sessionfinish(session, exitstatus):
    if SESSION_CACHE:
        shutil.rmtree(SESSION_CACHE, ignore_errors=True)


@pytest.fixture
def padded_batch():
    """Returns make(vocab_size, pad_id=0) -> (input_ids, attention_mask), int64 [3, 12].

    Right padding: row 0 is full, rows 1 and 2 end in 3 and 7 pad tokens. Real tokens avoid
    `pad_id`, so RoBERTa's padding-aware positions see exactly the masked tail as padding.
    """

    def make(vocab_size: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(0)
        lengths = np.array([12, 9, 5])
        mask = (np.arange(12)[None, :] < lengths[:, None]).astype(np.int64)
        ids = rng.integers(pad_id + 1, vocab_size, size=mask.shape)
        return np.where(mask == 1, ids, pad_id), mask

    return make


@pytest.fixture
def perturb_weights():
    """Returns perturb(torch_model): adds noise to every parameter, in place.

    HF initialises LayerNorm to (1, 0) and biases to 0, which would hide a mix-up between scale and
    bias or a missing bias; noise makes every tensor matter.
    """
    import torch

    def perturb(model, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
        return model.eval()

    return perturb


@pytest.fixture
def data_dir() -> pathlib.Path:
    """The shared data dir: $LORA_JAX_DATA_DIR, else <repo>/../shared/data; skips if absent."""
    path = pathlib.Path(os.environ.get("LORA_JAX_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        pytest.skip(f"data directory {path} not found (set LORA_JAX_DATA_DIR)")
    return path


def dense_calls(model, params, *args) -> tuple[set[str], set[str]]:
    """(paths of the nn.Dense modules a forward pass calls, paths of the modules owning a kernel).

    LoRA intercepts nn.Dense.__call__ by module path, so the two sets must be equal.
    """
    import flax.linen as nn
    from flax import traverse_util

    seen = set()

    def record(next_fun, call_args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.add("/".join(context.module.path))
        return next_fun(*call_args, **kwargs)

    with nn.intercept_methods(record):
        model.apply({"params": params}, *args)
    kernels = {"/".join(p[:-1]) for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
    return seen, kernels


def calibrated(stack, apply_fn, params, vocab_size: int = 50, length: int = 8):
    """`stack` as the trainer holds it before step 1: a data-driven start (CorDA, LoRA-GA, EVA,
    PreLayer's) calibrated, here on random batches (rows of `length` tokens) with the mean
    squared logit as loss."""
    import jax

    from lora_jax.methods import calibration

    count = stack.calibration()
    if not count:
        return stack

    def forward(params, batch):
        return apply_fn({"params": params}, batch["input_ids"],
                        attention_mask=batch["attention_mask"]).logits

    def hidden_states(params, batch):
        return apply_fn({"params": params}, batch["input_ids"],
                        attention_mask=batch["attention_mask"],
                        output_hidden_states=True).hidden_states

    return stack.calibrated(calibration.random_batches(forward, params, count, vocab_size,
                                                       jax.random.key(9),
                                                       hidden_states=hidden_states,
                                                       length=length))


def tiny_config(**overrides):
    """configs/glue.py's SST-2 with a random 2-layer BERT on 256 real rows: a run in seconds.

    Overrides are dotted field names, e.g. tiny_config(**{"train.max_steps": 4}).
    """
    from lora_jax.config import load_config, set_dotted

    c = load_config(str(REPO_ROOT / "configs/glue.py") + ":task=sst2,model=tiny")
    c.data.max_train_examples = 256
    c.data.max_eval_examples = 64
    c.data.max_len = 32
    c.data.batch_size = 16
    c.data.eval_batch_size = 32
    c.train.max_steps = 8
    c.train.log_every = 1
    c.train.eval_every = 4
    c.train.checkpoint_every = 2
    c.train.keep_checkpoints = 2
    for dotted, value in overrides.items():
        set_dotted(c, dotted, value)
    return c


def save_tiny_hf_gpt2(directory, n_positions: int = 32):
    """A random 2-layer GPT-2 (width 32, vocabulary 97, no dropout) saved with transformers, the
    reference model of the parity tests; returns its transformers config."""
    import torch
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97,
                                     n_positions=n_positions, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return config


@pytest.fixture(scope="session")
def uninterrupted_run(tmp_path_factory):
    """The workdir of one tiny CLI run with test_train.INTERRUPT_FLAGS, run to the end: what the
    interrupted-and-resumed runs must equal bit for bit."""
    from test_train import INTERRUPT_FLAGS, run_to_the_end

    workdir = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_to_the_end(workdir, *INTERRUPT_FLAGS)
    return workdir
