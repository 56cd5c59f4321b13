"""The E2E NLG Challenge data, and GPT-2 encoding in the LoRA paper's format.

    pairs = read_e2e("train")                  # [(mr, ref), ...], 42,061 pairs
    refs = group_by_mr(read_e2e("test"))       # [(mr, [ref, ...]), ...], 630 MRs (metrics.e2e)
    rows = encode_e2e(pairs, tokenizers.load("gpt2"), max_len=512)  # input_ids + loss_mask

The training format follows microsoft/LoRA `examples/NLG` (README.md, create_datasets.sh,
src/format_converting_e2e.py, src/gpt2_beam.py at commits 3732c24d / c18b175e; src/gpt2_encode.py,
src/data_utils.py and data/e2e/test.txt as copied in the fork chenxingqiang/LoRA @ 1e93e899):
- `data/e2e/{train,valid,test}.txt` (from Li & Liang's prefix-tuning release) hold one pair per
  line, `<mr>||<ref>`, the MR rewritten as `name : Blue Spice | Type : coffee shop | ...`
  (`eatType` -> `Type`, `priceRange` -> `price`, `familyFriendly` -> `family friendly`, values
  tokenized: `£20-25` -> `£ 20 - 25`); `src/format_converting_e2e.py` splits it into
  {"context": mr, "completion": ref}.
- `src/gpt2_encode.py --add_bos --add_eos`: context = bpe(mr) + [50256]; completion =
  bpe(' ' + ref) + [50256]. The "bos" goes after the MR, so <|endoftext|> both separates
  MR from text and ends the text.
- `src/data_utils.py` FT_Dataset: input = context + completion, cut to seq_len; the loss mask
  covers the completion tokens (reference and final EOS) and nothing of the context.
- `src/gpt2_beam.py`: generation is conditioned on the context alone (MR + 50256); the README's
  command adds `--eos_token_id 628` ('\\n\\n') to the default 50256 as stop tokens.
One difference: that repo's references are PTB-style tokenized ("It 's", "family - friendly"),
by a tool its repo does not include. We keep the official untokenized references (whitespace
runs, including the few embedded newlines, collapsed to one space), which the official
e2e-metrics script expects.
"""

from __future__ import annotations

import csv
import pathlib
import re
from collections.abc import Sequence
from typing import Literal

from lora_jax.data import resolve as resolve_data_dir

FILES = {"train": "trainset.csv", "dev": "devset.csv", "test": "testset_w_refs.csv"}
HUB_ID = "e2e_nlg"
_HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}

EOS_ID = 50256  # GPT-2 <|endoftext|>, which the format puts after the MR and the reference

# microsoft/LoRA's (Li & Liang's) names for the E2E slots; the other slots keep theirs.
_SLOT_NAMES = {"eatType": "Type", "priceRange": "price", "familyFriendly": "family friendly"}
_SLOT = re.compile(r"\s*([^\[\],]+?)\s*\[([^\]]*)\]\s*(?:,|$)")


def read_e2e(
    split: str,
    *,
    data_dir: str | pathlib.Path | None = None,
    source: Literal["files", "hub"] = "files",
) -> list[tuple[str, str]]:
    """The (meaning representation, human reference) pairs of one E2E split, in file order.

    Args:
      split: 'train', 'dev' or 'test' (`trainset.csv`, `devset.csv`, `testset_w_refs.csv`).
      data_dir: the data root holding e2e/; default `lora_jax.data.data_dir()`.
      source: 'files', or 'hub' (`datasets.load_dataset('e2e_nlg')`; needs the network).

    Returns:
      [(mr, ref), ...]; an MR repeats once per reference. References are as written, so a few
      hold embedded newlines.

    Raises:
      ValueError: an unknown split or source, or a malformed row (named by file and line).
      FileNotFoundError: the CSV file is missing.
    """
    if split not in FILES:
        raise ValueError(f"unknown E2E split {split!r}; known splits: {', '.join(FILES)}")
    if source == "hub":
        import datasets  # deferred: importing datasets costs about a second

        rows = datasets.load_dataset(HUB_ID, split=_HUB_SPLITS[split])
        return [(row["meaning_representation"], row["human_reference"]) for row in rows]
    if source != "files":
        raise ValueError(f"source must be 'files' or 'hub', got {source!r}")

    path = split_path(split, data_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; set LORA_JAX_DATA_DIR to the folder that "
                                f"holds e2e/{FILES[split]}")
    return read_pairs(path)


