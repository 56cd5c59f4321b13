"""Instruction data: the Alpaca-layout reader, its errors, the prompt templates, the loss mask on
the response, the 'instruct' task and config, and a tiny training run end to end."""

import json
import logging
import math
import pathlib

import numpy as np
import pytest

from lora_jax.config import load_config, set_dotted
from lora_jax.config_checks import check_config
from lora_jax.data import instruct, tasks, tokenizers
from lora_jax.errors import ConfigError, FileFormatError

REPO = pathlib.Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"

# A chat template in the style of Zephyr / TinyLlama-Chat: the assistant turn ends with the EOS.
# (Jinja's trim_blocks, which transformers sets, eats a newline written after a block tag, hence
# the newlines as string literals.)
CHAT = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")


@pytest.fixture
def tokenizer(data_dir):
    return tokenizers.load("gpt2", data_dir=data_dir)


def records(n: int) -> list[dict]:
    """n well-formed records; every third has an input."""
    return [{"instruction": f"Repeat the word number {i}.",
             **({"input": f"word {i}"} if i % 3 == 0 else {}),
             "output": f"Word {i}, word {i}."} for i in range(n)]


def write_jsonl(path: pathlib.Path, lines: list) -> pathlib.Path:
    """Each item is a JSON value (dumped) or a str (written as is, e.g. '' or broken JSON)."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def masked_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if m])


def unmasked_text(tokenizer, row: dict) -> str:
    return tokenizer.decode([t for t, m in zip(row["input_ids"], row["loss_mask"]) if not m])


# --- Reading ----------------------------------------------------------------------------------

def test_json_and_jsonl_read_alike_with_optional_input(tmp_path):
    data = [{"instruction": "Name a colour.", "output": "Blue."},
            {"instruction": "Sum.", "input": "2 + 3", "output": "5"},
            {"instruction": "Greet.", "input": "", "output": "Hello."},
            {"instruction": "Wave.", "input": None, "output": "*waves*", "id": 7}]  # extra key
    (tmp_path / "a.json").write_text(json.dumps(data, indent=2))
    write_jsonl(tmp_path / "a.jsonl", [data[0], "", data[1], "   ", data[2], data[3]])
    expected = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
                {"instruction": "Sum.", "input": "2 + 3", "output": "5"},
                {"instruction": "Greet.", "input": "", "output": "Hello."},
                {"instruction": "Wave.", "input": "", "output": "*waves*"}]
    assert instruct.read_instructions(tmp_path / "a.json") == expected
    assert instruct.read_instructions(str(tmp_path / "a.jsonl")) == expected


GOOD = {"instruction": "Say yes.", "output": "Yes."}
MALFORMED = [
    ('{"instruction": "x", "output": ', "not valid JSON"),
    (["instruction", "output"], "expected a JSON object with 'instruction' and 'output', got a "
                                "JSON array"),
    ({"output": "y"}, "missing 'instruction'"),
    ({"instruction": "x", "response": "y"}, "missing 'output'"),
    ({"instruction": 3, "output": "y"}, "'instruction' must be a string, got a JSON number"),
    ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string, got a JSON "
                                                         "array"),
    ({"instruction": "x", "output": None}, "'output' must be a string, got a JSON null"),
    ({"instruction": "x", "output": ""}, "'output' is empty"),
    ({"instruction": " \n", "output": "y"}, "'instruction' is empty"),
]


@pytest.mark.parametrize("bad,message", MALFORMED)
def test_a_malformed_jsonl_record_names_file_and_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, "", bad, GOOD])
    with pytest.raises(FileFormatError) as err:
        instruct.read_instructions(path)
    assert str(err.value).startswith(f"{path}: line 3: ")  # the blank line 2 counts
    assert message in str(err.value)


@pytest.mark.parametrize("bad,message", [m for m in MALFORMED if not isinstance(m[0], str)])
def test_a_malformed_json_record_names_file_and_record(tmp_path, bad, message):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, bad]))
    with pytest.raises(FileFormatError) as err:
        instruct.read_instructions(path)
    assert str(err.value).startswith(f"{path}: record 3: ")
    assert message in str(err.value)


def test_a_json_file_that_is_not_an_array_of_objects(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"instruction": "x", "output": "y"},\n  {"instruction": }\n]')
    with pytest.raises(FileFormatError, match=rf"^{broken}:3:\d+: not valid JSON"):
        instruct.read_instructions(broken)
    one_object = tmp_path / "one.json"
    one_object.write_text(json.dumps(GOOD))
    with pytest.raises(FileFormatError, match="expected a JSON array of objects, got a JSON "
                                              "object; a file of one object per line is .jsonl"):
        instruct.read_instructions(one_object)


def test_skip_mode_drops_and_counts_the_malformed_records(tmp_path, caplog):
    path = write_jsonl(tmp_path / "data.jsonl",
                       [GOOD, "{oops", GOOD, "", {"instruction": "x"}, GOOD])
    with caplog.at_level(logging.WARNING, logger="lora_jax.data.instruct"):
        got, report = instruct.read_instructions_with_report(path, on_malformed="skip")
    assert len(got) == 3
    assert report == instruct.ReadReport(str(path), 3, "line", (2, 5))
    assert f"{path}: skipped 2 malformed records (first at line 2)" in caplog.text


def test_a_file_without_valid_records_is_an_error(tmp_path):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(FileFormatError, match=rf"^{empty}: no instruction records"):
        instruct.read_instructions(empty)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{oops", {"output": "y"}])
    with pytest.raises(FileFormatError, match=r"no instruction records \(2 malformed, skipped\)"):
        instruct.read_instructions(bad, on_malformed="skip")
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(FileFormatError, match="no instruction records"):
        instruct.read_instructions(tmp_path / "empty.json")


def test_a_missing_file_or_another_suffix(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.jsonl")):
        instruct.read_instructions(tmp_path / "nope.jsonl")
    tsv = tmp_path / "data.tsv"
    tsv.write_text("instruction\toutput\n")
    with pytest.raises(FileFormatError, match=r"expected a \.json file .* got suffix '\.tsv'"):
        instruct.read_instructions(tsv)
    # A .csv is read as an E2E NLG file (mr,ref), and another CSV is refused naming its header.
    csv = tmp_path / "data.csv"
    csv.write_text("instruction,output\n")
    with pytest.raises(FileFormatError, match=r"data\.csv:1: expected the header 'mr,ref'"):
        instruct.read_instructions(csv)


def test_an_e2e_csv_reads_as_instructions(data_dir):
    """Each row: the MR as the instruction, the reference as the output, in file order."""
    from lora_jax.data import e2e

    records = instruct.read_instructions(data_dir / "e2e" / "devset.csv")
    pairs = e2e.read_e2e("dev", data_dir=data_dir)
    assert [(r["instruction"], r["input"], r["output"]) for r in records] == [
        (mr, "", ref) for mr, ref in pairs]


def test_a_byte_that_is_not_utf8_names_file_and_record(tmp_path):
    """A Latin-1 byte in record 2 of a .json file and on line 2 of a .jsonl file: the error
    names the file and the record (it was a bare UnicodeDecodeError with a byte offset)."""
    data = [json.dumps(r) for r in records(3)]
    bad = data[1].replace("number 1", "num\xe9ro 1").encode("latin-1")
    assert b"\xe9" in bad
    (tmp_path / "a.json").write_bytes(b"[\n" + data[0].encode() + b",\n" + bad + b",\n"
                                      + data[2].encode() + b"\n]\n")
    with pytest.raises(FileFormatError, match=rf"{tmp_path / 'a.json'}:3:\d+: byte 0xe9 is not "
                                              r"UTF-8 \(record 2\)"):
        instruct.read_instructions(tmp_path / "a.json")
    (tmp_path / "a.jsonl").write_bytes(b"\n".join([data[0].encode(), bad, data[2].encode()]))
    with pytest.raises(FileFormatError, match=rf"{tmp_path / 'a.jsonl'}: line 2: byte 0xe9 at "
                                              r"column \d+ is not UTF-8"):
        instruct.read_instructions(tmp_path / "a.jsonl")
    kept = instruct.read_instructions(tmp_path / "a.jsonl", on_malformed="skip")
    assert [r["instruction"] for r in kept] == [records(3)[0]["instruction"],
                                                records(3)[2]["instruction"]]


def test_a_directory_as_the_instruction_file_says_it_is_a_directory(tmp_path, data_dir):
    """data.path naming a directory (here one called train.json): not "not found"."""
    from lora_jax.training import fingerprints

    folder = tmp_path / "train.json"
    folder.mkdir()
    with pytest.raises(FileFormatError, match=rf"{folder} is a directory"):
        instruct.read_instructions(folder)
    with pytest.raises(FileNotFoundError, match=rf"{folder} is a directory, where a data file "
                                                r"is expected"):
        fingerprints.data_inputs(instruct_config(folder, data_dir).data)


def test_the_hub_source_reads_through_datasets(monkeypatch):
    # Offline stand-in for `datasets`: what load_dataset was asked for, and rows as it yields.
    import sys
    import types

    calls = []
    rows = [{"instruction": "Hi.", "input": "", "output": "Hello."}, {"instruction": "Hi."}]

    def load_dataset(name, split):
        calls.append((name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(FileFormatError, match=r"^yahma/alpaca-cleaned\[train\]: row 2: missing "
                                              r"'output'"):
        instruct.read_instructions("yahma/alpaca-cleaned", source="hub")
    got = instruct.read_instructions("yahma/alpaca-cleaned", source="hub", split="test",
                                     on_malformed="skip")
    assert got == rows[:1] and calls[-1] == ("yahma/alpaca-cleaned", "test")


def test_hold_out_is_the_tail():
    data = records(30)
    train, held = instruct.hold_out(data, 0.1)
    assert held == data[27:] and train == data[:27]  # ceil(0.1 * 30) = 3, not 4
    assert instruct.hold_out(data, 0.01)[1] == data[29:]  # at least one
    assert len(instruct.hold_out(records(2), 0.9)[0]) == 1  # at least one left to train on
    with pytest.raises(ConfigError, match="data.eval_path"):
        instruct.hold_out(records(1), 0.5)


# --- Templates and the loss mask --------------------------------------------------------------

def test_alpaca_prompts_are_stanford_alpacas_text():
    with_input = {"instruction": "Translate.", "input": "Bonjour", "output": "Hello"}
    assert instruct.alpaca_prompt(with_input) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nBonjour\n\n### Response:")
    assert instruct.alpaca_prompt({**with_input, "input": ""}) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nTranslate.\n\n### Response:")


def test_alpaca_rows_learn_exactly_the_response_and_eos(tokenizer):
    data = records(6)
    rows = instruct.encode_instructions(data, tokenizer, max_len=256, template="alpaca")
    assert len(rows) == 6
    for record, row in zip(data, rows):
        assert masked_text(tokenizer, row) == record["output"] + EOS
        assert unmasked_text(tokenizer, row) == instruct.alpaca_prompt(record)
        # Prompt first, then the response: one 0 -> 1 step, and the row ends with the EOS.
        mask = row["loss_mask"]
        assert mask == sorted(mask) and row["input_ids"][-1] == tokenizer.eos_token_id
        assert row["input_ids"][0] != tokenizer.eos_token_id  # GPT-2: no BOS (= EOS) in front


def test_auto_is_alpaca_without_a_chat_template(tokenizer):
    data = records(2)
    assert (instruct.encode_instructions(data, tokenizer, 256)
            == instruct.encode_instructions(data, tokenizer, 256, template="alpaca"))
    with pytest.raises(ConfigError, match="template 'chat'.*chat_template is unset"):
        instruct.encode_instructions(data, tokenizer, 256, template="chat")


def test_a_bos_is_added_once_where_the_tokenizer_adds_one(data_dir):
    import transformers

    # GPT-2's files with add_bos_token: a tokenizer that, like Llama's, starts what it encodes
    # with its BOS (here <|endoftext|>, id 50256).
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(
        str(data_dir / "tokenizers" / "gpt2"), add_bos_token=True)
    assert tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id
    record = records(1)[0]
    [row] = instruct.encode_instructions([record], tokenizer, 256, template="alpaca")
    assert row["input_ids"][0] == tokenizer.bos_token_id != row["input_ids"][1]
    assert row["loss_mask"][0] == 0
    # A chat template that writes the BOS itself does not get a second one.
    tokenizer.chat_template = "{{ bos_token }}" + CHAT
    [row] = instruct.encode_instructions([record], tokenizer, 256, template="chat")
    assert row["input_ids"][0] == tokenizer.bos_token_id != row["input_ids"][1]


def test_chat_rows_learn_the_assistant_turn(tokenizer):
    tokenizer.chat_template = CHAT
    data = records(4)
    rows = instruct.encode_instructions(data, tokenizer, 256)  # auto: the chat template
    assert rows == instruct.encode_instructions(data, tokenizer, 256, template="chat")
    for record, row in zip(data, rows):
        user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        assert unmasked_text(tokenizer, row) == f"<|user|>\n{user}\n<|assistant|>\n"
        assert masked_text(tokenizer, row) == record["output"] + EOS  # the template's own EOS


def test_a_chat_template_without_eos_gets_one(tokenizer):
    tokenizer.chat_template = CHAT.replace("{{ eos_token }}", "{{ '\\n' }}")
    [row] = instruct.encode_instructions(records(1), tokenizer, 256)
    assert masked_text(tokenizer, row) == records(1)[0]["output"] + "\n" + EOS


def test_a_chat_template_whose_prompt_is_no_prefix_is_refused(tokenizer):
    # The generation prompt says 'ASSISTANT:', the rendered turn 'Assistant:'.
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + '\\n' }}"
        "{% else %}{{ 'Assistant: ' + m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    with pytest.raises(ConfigError, match=r"record 1: the chat template does not render the "
                                          r"prompt .* as a prefix .* data.template='alpaca'"):
        instruct.encode_instructions(records(2), tokenizer, 256)


def test_truncation_cuts_the_response_and_drops_prompt_only_rows(tokenizer, caplog):
    short = {"instruction": "Hi.", "input": "", "output": "one two three four five six seven"}
    long = {"instruction": "Hi " * 80, "input": "", "output": "Yes."}
    prompt_len = len(tokenizer(instruct.alpaca_prompt(short))["input_ids"])
    max_len = prompt_len + 3
    with caplog.at_level(logging.WARNING, logger="lora_jax.data.instruct"):
        rows = instruct.encode_instructions([short, long], tokenizer, max_len, template="alpaca")
    [row] = rows  # the long prompt fills max_len: nothing to learn, dropped
    assert "dropped 1 of 2 instruction records whose prompt fills max_len" in caplog.text
    assert len(row["input_ids"]) == max_len and sum(row["loss_mask"]) == 3
    assert masked_text(tokenizer, row) == "one two three"  # cut off: no EOS
    with pytest.raises(ConfigError, match="every one of the 1 instruction records .* raise "
                                          "data.max_len"):
        instruct.encode_instructions([long], tokenizer, max_len, template="alpaca")


# --- The task and the config ------------------------------------------------------------------

def instruct_config(path, data_dir, **fields):
    c = load_config(str(REPO / "configs/instruct.py") + ":model=tiny")
    c.data.path = str(path)
    c.data.data_dir = str(data_dir)
    for dotted, value in fields.items():
        set_dotted(c, dotted, value)
    return c


def test_the_task_holds_out_the_tail_or_reads_eval_path(tmp_path, data_dir, tokenizer):
    data = records(20)
    path = write_jsonl(tmp_path / "train.jsonl", data)
    c = instruct_config(path, data_dir, **{"data.eval_fraction": 0.25})
    task = tasks.build_task(c.data, tokenizer)
    assert (task.name, task.kind, task.main_metric) == ("instruct", "lm", "loss")
    assert task.pad_id == tokenizer.eos_token_id  # GPT-2 has no pad token
    assert (len(task.train), len(task.eval)) == (15, 5)
    assert task.eval == instruct.encode_instructions(data[15:], tokenizer, c.data.max_len)
    assert task.train == instruct.encode_instructions(data[:15], tokenizer, c.data.max_len)
    # max_train_examples / max_eval_examples cut each split; evaluation reads no training rows.
    c.data.max_train_examples, c.data.max_eval_examples = 4, 2
    limited = tasks.build_task(c.data, tokenizer)
    assert (len(limited.train), len(limited.eval)) == (4, 2)
    assert limited.eval == task.eval[:2]  # still the held-out tail, never training records
    assert tasks.build_task(c.data, tokenizer, with_train=False).train == []
    other = write_jsonl(tmp_path / "dev.jsonl", records(3))
    c.data.eval_path = str(other)
    c.data.max_eval_examples = 0
    task = tasks.build_task(c.data, tokenizer)
    assert (len(task.train), len(task.eval)) == (4, 3)
    c.data.packing = True
    assert tasks.build_task(c.data, tokenizer).packed_rows


@pytest.mark.parametrize("model", ["llama2-7b", "qwen2-0.5b", "tinyllama", "tiny"])
@pytest.mark.parametrize("method", ["lora", "dora", "lora_plus"])
def test_instruct_config_loads_and_checks(tmp_path, data_dir, model, method):
    c = load_config(str(REPO / "configs/instruct.py") + f":model={model},method={method}")
    c.data.path = str(tmp_path / "train.jsonl")
    check_config(c, device_count=1)
    assert (c.data.task, c.model.task) == ("instruct", None)
    section = c.method[c.method.use[0]]
    assert (section.rank, section.alpha, section.dropout) == (8, 32.0, 0.1)


def test_instruct_config_targets_the_four_attention_projections():
    import re

    c = load_config(str(REPO / "configs/instruct.py") + ":model=tiny")
    paths = [f"model/layers_0/{m}/kernel" for m in
             ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
              "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")] + ["lm_head/kernel"]
    hit = [p for p in paths if any(re.search(t, p) for t in c.method.lora.targets)]
    assert hit == paths[:4]
    assert (c.data.max_len, c.optim.lr, c.optim.warmup_steps, c.train.epochs) == (256, 3e-4, 100, 3)
    small = load_config(str(REPO / "configs/instruct.py") + ":model=qwen2-0.5b")
    assert small.data.batch_size // small.optim.grad_accum == 4 and small.data.batch_size == 128
    # 7B: FSDP over 8 devices splits each micro-batch, so it holds 8 rows (one per device).
    big = load_config(str(REPO / "configs/instruct.py") + ":model=llama2-7b")
    assert big.data.batch_size // big.optim.grad_accum == 8 and big.data.batch_size == 128


def test_instruct_config_errors_before_anything_runs(tmp_path, data_dir):
    c = load_config(str(REPO / "configs/instruct.py") + ":model=tiny")
    with pytest.raises(ConfigError, match=r"config.data.path = None: data.task 'instruct' "
                                          r"reads its records from data.path"):
        check_config(c, device_count=1)
    c.data.path = "train.jsonl"
    c.model.task = "classification"
    c.data.template = "chatml"
    c.data.eval_fraction = 0.0
    with pytest.raises(ConfigError) as err:
        check_config(c, device_count=1)
    message = str(err.value)
    assert "config.data.template = 'chatml': must be one of 'auto', 'alpaca', 'chat'" in message
    assert "config.data.eval_fraction = 0.0: must be a finite number in (0, 1)" in message
    c.data.template, c.data.eval_fraction = "auto", 0.05
    with pytest.raises(ConfigError, match="data.task 'instruct' trains a language model, which "
                                          "needs model.task None"):
        check_config(c, device_count=1)


# --- A tiny training run ----------------------------------------------------------------------

def _has_llama() -> bool:
    from lora_jax.models import FAMILIES

    return "llama" in FAMILIES


@pytest.mark.skipif(not _has_llama(), reason="the Llama model family is not in lora_jax.models")
def test_a_tiny_llama_learns_instructions_end_to_end(tmp_path, data_dir):
    from lora_jax.train import train

    path = write_jsonl(tmp_path / "alpaca.jsonl", records(16))
    c = instruct_config(path, data_dir, **{
        "data.eval_fraction": 0.25, "data.batch_size": 4, "data.eval_batch_size": 4,
        "data.max_len": 64, "optim.lr": 1e-2, "optim.warmup_steps": 1, "train.max_steps": 12,
        "train.log_every": 1, "train.eval_every": 6, "train.checkpoint_every": 6})
    workdir = tmp_path / "run"
    result = train(c, workdir)

    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    evals = [r for r in lines if r["split"] == "eval"]
    assert len(losses) == 12 and all(math.isfinite(x) for x in losses)
    # 12 training records in batches of 4: each epoch sees them all, so epoch means compare.
    assert sum(losses[-3:]) < sum(losses[:3])
    assert [r["step"] for r in evals] == [6, 12] and evals[1]["loss"] < evals[0]["loss"]
    assert math.isfinite(result["loss"]) and result["perplexity"] == pytest.approx(
        math.exp(result["loss"]), rel=1e-6)
    config = json.loads((workdir / "config.json").read_text())
    assert config["data"]["task"] == "instruct" and config["data"]["path"] == str(path)
    inputs = json.loads((workdir / "inputs.json").read_text())
    assert list(inputs["data"]["files"]) == ["alpaca.jsonl"]
    adapter = json.loads((workdir / "adapter" / "adapter_config.json").read_text())
    # PEFT's module names: model.layers.{i}.self_attn.{q,k,v,o}_proj, both layers.
    assert sorted(adapter["target_modules"]) == [f"model.layers.{i}.self_attn.{m}_proj"
                                                 for i in (0, 1) for m in "koqv"]
    assert (adapter["r"], adapter["lora_alpha"]) == (8, 32.0)
    assert (workdir / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not _has_llama(), reason="the Llama model family is not in lora_jax.models")
@pytest.mark.parametrize("overrides", [
    {"method.use": ("dora",)},
    {"method.use": ("adapter_h",), "method.adapter_h.bottleneck": 4},
    {"method.use": ("preembed",), "method.preembed.prefix": 3, "method.preembed.infix": 1},
    {"data.packing": True, "model.remat": True},
], ids=["dora", "adapter_h", "preembed", "lora_packed_remat"])
def test_decoder_methods_packing_and_remat_train_a_tiny_llama(tmp_path, data_dir, overrides):
    """The methods that apply to decoders (DoRA, Adapter^H, PreEmbed), and LoRA on packed rows
    with remat, train the tiny Llama: finite losses that go down, an export written."""
    from lora_jax.train import train

    path = write_jsonl(tmp_path / "alpaca.jsonl", records(16))
    c = instruct_config(path, data_dir, **{
        "data.eval_fraction": 0.25, "data.batch_size": 4, "data.eval_batch_size": 4,
        "data.max_len": 64, "optim.lr": 1e-2, "optim.warmup_steps": 1, "train.max_steps": 9,
        "train.log_every": 1, "train.eval_every": 9, "train.checkpoint_every": 9, **overrides})
    workdir = tmp_path / "run"
    train(c, workdir)
    lines = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if r["split"] == "train"]
    assert len(losses) == 9 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-3:]) < sum(losses[:3])
    assert any((workdir / "adapter").iterdir())


@pytest.mark.slow
@pytest.mark.skipif(not _has_llama(), reason="the Llama model family is not in lora_jax.models")
def test_compare_runs_on_tiny_llama_runs(tmp_path, data_dir):
    """The analysis command (subspace similarity, amplification) on two Llama LoRA runs of
    ranks 4 and 8: one grid per adapted matrix, q, k, v and o of both layers."""
    from lora_jax.analysis import compare
    from lora_jax.train import train

    path = write_jsonl(tmp_path / "alpaca.jsonl", records(16))
    for rank in (4, 8):
        train(instruct_config(path, data_dir, **{
            "data.batch_size": 4, "data.max_len": 64, "optim.lr": 1e-2,
            "optim.warmup_steps": 1, "train.max_steps": 3, "train.eval_every": 3,
            "train.checkpoint_every": 3, "method.lora.rank": rank}), tmp_path / f"r{rank}")
    out = tmp_path / "compare"
    compare.main([str(tmp_path / "r4"), str(tmp_path / "r8"), "--out", str(out)])
    matrices = json.loads((out / "similarity.json").read_text())["matrices"]
    assert sorted(matrices) == sorted(f"model/layers_{i}/self_attn/{m}_proj"
                                      for i in (0, 1) for m in "qkvo")
    for entry in matrices.values():
        grid = np.array(entry["grid"])
        assert grid.shape == (4, 8) and np.all((grid >= 0) & (grid <= 1 + 1e-9))
    amplification = json.loads((out / "amplification.json").read_text())["matrices"]
    assert all(stats["dw_norm"] > 0 for stats in amplification.values())
