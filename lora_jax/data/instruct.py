"""Instruction-tuning data in the Alpaca layout, and its encoding with the loss on the response.

    records = read_instructions("alpaca_data.json")     # [{'instruction', 'input', 'output'}]
    rows = encode_instructions(records, tokenizer, max_len=256)  # input_ids + loss_mask

A file is a JSON array of objects (`.json`, as tatsu-lab/stanford_alpaca's alpaca_data.json) or
one object per line (`.jsonl`, blank lines allowed). Each object holds `instruction` and
`output` (non-empty strings) and optionally `input` (a string; missing, null or "" = no input);
other keys are ignored.

Formats (`template`):
- 'alpaca': the prompt templates of tatsu-lab/stanford_alpaca, train.py PROMPT_DICT (commit
  761dc5bf; the README's "Data Release" prints the same two), and as its target the output
  followed by the EOS token. tloen/alpaca-lora's templates/alpaca.json adds a "\\n" after
  "### Response:"; we keep Stanford's text.
- 'chat': the tokenizer's chat template over [user: instruction (+ "\\n\\n" + input), assistant:
  output]; the prompt is the user turn rendered with `add_generation_prompt=True`.
- 'auto': 'chat' when the tokenizer has a chat template, else 'alpaca'.

How a row is built (see `encode_instructions`): the loss covers the response tokens and the
final EOS, nothing of the prompt. Alpaca tokenizes prompt and output apart and concatenates
the ids, so the boundary is exact (stanford_alpaca tokenizes the joined text and masks the
prompt's token count, which can be off by one where the two merge at the seam); a chat
template renders the whole conversation, so the prompt's ids must be a prefix of the whole's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypedDict

from lora_jax.data import e2e
from lora_jax.errors import ConfigError, FileFormatError

logger = logging.getLogger(__name__)

Source = Literal["files", "hub"]
OnMalformed = Literal["error", "skip"]
Template = Literal["auto", "alpaca", "chat"]

# tatsu-lab/stanford_alpaca, train.py PROMPT_DICT, verbatim.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)
# .csv: an E2E NLG file (mr,ref), each row a record with the MR as the instruction and the
# reference as the output (a real instruction set from the local data, e.g. for SmolLM2).
SUFFIXES = (".json", ".jsonl", ".csv")


class Record(TypedDict):
    """One instruction example; `input` is "" when the record has none."""

    instruction: str
    input: str
    output: str


@dataclasses.dataclass(frozen=True)
class ReadReport:
    """What a read produced.

    Attributes:
      source: the file path, or '<hub id>[<split>]'.
      records: records returned.
      unit: what `skipped` counts in: 'line' (JSONL), 'record' (JSON array, 1-based) or 'row'
        (hub, 1-based).
      skipped: the positions of the malformed records skipped.
    """

    source: str
    records: int
    unit: str
    skipped: tuple[int, ...] = ()


def read_instructions(
    path_or_hub_id: str | pathlib.Path,
    *,
    source: Source = "files",
    split: str = "train",
    on_malformed: OnMalformed = "error",
) -> list[Record]:
    """The records of one instruction file (or hub dataset), in order.

    Args:
      path_or_hub_id: a `.json` or `.jsonl` file; with source 'hub' a dataset id.
      source: 'files', or 'hub' (`datasets.load_dataset(id, split=split)`; needs the network).
      split: the hub split (files: ignored).
      on_malformed: 'error' raises on the first malformed record; 'skip' drops such records and
        logs one warning with their count (`read_instructions_with_report` also returns them).

    Returns:
      [{'instruction': str, 'input': str, 'output': str}, ...].

    Raises:
      FileNotFoundError: the file does not exist.
      FileFormatError: an unknown suffix, a file that is not JSON(L), a malformed record
        (on_malformed='error'; named by file and record or line number), or no valid record.
    """
    records, _ = read_instructions_with_report(path_or_hub_id, source=source, split=split,
                                               on_malformed=on_malformed)
    return records


def read_instructions_with_report(
    path_or_hub_id: str | pathlib.Path,
    *,
    source: Source = "files",
    split: str = "train",
    on_malformed: OnMalformed = "error",
) -> tuple[list[Record], ReadReport]:
    """`read_instructions`, plus a `ReadReport` of where the records came from and what was
    skipped."""
    if on_malformed not in ("error", "skip"):
        raise ValueError(f"on_malformed must be 'error' or 'skip', got {on_malformed!r}")
    if source == "files":
        name, unit, items = _file_items(pathlib.Path(path_or_hub_id).expanduser())
    elif source == "hub":
        import datasets  # deferred: importing datasets costs about a second

        name, unit = f"{path_or_hub_id}[{split}]", "row"
        items = enumerate(datasets.load_dataset(str(path_or_hub_id), split=split), start=1)
    else:
        raise ValueError(f"source must be 'files' or 'hub', got {source!r}")

    records, skipped = [], []
    for number, item in items:
        try:
            records.append(_record(item))
        except _Malformed as err:
            if on_malformed == "error":
                raise FileFormatError(f"{name}: {unit} {number}: {err}") from None
            skipped.append(number)
    report = ReadReport(name, len(records), unit, tuple(skipped))
    if skipped:
        logger.warning("%s: skipped %d malformed records (first at %s %d)", name, len(skipped),
                       unit, skipped[0])
    if not records:
        extra = f" ({len(skipped)} malformed, skipped)" if skipped else ""
        raise FileFormatError(f"{name}: no instruction records{extra}; expected objects with "
                              "'instruction', 'output' and optionally 'input'")
    return records, report


def hold_out(records: Sequence[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, eval): the last ceil(fraction * n) records (at least one) held out for
    evaluation. The tail, not a random draw, so the split is the same on every machine and
    for every seed.

    Raises:
      ConfigError: fewer than 2 records, or `fraction` outside (0, 1).
    """
    if not 0 < fraction < 1:
        raise ConfigError(f"the held-out fraction (data.eval_fraction) must be in (0, 1), got "
                          f"{fraction}")
    if len(records) < 2:
        raise ConfigError(f"{len(records)} record(s) cannot be split into training and "
                          "evaluation records; give an evaluation file (data.eval_path)")
    # round: 0.1 * 30 is 3.0000000000000004 in floating point, whose ceiling would be 4.
    n_eval = min(len(records) - 1, max(1, math.ceil(round(fraction * len(records), 9))))
    return list(records[:-n_eval]), list(records[-n_eval:])


