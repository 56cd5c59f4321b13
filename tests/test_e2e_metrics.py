"""E2E metrics: parity with the official e2e-metrics script (`measure_scores.py -p`) on the shared
fixture, closed-form BLEU / NIST / ROUGE_L / CIDEr cases, the readers and the command line.

METEOR and the COCO tokenizer are Java jars; the JVM and METEOR's paraphrase table take seconds to
load, so the fixture is scored once per module.
"""

import json
import math
import os
import pathlib
import shutil

import pytest

from lora_jax.metrics import e2e
from lora_jax.metrics.mteval import corpus_bleu, corpus_nist, tokenize

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The official figures are printed with 4 decimals; NIST and CIDEr run to ~10, hence 10x.
TOLERANCE = {"BLEU": 5e-4, "METEOR": 5e-4, "ROUGE_L": 5e-4, "NIST": 5e-3, "CIDEr": 5e-3}
needs_java = pytest.mark.skipif(
    shutil.which("java") is None,
    reason="no `java` on PATH: METEOR, ROUGE_L and CIDEr run the PTBTokenizer and METEOR 1.5 jars")


@pytest.fixture(scope="module")
def fixture_dir() -> pathlib.Path:
    """The shared metrics fixture ($LORA_JAX_DATA_DIR or <repo>/../shared/data)."""
    root = pathlib.Path(os.environ.get("LORA_JAX_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    path = root / "e2e" / "metrics-fixture"
    if not path.is_dir():
        pytest.skip(f"E2E metrics fixture {path} not found (set LORA_JAX_DATA_DIR)")
    return path


@pytest.fixture(scope="module")
def fixture_data(fixture_dir):
    refs = e2e.read_references(fixture_dir / "refs.txt")
    hyps = e2e.read_hypotheses(fixture_dir / "hyp.txt")
    official = json.loads((fixture_dir / "official_scores.json").read_text())
    return refs, hyps, official


@pytest.fixture(scope="module")
def fixture_scores(fixture_data):
    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: METEOR, ROUGE_L and CIDEr run Java jars")
    refs, hyps, _ = fixture_data
    return e2e.e2e_scores(refs, hyps)


# ---- parity with the official script -------------------------------------------------------

@pytest.mark.parametrize("metric", e2e.METRICS)
def test_fixture_matches_official_scores(fixture_data, fixture_scores, metric):
    official = fixture_data[2]
    assert fixture_scores[metric] == pytest.approx(official[metric], abs=TOLERANCE[metric])


def test_bleu_nist_match_official_without_java(fixture_data):
    refs, hyps, official = fixture_data
    assert len(refs) == len(hyps) == 547
    assert corpus_bleu(refs, hyps) == pytest.approx(official["BLEU"], abs=TOLERANCE["BLEU"])
    assert corpus_nist(refs, hyps) == pytest.approx(official["NIST"], abs=TOLERANCE["NIST"])


def test_csv_grouping_matches_fixture(fixture_dir):
    # The fixture took each devset MR's first reference as the output and kept the rest.
    groups = e2e.read_references(fixture_dir.parent / "devset.csv")
    assert [g[1:] for g in groups] == e2e.read_references(fixture_dir / "refs.txt")
    assert [g[0] for g in groups] == e2e.read_hypotheses(fixture_dir / "hyp.txt")


# ---- BLEU and NIST in closed form ----------------------------------------------------------

def test_tokenize_follows_mteval():
    assert tokenize("Near the £20-25 pub, it's 5.5.") == [
        "Near", "the", "£20", "-", "25", "pub", ",", "it's", "5.5", "."]
    assert tokenize("a &amp; b") == ["a", "&", "b"]


def test_bleu_identical_is_one_and_case_insensitive():
    assert corpus_bleu([["The cat sat on the mat."]], ["The cat sat on the mat."]) == 1.0
    assert corpus_bleu([["the cat sat on the mat ."]], ["The Cat sat on the mat."]) == 1.0


def test_bleu_closed_form():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2; equal lengths, so no brevity penalty.
    assert corpus_bleu([["a b c d e"]], ["a b c d f"]) == pytest.approx(0.2 ** 0.25)
    # Brevity penalty exp(1 - r / c) with all precisions 1.
    assert corpus_bleu([["a b c d e f g h"]], ["a b c d"]) == pytest.approx(math.exp(-1))
    # Hits are clipped by the largest count in any one reference ("the" twice): p1 = 2/4.
    assert corpus_bleu([["the the cat", "the cat"]], ["the the the the"], max_n=1) == 0.5


def test_bleu_reference_length_ties_go_to_the_shorter():
    # References of 3 and 5 tokens are equally close to 4; the shorter one means no penalty.
    assert corpus_bleu([["a b c", "a b c d e"]], ["a b c d"]) == pytest.approx(1.0)


def test_nist_closed_form():
    # Unigrams: info(a) = info(b) = log2(2 / 1) = 1, 2 matched of 2 offered -> 1; the bigram's
    # info is log2(1 / 1) = 0; nothing longer. No length penalty.
    assert corpus_nist([["a b"]], ["a b"]) == pytest.approx(1.0)
    # Half the reference length: penalty exp(-beta log(1/2)^2), beta = -ln(.5) / ln(1.5)^2.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    short = corpus_nist([["a b c d"]], ["a b"])
    assert short == pytest.approx(math.exp(-beta * math.log(0.5) ** 2) * 2.0)


# ---- COCO metrics ---------------------------------------------------------------------------

@needs_java
def test_ptb_tokenize_lowercases_and_drops_punctuation():
    assert e2e.ptb_tokenize(["Price: £20-25, it's (near) Café Rouge.", "", "x\ny"]) == [
        "price # 20-25 it 's -lrb- near -rrb- café rouge", "", "x y"]


# ---- readers, errors and the command line --------------------------------------------------

def test_read_references_text_groups_on_empty_lines(tmp_path):
    path = tmp_path / "refs.txt"
    path.write_text(" a one \na two\n\nb one\n\n\nc one\n\n")
    assert e2e.read_references(path) == [["a one", "a two"], ["b one"], ["c one"]]
    path.write_text("x\ny\n")  # no empty line: one reference per MR
    assert e2e.read_references(path) == [["x"], ["y"]]


def test_read_references_csv_groups_by_first_appearance(tmp_path):
    path = tmp_path / "refs.csv"
    path.write_text('mr,ref\n"name[A]","A, one."\n"name[B]","B one."\n'
                    '"name[A]","A two,\nwrapped."\n"name[B]","Costs Â£20."\n')
    assert e2e.read_references(path) == [["A, one.", "A two,\nwrapped."], ["B one.", "Costs £20."]]
    (tmp_path / "bad.csv").write_text("meaning,text\nx,y\n")
    with pytest.raises(ValueError, match="'mr' and 'ref'"):
        e2e.read_references(tmp_path / "bad.csv")


def test_count_mismatch_names_both_counts(tmp_path, capsys):
    with pytest.raises(ValueError, match="2 MRs with references but 1 hypotheses"):
        e2e.e2e_scores([["a"], ["b"]], ["a"])
    (tmp_path / "refs.txt").write_text("a\nb\n\nc\n\n")
    (tmp_path / "hyp.txt").write_text("a\nc\nd\n")
    with pytest.raises(SystemExit):
        e2e.main([str(tmp_path / "refs.txt"), str(tmp_path / "hyp.txt")])
    assert "has 2 MRs but" in capsys.readouterr().err


@needs_java
def test_cli_prints_official_layout_and_writes_json(tmp_path, capsys):
    (tmp_path / "refs.txt").write_text("The cat sat on the mat.\n\nA dog ran home!\n")
    (tmp_path / "hyp.txt").write_text("The cat sat on the mat.\nA dog ran home!\n")
    out = tmp_path / "scores.json"
    e2e.main([str(tmp_path / "refs.txt"), str(tmp_path / "hyp.txt"), "--json", str(out)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == ["SCORES:", "=============="]
    assert [line.split(":")[0] for line in lines[2:7]] == list(e2e.METRICS)
    assert lines[2] == "BLEU: 1.0000"
    scores = json.loads(out.read_text())
    assert list(scores) == list(e2e.METRICS)
    # Identical outputs: every clipped match is perfect. CIDEr: cosine 1 for each n, times 10
    # (the two MRs share no n-gram, so every idf is log 2 > 0).
    assert scores["BLEU"] == scores["METEOR"] == scores["ROUGE_L"] == 1.0
    assert scores["CIDEr"] == pytest.approx(10.0)
