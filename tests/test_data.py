"""GLUE reading: real files against SOURCES.md's counts, malformed rows named by file and line,
and the hub path against an in-memory stand-in for `datasets.load_dataset`."""

import collections
import logging
import re

import pytest

from lora_jax.data import glue
from lora_jax.data.glue import Example, read_glue, read_glue_with_report

# SOURCES.md: (rows, {class id: count}); class ids as HF's nyu-mll/glue.
COUNTS = {
    ("sst2", "train"): (67_349, {1: 37_569, 0: 29_780}),
    ("sst2", "dev"): (872, {1: 444, 0: 428}),
    ("mrpc", "train"): (3_668, {1: 2_474, 0: 1_194}),
    ("mrpc", "dev"): (408, {1: 279, 0: 129}),
    ("rte", "train"): (2_490, {0: 1_249, 1: 1_241}),  # entailment / not_entailment
    ("rte", "dev"): (277, {0: 146, 1: 131}),
    ("cola", "train"): (8_551, {1: 6_023, 0: 2_528}),  # acceptable / unacceptable
    ("cola", "dev"): (1_043, {1: 721, 0: 322}),
    ("stsb", "train"): (5_749, None),
    ("stsb", "dev"): (1_500, None),
}


@pytest.mark.parametrize("task,split", list(COUNTS))
def test_real_files_match_sources_md(data_dir, task, split):
    rows, label_counts = COUNTS[task, split]
    examples = read_glue(task, split, data_dir=data_dir)
    assert len(examples) == rows
    pair = glue.TASKS[task].text_b is not None
    assert all((e.text_b is not None) == pair and e.text_a for e in examples)
    if label_counts is None:
        assert all(isinstance(e.label, float) and 0.0 <= e.label <= 5.0 for e in examples)
    else:
        assert dict(collections.Counter(e.label for e in examples)) == label_counts


def test_first_rows(data_dir):
    # MRPC's header starts with a BOM and its text has unbalanced quotes.
    mrpc = read_glue("mrpc", "dev", data_dir=data_dir)[0]
    assert mrpc == Example(
        "He said the foodservice pie business doesn't fit the company's long-term growth strategy.",
        '"The foodservice pie business does not fit our long-term growth strategy.', 1)
    # CoLA has no header: the first line is an example.
    assert read_glue("cola", "dev", data_dir=data_dir)[0] == Example(
        "The sailors rode the breeze clear of the rocks.", None, 1)
    rte = read_glue("rte", "dev", data_dir=data_dir)[0]
    assert rte.text_b == "Christopher Reeve had an accident."
    assert read_glue("stsb", "dev", data_dir=data_dir)[1] == Example(
        "A young child is riding a horse.", "A child is riding a horse.", 4.75)


def test_default_data_dir_from_env(data_dir, monkeypatch):
    monkeypatch.setenv("LORA_JAX_DATA_DIR", str(data_dir))
    assert len(read_glue("rte", "dev")) == 277


def test_task_table():
    assert set(glue.TASKS) == {"mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb"}
    assert glue.TASKS["mnli"].label_names == ("entailment", "neutral", "contradiction")
    assert glue.TASKS["mnli"].files["dev"] == "dev_matched.tsv"
    assert glue.TASKS["stsb"].num_labels == 1 and glue.TASKS["stsb"].is_regression
    assert {t: s.num_labels for t, s in glue.TASKS.items() if t != "stsb"} == {
        "mnli": 3, "sst2": 2, "mrpc": 2, "cola": 2, "qnli": 2, "qqp": 2, "rte": 2}
    assert glue.TASKS["cola"].metrics == ("matthews_corrcoef",)