def read_pairs(path: pathlib.Path) -> list[tuple[str, str]]:
    """The (mr, ref) rows of one E2E CSV file (header 'mr,ref').

    Raises:
      ValueError: a malformed row or header (named by file and line).
    """
    pairs = []
    # newline='': the csv module then handles the CRLF line ends and the quoted references
    # that span lines; a record's line number is where it ends.
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header != ["mr", "ref"]:
            raise ValueError(f"{path}:1: expected the header 'mr,ref', got {header}")
        for row in rows:
            if len(row) != 2:
                raise ValueError(f"{path}:{rows.line_num}: expected 2 fields (mr, ref), got {row}")
            pairs.append((row[0], row[1]))
    return pairs


def split_path(split: str, data_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """The CSV file of one split: <data_dir>/e2e/<file>."""
    if split not in FILES:
        raise ValueError(f"unknown E2E split {split!r}; known splits: {', '.join(FILES)}")
    return resolve_data_dir(data_dir) / "e2e" / FILES[split]


def format_mr(mr: str) -> str:
    """An official MR in microsoft/LoRA's text form.

    Example:
      format_mr("name[The Phoenix], eatType[pub], priceRange[£20-25]")
        == "name : The Phoenix | Type : pub | price : £ 20 - 25"

    Raises:
      ValueError: `mr` is not a comma-separated list of `slot[value]`.
    """
    slots, end = [], 0
    for match in _SLOT.finditer(mr):
        if match.start() != end:
            break
        slots.append(match.groups())
        end = match.end()
    if not slots or end != len(mr):
        raise ValueError(f"expected an MR like 'name[Blue Spice], eatType[pub]', got {mr!r}")
    return " | ".join(f"{_SLOT_NAMES.get(k, k)} : {_tokenize_value(v)}" for k, v in slots)


def encode_prompt(mr: str, tokenizer) -> list[int]:
    """The generation prompt for an MR: its formatted tokens then <|endoftext|>.

    Args:
      mr: an official MR ('name[...], eatType[...]').
      tokenizer: the GPT-2 tokenizer (`data.tokenizers.load("gpt2")`).
    """
    return tokenizer(format_mr(mr), add_special_tokens=False)["input_ids"] + [_eos_id(tokenizer)]


def encode_e2e(pairs: Sequence[tuple[str, str]], tokenizer, max_len: int) -> list[dict]:
    """Training rows in microsoft/LoRA's format: prompt + ' ' + reference + <|endoftext|>.

    `loss_mask[t]` is 1 where `input_ids[t]` is a target (reference tokens and the final
    EOS) and 0 on the prompt, so the LM loss is
    sum_t loss_mask[t] * CE(logits[t - 1], input_ids[t]) over t >= 1.

    Args:
      pairs: (mr, ref) pairs from `read_e2e`.
      tokenizer: the GPT-2 tokenizer (`data.tokenizers.load("gpt2")`).
      max_len: rows longer than this lose their tail, as in the repo (E2E rows are under 128
        GPT-2 tokens, so at the paper's 512 nothing is cut).

    Returns:
      [{'input_ids': list[int], 'loss_mask': list[int]}, ...], one per pair.

    Raises:
      ValueError: a prompt leaves no room for a target token within `max_len`.
    """
    if not pairs:
        return []
    eos = _eos_id(tokenizer)
    prompts = tokenizer([format_mr(mr) for mr, _ in pairs], add_special_tokens=False)["input_ids"]
    # The repo encodes ' ' + ref: GPT-2 BPE marks a word start with a leading space.
    targets = tokenizer([" " + " ".join(ref.split()) for _, ref in pairs],
                        add_special_tokens=False)["input_ids"]
    rows = []
    for (mr, _), prompt, target in zip(pairs, prompts, targets):
        prompt, target = prompt + [eos], target + [eos]
        if len(prompt) >= max_len:
            raise ValueError(f"max_len={max_len} leaves no room for the reference after the "
                             f"{len(prompt)}-token prompt of {mr!r}")
        rows.append({"input_ids": (prompt + target)[:max_len],
                     "loss_mask": ([0] * len(prompt) + [1] * len(target))[:max_len]})
    return rows


def _tokenize_value(value: str) -> str:
    # The repo's MR values are tokenized; among E2E's values only prices change:
    # '£20-25' -> '£ 20 - 25', 'less than £20' -> 'less than £ 20'.
    value = re.sub(r"£(?=\S)", "£ ", value)
    return re.sub(r"(?<=\S)-(?=\S)", " - ", value)


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; E2E is encoded with GPT-2's "
                         "(model.tokenizer 'gpt2')")
    return tokenizer.eos_token_id
