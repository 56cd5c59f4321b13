"""Corpus BLEU and NIST as the E2E challenge computes them (`measure_scores.py -p`).

The challenge's `-p` mode scores with a pure-Python port of NIST's mteval-v13a.pl; this module
follows that port, quirks included (its NIST differs slightly from the Perl script's when MRs have
different numbers of references):

    corpus_bleu([["the cat sat ."]], ["The cat sat."])  # 1.0: tokenized, case-insensitive
    corpus_nist(references, hypotheses)                 # information-weighted, up to 5-grams

- Tokens come from mteval-v13a's "western" tokenizer (`tokenize`) and are compared lowercased.
- BLEU: n-gram hits are clipped by the largest count in any one reference; the reference length
  is that of the reference closest in length to the hypothesis (the shorter on a tie); no
  smoothing beyond flooring zero counts so that the log stays defined.
- NIST: information weights are counted over all references of the corpus (every reference,
  unclipped), and the length penalty compares with each MR's *average* reference length.
- The number of n-grams a hypothesis offers is counted as len(tokens) - n + 1 even when that is
  negative (very short hypotheses); the port does this and we keep it for parity.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

# mteval-v13a's tokenization rules, applied in this order.
_UNESCAPE = (("<skipped>", ""), ("-\n", ""), ("\n", " "),
             ("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">"))
_TOKEN_RULES = (
    # Punctuation and symbols: {|}~ [\]^_` space!"#$%& ()*+ :;<=>? @ and /.
    (re.compile(r"([{-~\[-` -&(-+:-@/])"), r" \1 "),
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),  # period or comma, unless after a digit
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),  # period or comma, unless before a digit
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
    (re.compile(r"\s+"), " "),
)

# NIST's length penalty: beta makes the penalty 0.5 when the output is 2/3 of the reference length.
_NIST_BETA = -math.log(0.5) / math.log(1.5) ** 2


def tokenize(text: str) -> list[str]:
    """mteval-v13a's tokenization (case kept).

    Example:
      tokenize("Near the £20-25 pub, it's 5.5.")
        == ['Near', 'the', '£20', '-', '25', 'pub', ',', "it's", '5.5', '.']
    """
    for old, new in _UNESCAPE:
        text = text.replace(old, new)
    text = f" {text} "
    for pattern, replacement in _TOKEN_RULES:
        text = pattern.sub(replacement, text)
    # An empty text gives [''], one empty token, as in the port (it counts towards lengths).
    return text.strip().split(" ")


def corpus_bleu(references: Sequence[Sequence[str]], hypotheses: Sequence[str],
                max_n: int = 4) -> float:
    """Corpus-level BLEU in [0, 1] with multiple references per hypothesis.

    Args:
      references: for each hypothesis, its references (at least one).
      hypotheses: the system outputs, one per reference group.
      max_n: the longest n-gram (4 in the challenge).

    Returns:
      BP * exp(mean_n log p_n), p_n the clipped n-gram precision over the corpus.
    """
    hits, offered = [0] * max_n, [0] * max_n
    hyp_len = ref_len = 0
    for refs, hyp in _tokenized(references, hypotheses):
        for n in range(1, max_n + 1):
            hyp_counts = _ngram_counts(hyp, n)
            ref_max = _max_counts(refs, n)
            hits[n - 1] += sum(min(c, ref_max[g]) for g, c in hyp_counts.items())
            offered[n - 1] += len(hyp) - n + 1
        hyp_len += len(hyp)
        ref_len += min((abs(len(r) - len(hyp)), len(r)) for r in refs)[1]

    log_precision = sum(math.log(max(h, 1e-15) / max(o, 1e-9)) for h, o in zip(hits, offered))
    brevity = 1.0
    if hyp_len <= ref_len:
        brevity = math.exp(1.0 - ref_len / (hyp_len or 1e-5))
    return brevity * math.exp(log_precision / max_n)


def corpus_nist(references: Sequence[Sequence[str]], hypotheses: Sequence[str],
                max_n: int = 5) -> float:
    """Corpus-level NIST with multiple references per hypothesis.

    Args:
      references: for each hypothesis, its references (at least one).
      hypotheses: the system outputs, one per reference group.
      max_n: the longest n-gram (5 in the challenge).

    Returns:
      sum_n (information of the matched n-grams / n-grams offered) times the length penalty.
    """
    data = _tokenized(references, hypotheses)
    # counts[k][g]: occurrences of the k-gram g in all references; counts[0][()] is their length.
    counts = [Counter() for _ in range(max_n + 1)]
    for refs, _ in data:
        for ref in refs:
            counts[0][()] += len(ref)
            for n in range(1, max_n + 1):
                counts[n].update(_ngrams(ref, n))

    def info(ngram: tuple[str, ...]) -> float:
        # log2(#(w1..w{n-1}) / #(w1..wn)): rarer continuations carry more information.
        seen = counts[len(ngram)][ngram]
        return math.log2(counts[len(ngram) - 1][ngram[:-1]] / seen) if seen else 0.0

    score = 0.0
    for n in range(1, max_n + 1):
        matched_info, offered = 0.0, 0
        for refs, hyp in data:
            ref_max = _max_counts(refs, n)
            matched_info += sum(info(g) * min(c, ref_max[g])
                                for g, c in _ngram_counts(hyp, n).items() if ref_max[g])
            offered += len(hyp) - n + 1
        # The port divides by zero here (no n-grams offered at all); nothing matched, so add 0.
        score += matched_info / offered if offered else 0.0

    hyp_len = sum(len(hyp) for _, hyp in data)
    avg_ref_len = sum(sum(map(len, refs)) / len(refs) for refs, _ in data)
    return _nist_length_penalty(hyp_len / avg_ref_len) * score


def _nist_length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_NIST_BETA * math.log(ratio) ** 2)


def _tokenized(references: Sequence[Sequence[str]],
               hypotheses: Sequence[str]) -> list[tuple[list[list[str]], list[str]]]:
    """[(lowercased reference tokens, lowercased hypothesis tokens)] per MR, checked."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} reference groups but {len(hypotheses)} hypotheses; "
                         "need one group per hypothesis")
    data = []
    for i, (refs, hyp) in enumerate(zip(references, hypotheses)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of strings, got {refs!r}")
        data.append(([_lower(tokenize(r)) for r in refs], _lower(tokenize(hyp))))
    return data


def _lower(tokens: list[str]) -> list[str]:
    return [t.lower() for t in tokens]


def _ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]


def _ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(_ngrams(tokens, n))


def _max_counts(refs: Sequence[Sequence[str]], n: int) -> Counter:
    """For each n-gram, its largest count in any single reference (BLEU's clipping bound)."""
    bound = Counter()
    for ref in refs:
        bound |= _ngram_counts(ref, n)  # Counter union keeps the maximum
    return bound
