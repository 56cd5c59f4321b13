"""E2E NLG challenge metrics, as the official script computes them.

    refs = read_references("devset.csv")  # [[reference, ...] per MR], MRs in file order
    hyps = read_hypotheses("outputs.txt")  # one output per MR, same order
    e2e_scores(refs, hyps)  # {'BLEU': 0.5995, 'NIST': 8.5785, 'METEOR': 0.4498, ...}

    python -m lora_jax.metrics.e2e REFS HYP [--json OUT]

The official script is tuetschek/e2e-metrics `measure_scores.py -p` (the numbers the LoRA paper
reports). Every metric is multi-reference (all references of an MR score its one output):

- BLEU, NIST: `mteval.py`, the script's Python port of mteval-v13a (its own tokenizer, lowercase).
- METEOR, ROUGE_L, CIDEr: the MS-COCO caption code (pycocoevalcap) on text put through the
  Stanford PTBTokenizer (`-preserveLines -lowerCase`), with PTB punctuation tokens dropped.
  METEOR 1.5 (`-l en -norm`) scores the corpus from summed statistics; ROUGE_L (beta 1.2) and
  CIDEr (CIDEr-D: sigma 6, document frequencies over the reference set) average per-MR scores.
  Both the tokenizer and METEOR are jars, so these three need Java.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence

from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer import ptbtokenizer

from lora_jax.metrics.mteval import corpus_bleu, corpus_nist

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")

# The COCO tokenizer drops these PTB tokens. Brackets come out lowercased ('-lrb-') and so are
# kept: the list is compared after -lowerCase, as in the COCO code.
_PTB_PUNCTUATION = frozenset(ptbtokenizer.PUNCTUATIONS)
_PTB_JAR = pathlib.Path(ptbtokenizer.__file__).parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR

# Mis-encoded characters the official script repairs in CSV files before scoring.
_CSV_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


def e2e_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """The five E2E challenge scores of a system's outputs.

    Args:
      references: for each MR, its human references (at least one each).
      hypotheses: the system output for each MR, in the same order.

    Returns:
      {'BLEU', 'NIST', 'METEOR', 'ROUGE_L', 'CIDEr'} -> float; BLEU, METEOR and ROUGE_L are
      fractions in [0, 1], as the official script prints them.

    Raises:
      ValueError: the counts differ, or an MR has no reference.
      RuntimeError: Java is not available (METEOR, ROUGE_L and CIDEr need it).
    """
    _check_counts(len(references), len(hypotheses))
    scores = {"BLEU": corpus_bleu(references, hypotheses),
              "NIST": corpus_nist(references, hypotheses)}
    scores.update(coco_scores(references, hypotheses))
    return {name: scores[name] for name in METRICS}


def coco_scores(references: Sequence[Sequence[str]], hypotheses: Sequence[str]) -> dict[str, float]:
    """METEOR, ROUGE_L and CIDEr as the MS-COCO caption evaluation gives them (needs Java).

    Args:
      references: for each MR, its human references (at least one each).
      hypotheses: the system output for each MR, in the same order.

    Returns:
      {'METEOR': float, 'ROUGE_L': float, 'CIDEr': float}.
    """
    _check_counts(len(references), len(hypotheses))
    if any(isinstance(refs, str) or not refs for refs in references):
        raise ValueError("every MR needs a non-empty list of reference strings")
    # One JVM start for everything; the COCO code tokenizes references and outputs separately,
    # which gives the same lines.
    tokens = ptb_tokenize([ref for refs in references for ref in refs] + list(hypotheses))
    gts, res, start = {}, {}, 0
    for i, refs in enumerate(references):
        gts[i], start = tokens[start:start + len(refs)], start + len(refs)
    for i in range(len(hypotheses)):
        res[i] = [tokens[start + i]]

    meteor = Meteor()  # starts the METEOR jar; it is stopped when the object is collected
    try:
        meteor_score = meteor.compute_score(gts, res)[0]
    finally:
        del meteor
    return {"METEOR": float(meteor_score),
            "ROUGE_L": float(Rouge().compute_score(gts, res)[0]),
            "CIDEr": float(Cider().compute_score(gts, res)[0])}


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """The COCO caption tokenization: Stanford PTBTokenizer, lowercased, punctuation dropped.

    Example:
      ptb_tokenize(["Price: £20-25, it's (near) Café Rouge."])
        == ["price # 20-25 it 's -lrb- near -rrb- café rouge"]  # PTB writes £ as #
    """
    java = _java()
    with tempfile.TemporaryDirectory(prefix="lora_jax-ptb-") as tmp:
        path = pathlib.Path(tmp) / "sentences.txt"
        # One text per line (-preserveLines keeps lines, empty ones included), so a line break
        # inside a text becomes a space; the COCO code does this for \n.
        path.write_text("\n".join(" ".join(t.splitlines()) for t in texts), encoding="utf-8")
        run = subprocess.run(
            [java, "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
             "-preserveLines", "-lowerCase", str(path)],
            capture_output=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"PTBTokenizer failed ({run.returncode}): {run.stderr.decode()[-2000:]}")
    lines = run.stdout.decode("utf-8").split("\n")
    # A misaligned line would score every later text against the wrong MR.
    if len(lines) < len(texts) or any(lines[len(texts):]):
        raise RuntimeError(f"PTBTokenizer gave {len(lines)} lines for {len(texts)} texts")
    return [" ".join(w for w in line.rstrip().split(" ") if w not in _PTB_PUNCTUATION)
            for line in lines[:len(texts)]]


def read_references(path: str | os.PathLike) -> list[list[str]]:
    """References grouped per MR, from either format the official script reads.

    Args:
      path: a `.csv` / `.tsv` file with `mr` and `ref` columns (the challenge CSV; references
        grouped by MR, MRs in order of first appearance), or a text file with one reference per
        line and an empty line after each MR's references. A text file without empty lines
        holds one reference per MR.

    Returns:
      [[reference, ...], ...], one list per MR, each reference stripped of surrounding space.
    """
    path = pathlib.Path(path)
    if path.suffix.lower() in (".csv", ".tsv"):
        return [refs for _, refs in group_by_mr(_read_mr_ref_pairs(path))]
    groups: list[list[str]] = [[]]
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.strip()
        if line:
            groups[-1].append(line)
        elif groups[-1]:  # several empty lines still separate just two MRs
            groups.append([])
    groups = [g for g in groups if g]
    if len(groups) == 1:  # no separators: the official script reads this as single-reference
        groups = [[ref] for ref in groups[0]]
    return groups


def group_by_mr(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, list[str]]]:
    """References grouped per MR, MRs in order of first appearance (multi-reference evaluation).

    Example:
      group_by_mr([("a", "x"), ("b", "y"), ("a", "z")]) == [("a", ["x", "z"]), ("b", ["y"])]
    """
    groups: dict[str, list[str]] = {}
    for mr, ref in pairs:
        groups.setdefault(mr, []).append(ref)
    return list(groups.items())


def read_hypotheses(path: str | os.PathLike) -> list[str]:
    """System outputs, one per line (an empty line is an empty output), stripped."""
    return [line.strip() for line in
            pathlib.Path(path).read_text(encoding="utf-8-sig").splitlines()]


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Command line: prints the scores in the official script's layout; --json also saves them."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_jax.metrics.e2e",
        description="E2E NLG challenge scores (BLEU, NIST, METEOR, ROUGE_L, CIDEr), as "
                    "e2e-metrics' measure_scores.py -p computes them.")
    parser.add_argument("refs", help="references: text (empty line between MRs) or mr,ref CSV")
    parser.add_argument("hyp", help="system outputs, one line per MR")
    parser.add_argument("--json", metavar="OUT", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)

    references, hypotheses = read_references(args.refs), read_hypotheses(args.hyp)
    if len(references) != len(hypotheses):
        parser.error(f"{args.refs} has {len(references)} MRs but {args.hyp} has "
                     f"{len(hypotheses)} outputs; need one output line per MR")
    scores = e2e_scores(references, hypotheses)
    print("SCORES:\n==============")
    for name in METRICS:
        print(f"{name}: {scores[name]:.4f}")
    print()
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(scores, indent=2) + "\n")
    return scores


def _read_mr_ref_pairs(path: pathlib.Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = [h.strip().lower() for h in next(rows, [])]
        if "mr" not in header or "ref" not in header:
            raise ValueError(f"{path}: expected a header with 'mr' and 'ref' columns, got {header}")
        mr_col, ref_col = header.index("mr"), header.index("ref")
        pairs = []
        for row in rows:
            if not row:
                continue
            if len(row) != len(header):
                raise ValueError(f"{path}:{rows.line_num}: expected {len(header)} fields, "
                                 f"got {row}")
            pairs.append((row[mr_col], _fix_encoding(row[ref_col]).strip()))
    return pairs


def _fix_encoding(text: str) -> str:
    for wrong, right in _CSV_FIXES:
        text = text.replace(wrong, right)
    return text


def _check_counts(n_references: int, n_hypotheses: int) -> None:
    if n_references != n_hypotheses:
        raise ValueError(f"{n_references} MRs with references but {n_hypotheses} hypotheses; "
                         "need exactly one hypothesis per MR, in the same order")


def _java() -> str:
    java = shutil.which("java")
    if java is None:
        raise RuntimeError("METEOR, ROUGE_L and CIDEr need Java (the PTB tokenizer and METEOR 1.5 "
                           "are jars): install a Java runtime (8 or newer) and put `java` on PATH")
    return java


if __name__ == "__main__":
    try:
        main()
    except (ValueError, RuntimeError) as error:
        sys.exit(f"error: {error}")