def _write(tmp_path, dirname, name, text):
    path = tmp_path / "glue" / dirname / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_tasks_without_local_files(tmp_path):
    # MNLI, QNLI, QQP are not in the shared data; check their layouts on tiny files.
    head = ("index\tpromptID\tpairID\tgenre\tsentence1_binary_parse\tsentence2_binary_parse\t"
            "sentence1_parse\tsentence2_parse\tsentence1\tsentence2")
    _write(tmp_path, "MNLI", "train.tsv",
           head + "\tlabel1\tgold_label\n0\t1\t2\tfic\tb\tb\tp\tp\tA \"cat\".\tAn animal.\t"
           "entailment\tentailment\n")
    _write(tmp_path, "MNLI", "dev_mismatched.tsv",
           head + "\tlabel1\tlabel2\tlabel3\tlabel4\tlabel5\tgold_label\n"
           "0\t1\t2\tfic\tb\tb\tp\tp\tA.\tB.\tneutral\tneutral\tneutral\tneutral\tneutral\t"
           "contradiction\n")
    _write(tmp_path, "QNLI", "dev.tsv",
           "index\tquestion\tsentence\tlabel\n0\tWho?\tHe.\tnot_entailment\n")
    _write(tmp_path, "QQP", "train.tsv",
           "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n0\t1\t2\tHow?\tWhy?\t1\n")
    assert read_glue("mnli", "train", data_dir=tmp_path) == [Example('A "cat".', "An animal.", 0)]
    assert read_glue("mnli", "dev_mismatched", data_dir=tmp_path) == [Example("A.", "B.", 2)]
    assert read_glue("qnli", "dev", data_dir=tmp_path) == [Example("Who?", "He.", 1)]
    assert read_glue("qqp", "train", data_dir=tmp_path) == [Example("How?", "Why?", 1)]