def alpaca_prompt(record: Mapping[str, str]) -> str:
    """The Alpaca prompt of a record (the with-input template when `input` is non-empty).

    Example:
      alpaca_prompt({"instruction": "Add 2 and 3.", "input": "", "output": "5"}).endswith(
          "### Instruction:\\nAdd 2 and 3.\\n\\n### Response:")
    """
    if record.get("input"):
        return PROMPT_INPUT.format(instruction=record["instruction"], input=record["input"])
    return PROMPT_NO_INPUT.format(instruction=record["instruction"])


def chat_messages(record: Mapping[str, str]) -> list[dict[str, str]]:
    """[user, assistant] messages of a record: the input, if any, follows the instruction."""
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [{"role": "user", "content": user}, {"role": "assistant", "content": record["output"]}]


def resolve_template(template: Template, tokenizer: Any) -> str:
    """'alpaca' or 'chat': what `template` means for this tokenizer.

    Raises:
      ValueError: an unknown template.
      ConfigError: 'chat' for a tokenizer without a chat template.
    """
    if template not in ("auto", "alpaca", "chat"):
        raise ValueError(f"template must be 'auto', 'alpaca' or 'chat', got {template!r}")
    has_chat = has_chat_template(tokenizer)
    if template == "chat" and not has_chat:
        raise ConfigError("template 'chat' (data.template) needs a tokenizer with a chat "
                          "template, and tokenizer.chat_template is unset; use 'alpaca' or 'auto'")
    if template == "auto":
        return "chat" if has_chat else "alpaca"
    return template


def encode_instructions(records: Sequence[Mapping[str, str]], tokenizer: Any, max_len: int,
                        template: Template = "auto") -> list[dict]:
    """Training rows with the loss on the response: the LM task's format (as `encode_e2e`).

    `loss_mask[t]` is 1 where `input_ids[t]` is a response token or the final EOS, 0 on the
    prompt. A row starts with the tokenizer's BOS when the tokenizer itself adds one to what it
    encodes (Llama's <s>) and the text does not already begin with it; GPT-2's tokenizer adds
    none (its bos is <|endoftext|>, the EOS), nor do we.

    Args:
      records: from `read_instructions`.
      tokenizer: a Hugging Face tokenizer with an EOS token.
      max_len: rows longer than this lose their tail (a response cut off has no EOS). A record
        whose prompt alone fills `max_len` has nothing to learn and is dropped, with a warning.
      template: 'alpaca', 'chat' or 'auto' (see the module docstring).

    Returns:
      [{'input_ids': list[int], 'loss_mask': list[int]}, ...], one per record kept.

    Raises:
      ValueError: the tokenizer has no EOS token.
      ConfigError: every record was dropped (max_len too small), or a chat template does not
        render the prompt as a prefix of the whole conversation.
    """
    if not records:
        return []
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, which ends every response")
    kind = resolve_template(template, tokenizer)
    pairs = _alpaca_ids(records, tokenizer) if kind == "alpaca" else _chat_ids(records, tokenizer)
    bos = bos_to_add(tokenizer)
    rows, dropped = [], 0
    for prompt, response in pairs:
        if bos is not None and prompt[:1] != [bos]:
            prompt = [bos, *prompt]
        if len(prompt) >= max_len:
            dropped += 1
            continue
        rows.append({"input_ids": (prompt + response)[:max_len],
                     "loss_mask": ([0] * len(prompt) + [1] * len(response))[:max_len]})
    if dropped:
        logger.warning("dropped %d of %d instruction records whose prompt fills max_len=%d "
                       "tokens (no response token left to learn)", dropped, len(records), max_len)
    if not rows:
        raise ConfigError(f"every one of the {len(records)} instruction records has a prompt of "
                          f"max_len={max_len} tokens or more; raise data.max_len")
    return rows


def prompt_ids(record: Mapping[str, str], tokenizer: Any, template: Template = "auto"
               ) -> list[int]:
    """A record's prompt as `encode_instructions` starts its row (the tokens a model trained on
    those rows is given to generate the response)."""
    kind = resolve_template(template, tokenizer)
    [(prompt, _)] = (_alpaca_ids if kind == "alpaca" else _chat_ids)([record], tokenizer)
    bos = bos_to_add(tokenizer)
    return [bos, *prompt] if bos is not None and prompt[:1] != [bos] else prompt


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


# --- Reading ----------------------------------------------------------------------------------

class _Malformed(Exception):
    """A record that is not an instruction example; the caller adds file and number."""


def _file_items(path: pathlib.Path) -> tuple[str, str, Iterable[tuple[int, Any]]]:
    """(name, unit, (number, parsed object or _Malformed) pairs) of a local file."""
    if path.is_dir():
        raise FileFormatError(f"{path} is a directory; an instruction file is one .json or "
                              ".jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"instruction file {path} not found")
    if path.suffix not in SUFFIXES:
        raise FileFormatError(f"{path}: expected a .json file (a JSON array of objects), a "
                              ".jsonl file (one object per line) or an E2E .csv file (mr,ref), "
                              f"got suffix {path.suffix!r}")
    if path.suffix == ".csv":
        try:
            pairs = e2e.read_pairs(path)
        except ValueError as err:
            raise FileFormatError(str(err)) from None
        return str(path), "row", enumerate(
            ({"instruction": mr, "input": "", "output": ref} for mr, ref in pairs), start=2)
    raw = path.read_bytes()
    if path.suffix == ".jsonl":
        return str(path), "line", _jsonl_items(raw)
    text = _decoded(path, raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        # The whole file is one value: nothing of it can be skipped.
        raise FileFormatError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}); "
                              "a .json instruction file is one JSON array of objects") from None
    if not isinstance(data, list):
        raise FileFormatError(f"{path}: expected a JSON array of objects, got a JSON "
                              f"{_json_type(data)}; a file of one object per line is .jsonl")
    return str(path), "record", enumerate(data, start=1)