@pytest.mark.parametrize("task,dirname,text,line,message", [
    ("sst2", "SST-2", "sentence\tlabel\ngood movie\t1\nno label here\n", 3,
     "expected 2 tab-separated"),
    ("sst2", "SST-2", "sentence\tlabel\ngood movie\t1\nbad\t2\n", 3, "expected a label in"),
    ("rte", "RTE", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentails\n", 2, "expected a label"),
    ("stsb", "STS-B", "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\t"
     "sentence2\tscore\n0\tg\tf\ty\to\ts\ts\ta\tb\tfive\n", 2, "expected a float score"),
    ("cola", "CoLA", "gj04\t1\t\tFine.\ngj04\t1\tFine.\n", 2, "expected 4 tab-separated"),
])
def test_malformed_row_names_file_and_line(tmp_path, task, dirname, text, line, message):
    path = _write(tmp_path, dirname, "train.tsv", text)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:{line}: {message}"):
        read_glue(task, "train", data_dir=tmp_path)


def test_missing_header_column(tmp_path):
    path = _write(tmp_path, "SST-2", "dev.tsv", "text\tlabel\nfine\t1\n")
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:1: expected a header"):
        read_glue("sst2", "dev", data_dir=tmp_path)


def test_skip_malformed_counts_and_warns_once(tmp_path, caplog):
    path = _write(tmp_path, "SST-2", "train.tsv",
                  "sentence\tlabel\ngood\t1\nbroken\nbad\t0\nworse\tx\n\nfine\t1\n")
    with caplog.at_level(logging.WARNING, logger="lora_jax.data.glue"):
        examples, report = read_glue_with_report("sst2", "train", data_dir=tmp_path,
                                                 on_malformed="skip")
    assert [e.text_a for e in examples] == ["good", "bad", "fine"]
    assert report.skipped == 2 and report.skipped_lines == (3, 5)
    assert report.source == str(path) and report.examples == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2 malformed rows" in warnings[0].getMessage()


def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"SST-2/dev.tsv not found.*LORA_JAX_DATA_DIR"):
        read_glue("sst2", "dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst'.*sst2.*stsb"):
        read_glue("sst", "dev", data_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown split 'test'.*train, dev"):
        read_glue("sst2", "test", data_dir=tmp_path)
    with pytest.raises(ValueError, match="on_malformed"):
        read_glue("sst2", "dev", data_dir=tmp_path, on_malformed="ignore")
    with pytest.raises(ValueError, match="source"):
        read_glue("sst2", "dev", data_dir=tmp_path, source="web")


@pytest.fixture
def fake_hub(monkeypatch):
    """Replaces datasets.load_dataset by in-memory tables; records the calls."""
    import datasets

    calls, tables = [], {}

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(tables[name, split])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls, tables


def test_hub_source(fake_hub):
    calls, tables = fake_hub
    tables["rte", "validation"] = {"sentence1": ["a", "c"], "sentence2": ["b", "d"],
                                   "label": [1, 0], "idx": [0, 1]}
    tables["sst2", "train"] = {"sentence": ["fine"], "label": [1], "idx": [0]}
    tables["stsb", "train"] = {"sentence1": ["a"], "sentence2": ["b"], "label": [3.8], "idx": [0]}
    tables["mnli", "validation_mismatched"] = {"premise": ["p"], "hypothesis": ["h"],
                                               "label": [2], "idx": [0]}
    assert read_glue("rte", "dev", source="hub") == [Example("a", "b", 1), Example("c", "d", 0)]
    assert read_glue("sst2", "train", source="hub") == [Example("fine", None, 1)]
    [score] = read_glue("stsb", "train", source="hub")
    assert score.label == pytest.approx(3.8) and isinstance(score.label, float)
    assert read_glue("mnli", "dev_mismatched", source="hub") == [Example("p", "h", 2)]
    assert calls == [("nyu-mll/glue", "rte", "validation"), ("nyu-mll/glue", "sst2", "train"),
                     ("nyu-mll/glue", "stsb", "train"),
                     ("nyu-mll/glue", "mnli", "validation_mismatched")]


def test_hub_bad_label(fake_hub):
    _, tables = fake_hub
    tables["cola", "train"] = {"sentence": ["ok", "hidden"], "label": [1, -1], "idx": [0, 1]}
    with pytest.raises(ValueError, match=r"nyu-mll/glue/cola\[train\] row 1"):
        read_glue("cola", "train", source="hub")
    examples, report = read_glue_with_report("cola", "train", source="hub", on_malformed="skip")
    assert examples == [Example("ok", None, 1)] and report.skipped_lines == (1,)


# --- The task registry ---------------------------------------------------------------------------

def test_every_glue_task_has_its_metrics():
    from lora_jax.metrics.glue import TASK_METRICS

    assert list(glue.TASKS) == list(TASK_METRICS)


def test_the_task_registry_says_how_each_task_is_trained_and_scored(tmp_path):
    import ml_collections

    from lora_jax.data.tasks import TASKS, task_entry

    assert list(TASKS) == [*glue.TASKS, "e2e", "instruct"]
    assert [name for name, entry in TASKS.items() if entry.model_task is None] == ["e2e",
                                                                                   "instruct"]
    assert (task_entry("stsb").kind, task_entry("stsb").num_labels) == ("regression", 1)
    assert (task_entry("mnli").model_task, task_entry("mnli").num_labels) == ("classification", 3)
    assert task_entry("e2e").eval_splits == ("dev", "test") and task_entry("e2e").generation
    assert task_entry("rte").eval_splits == ("dev",) and task_entry("rte").generation is None
    assert list(task_entry("instruct").required) == ["path"]
    with pytest.raises(ValueError, match=r"unknown data.task 'sst'; registered: mnli, .*instruct"):
        task_entry("sst")

    def data(**fields):
        return ml_collections.ConfigDict({"source": "files", "data_dir": str(tmp_path), **fields})

    rte = task_entry("rte").inputs(data(task="rte"), ("train", "dev"))
    assert rte.root == tmp_path and rte.files == [tmp_path / "glue/RTE/train.tsv",
                                                  tmp_path / "glue/RTE/dev.tsv"]
    assert task_entry("rte").inputs(data(task="rte", source="hub"), ("dev",)).hub == glue.HUB_ID
    e2e = task_entry("e2e").inputs(data(task="e2e"), ("test",))
    assert e2e.files == [tmp_path / "e2e/testset_w_refs.csv"] and e2e.hub is None
    instruct = task_entry("instruct").inputs(
        data(task="instruct", path=str(tmp_path / "a/train.jsonl"),
             eval_path=str(tmp_path / "b/dev.jsonl")), ("train", "dev"))
    assert instruct.root == tmp_path and instruct.files == [tmp_path / "a/train.jsonl",
                                                            tmp_path / "b/dev.jsonl"]