def _decoded(path: pathlib.Path, raw: bytes) -> str:
    """A .json file's text; a byte that is not UTF-8 is named by line, column and the record
    it falls in (the file is read again with it replaced, to find which record holds it)."""
    try:
        # utf-8-sig: a file saved with a byte-order mark reads as without.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        where = ""
        try:
            records = json.loads(raw.decode("utf-8-sig", errors="replace"))
            hits = [i for i, r in enumerate(records, start=1)
                    if "\ufffd" in json.dumps(r, ensure_ascii=False)]
            where = f" (record {hits[0]})" if hits and isinstance(records, list) else ""
        except (json.JSONDecodeError, TypeError):
            pass
        raise FileFormatError(f"{path}:{line}:{column}: byte 0x{raw[err.start]:02x} is not "
                              f"UTF-8{where}; save the file as UTF-8") from None


def _jsonl_items(raw: bytes) -> Iterator[tuple[int, Any]]:
    # split on b'\n', not splitlines(): JSON strings may hold U+2028 and other characters that
    # splitlines() takes for line ends, which would cut a record and shift the line numbers.
    # Lines are decoded one by one, so a line that is not UTF-8 is one malformed record.
    for number, data in enumerate(raw.split(b"\n"), start=1):
        try:
            line = data.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            yield number, _Malformed(f"byte 0x{data[err.start]:02x} at column {err.start + 1} "
                                     "is not UTF-8; save the file as UTF-8")
            continue
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            yield number, _Malformed(f"not valid JSON ({err.msg} at column {err.colno})")


def _record(item: Any) -> Record:
    if isinstance(item, _Malformed):
        raise item
    if not isinstance(item, Mapping):
        raise _Malformed(f"expected a JSON object with 'instruction' and 'output', got a JSON "
                         f"{_json_type(item)}")
    for key in ("instruction", "output"):
        if key not in item:
            raise _Malformed(f"missing {key!r} (keys: {sorted(item)})")
    # null is JSON's "absent": a missing input reads as no input.
    fields = {"instruction": item["instruction"], "input": item.get("input") or "",
              "output": item["output"]}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise _Malformed(f"{key!r} must be a string, got a JSON {_json_type(value)}")
    for key in ("instruction", "output"):
        if not fields[key].strip():
            raise _Malformed(f"{key!r} is empty")
    return Record(**fields)


def _json_type(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null",
             int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


# --- Encoding ---------------------------------------------------------------------------------

def _alpaca_ids(records: Sequence[Mapping[str, str]], tokenizer: Any
                ) -> list[tuple[list[int], list[int]]]:
    prompts = _ids(tokenizer, [alpaca_prompt(r) for r in records])
    outputs = _ids(tokenizer, [r["output"] for r in records])
    eos = tokenizer.eos_token_id
    return [(p, o + [eos]) for p, o in zip(prompts, outputs)]


def _chat_ids(records: Sequence[Mapping[str, str]], tokenizer: Any
              ) -> list[tuple[list[int], list[int]]]:
    eos = tokenizer.eos_token_id
    pairs = []
    for number, record in enumerate(records, start=1):
        messages = chat_messages(record)
        prompt_text = tokenizer.apply_chat_template(messages[:1], tokenize=False,
                                                    add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        prompt, full = _ids(tokenizer, [prompt_text, full_text])
        if full[:len(prompt)] != prompt:
            raise ConfigError(
                f"record {number}: the chat template does not render the prompt (user turn "
                "with add_generation_prompt=True) as a prefix of the whole conversation, so the "
                "response cannot be told apart by position; use data.template='alpaca'. "
                f"Prompt: {prompt_text!r}; conversation: {full_text!r}")
        response = full[len(prompt):]
        # Most templates end the assistant turn with the EOS (what follows it, e.g. ChatML's
        # newline, belongs to no turn and is cut); where one does not, the EOS is added so that
        # every response teaches the model to stop.
        if eos in response:
            response = response[:response.index(eos) + 1]
        else:
            response.append(eos)
        pairs.append((prompt, response))
    return pairs


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # add_special_tokens=False: the BOS is added once, by encode_instructions; EOS explicitly.
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def bos_to_add(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one before what it encodes, else None.

    Following the tokenizer's own habit keeps a row as the model saw text in pretraining:
    Llama's tokenizers add <s>; GPT-2's does not (its bos_token is <|endoftext|>, the EOS, and
    microsoft/LoRA's GPT-2 rows start without it); Qwen2's has no BOS at all.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return None
    ids = tokenizer("a")["input_ids"]
    return bos if ids[:1] == [bos] else None
