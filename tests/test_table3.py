"""Table 3 in miniature: the rows of configs/table3.py, the pipeline on a tiny Llama (train,
decode, forgetting, intruders, records, resume), the report from records, and (slow) one cell's
command reproducing its committed record."""

import json
import pathlib
import re
import shlex

import pytest

from experiments import table3, table3_report
from lora_jax.config import load_config

REPO = pathlib.Path(__file__).resolve().parents[1]
RECORDS = REPO / "experiments/results/table3/records"


def test_rows_are_the_issues_with_three_seeds_of_ft_and_both_loras():
    c = load_config("configs/table3.py")
    names = [r["name"] for r in c.runs]
    rows = {r["method"] for r in c.runs}
    assert rows == {"zero_shot", "full", "lora", "lora_all", "qlora", "qlora_gguf", "dora",
                    "adapter_l", "adapter_h", "prelayer", "preembed"}
    seeds = {row: sum(r["method"] == row for r in c.runs) for row in rows}
    assert seeds == {row: 3 if row in ("full", "lora", "lora_all") else 1 for row in rows}
    # Seed 0 of every row first: a table half done has every row.
    assert [r["seed"] for r in c.runs[:len(rows)]] == [0] * len(rows)
    assert names.index("method=zero_shot,seed=0") == 0
    runs = {r["name"]: r for r in c.runs}
    assert not runs["method=zero_shot,seed=0"]["train"]
    lora = runs["method=lora,seed=0"]["overrides"]
    assert lora == {"seed": 0}  # configs/e2e.py's LoRA: the paper's Wq, Wv, r=4, alpha 32
    assert (c.base.method.lora.rank, c.base.method.lora.alpha, c.base.method.lora.dropout) == (
        4, 32.0, 0.1)
    qlora = runs["method=qlora,seed=0"]["overrides"]
    assert qlora["model.quantize"] == "nf4" and qlora["method.lora.rank"] == 8
    assert len(qlora["method.lora.targets"]) == 7
    assert runs["method=qlora_gguf,seed=0"]["overrides"]["model.quantize"] == "gguf"
    # One beam and one split for every row; warmup a tenth of the steps.
    assert c.base.generate.beam_size == 2 and c.scoring.split == "test"
    assert c.base.optim.warmup_steps == round(0.1 * c.base.train.max_steps)
    with pytest.raises(ValueError, match="model"):
        load_config("configs/table3.py:model=gpt2")


TINY = "configs/table3.py:model=tiny,steps=2,seeds=1,beam=2"


def test_tiny_table_trains_scores_records_and_resumes(tmp_path, capsys, data_dir):
    only = r"zero_shot|method=(lora|full),"
    records = table3.table3(TINY, tmp_path / "out", tmp_path / "records", only)
    by_row = {r["method"]: r for r in records}
    assert list(by_row) == ["zero_shot", "full", "lora"]
    for row, r in by_row.items():
        assert set(r["scores"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
        assert r["outputs"] == 6 and r["score_peak_rss_bytes"] > 0
        lines = (tmp_path / "out" / r["name"] / "predictions-test.txt").read_text().splitlines()
        assert len(lines) == 6
    floor = by_row["zero_shot"]
    assert floor["steps"] == 0 and floor["trained_params"] == 0
    assert floor["forgetting"] == 0.0 and floor["heldout"] == floor["heldout_base"]
    # Every run's base is the floor's model: the same held-out loss before training.
    assert {r["heldout_base"]["loss"] for r in records} == {floor["heldout"]["loss"]}
    assert by_row["lora"]["trained_params"] == 2 * 2 * 4 * (32 + 32) - 2 * 4 * 16  # q + v (GQA)
    assert by_row["full"]["trained_params"] > 10 * by_row["lora"]["trained_params"]
    for row in ("full", "lora"):
        assert by_row[row]["train_peak_rss_bytes"] > 0 and by_row[row]["steps"] == 2
        assert len(by_row[row]["intruders"]) == 2 * 7  # every block matrix of 2 blocks
        assert by_row[row]["forgetting"] == pytest.approx(
            by_row[row]["heldout"]["loss"] - floor["heldout"]["loss"])
    assert "intruders" not in floor
    capsys.readouterr()
    again = table3.table3(TINY, tmp_path / "out", tmp_path / "records", only)
    assert capsys.readouterr().out.count("skipping") == 3 and again == records
    text = table3_report.report(tmp_path / "records", tmp_path / "report")
    assert "| FT | " in text and "| zero-shot (chat template) | 0 | 1 |" in text
    for name in ("gain_vs_forgetting.png", "intruders.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


def test_a_failed_phase_stops_with_its_name(tmp_path):
    with pytest.raises(ValueError, match="no run named"):
        table3.find_run(load_config(TINY), "method=nothing,seed=0")
    with pytest.raises(ValueError, match="matches no run"):
        table3.table3(TINY, tmp_path, None, "nothing")


def test_report_medians_and_spreads():
    assert table3_report.spread([0.5, 0.7, 0.6], 2) == "0.60 [0.50, 0.70]"
    assert table3_report.spread([0.5], 1) == "0.5"


def test_the_paper_rows_are_paper_mds(data_dir):
    """PAPER_GPT2_M is ../shared/PAPER.md's Table 3 (GPT-2 M): trained and every metric."""
    section = (data_dir.parent / "PAPER.md").read_text().split("## Table 3")[1].split("\n## ")[0]
    labels = {"FT": "full", "LoRA": "lora", "Adapter^L": "adapter_l", "Adapter^H": "adapter_h",
              "PreLayer": "prelayer"}
    paper = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in labels:
            row = labels[cells[0]]
            if row == "adapter_l" and cells[1] != "0.37M":
                continue  # the paper's larger Adapter^L; ours matches LoRA's budget
            paper[row] = (cells[1], tuple(float(c.split("+-")[0]) for c in cells[2:7]))
    assert paper == table3_report.PAPER_GPT2_M


def test_beside_the_paper_puts_each_rows_median_by_the_papers():
    def record(seed, bleu):
        scores = {"BLEU": bleu, "NIST": 5.0, "METEOR": 0.3, "ROUGE_L": 0.6, "CIDEr": 1.5}
        return {"seed": seed, "trained_params": 230_400, "scores": scores}

    rows = {"zero_shot": [record(0, 0.1)], "lora": [record(0, 0.40), record(1, 0.44),
                                                    record(2, 0.41)]}
    lines = table3_report.beside_the_paper(rows).splitlines()
    assert len(lines) == 3  # header, rule, LoRA: the paper has no zero-shot row
    assert lines[2] == ("| LoRA (Wq, Wv, r=4) | 0.23M / 0.35M | 41.0 / 70.4 | 5.00 / 8.85 "
                        "| 30.0 / 46.8 | 60.0 / 71.8 | 1.50 / 2.53 |")


def printed_command() -> list[str]:
    """The command after "One cell of Table 3 can be rerun" in experiments/README.md."""
    text = (REPO / "experiments" / "README.md").read_text()
    block = re.search(r"One cell of Table 3 can be rerun.*?```bash\n(.*?)```", text, re.S)
    assert block, "experiments/README.md prints no command for one cell of Table 3"
    argv = shlex.split(block.group(1).replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "experiments.table3"], argv
    return argv[3:]


def test_the_printed_cell_is_a_committed_record():
    argv = printed_command()
    only = argv[argv.index("--only") + 1]
    recorded = [p for p in RECORDS.glob("*.json") if re.search(only, p.stem)]
    assert len(recorded) == 1, (only, recorded)


@pytest.mark.slow  # trains and decodes one SmolLM2 cell: see experiments/README.md for its time
def test_the_printed_command_reproduces_its_cell(tmp_path, data_dir):
    argv = printed_command()
    argv[argv.index("--out") + 1] = str(tmp_path / "out")
    records = argv.index("--records") if "--records" in argv else None
    if records is not None:
        argv[records + 1] = str(tmp_path / "records")
    table3.main(argv)
    (path,) = (tmp_path / "out").glob("*/record.json")
    rerun = json.loads(path.read_text())
    committed = json.loads((RECORDS / f"{rerun['name']}.json").read_text())
    for key in ("trained_params", "steps", "beam", "outputs"):
        assert rerun[key] == committed[key], key
    assert rerun["scores"] == committed["scores"]  # the same outputs: decoding is exact
    assert rerun["heldout"] == committed["heldout"]


def test_report_minutes_say_cpu_and_resumed():
    assert table3_report.minutes([600.0, 720.0, 660.0], [1200.0, None, 1320.0]) == (
        "11.0 (CPU 21.0)")
    assert table3_report.minutes([60.0], [None], resumed=True) == "1.0*"


def test_a_pause_file_holds_the_next_phase(tmp_path, monkeypatch):
    (tmp_path / table3.PAUSE).touch()
    slept = []

    def sleep(seconds):  # the flag is removed while the driver waits
        slept.append(seconds)
        (tmp_path / table3.PAUSE).unlink()

    monkeypatch.setattr(table3.time, "sleep", sleep)
    table3.wait_while_paused(tmp_path)
    assert slept == [10] and not (tmp_path / table3.PAUSE).exists()
    table3.wait_while_paused(tmp_path)  # no flag: no wait
    assert slept == [10]


def test_the_memory_and_cpu_columns_measure_this_process():
    """Known answers for the peak-memory and CPU-time columns, in a fresh process started by a
    larger one: touching a 1 GiB array raises the resident high-water mark by about that much
    (not the parent's 2 GiB), and a busy loop of 0.3 CPU seconds adds that much CPU time."""
    import subprocess
    import sys

    code = """
import os
import numpy as np
from experiments import table3
with open("/proc/self/statm") as f:  # resident now (an import's transient peak may be higher)
    before = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
block = np.ones(2**30 // 8)
grown = table3.peak_rss_bytes() - before
start = table3.cpu_s()
x = 0
while table3.cpu_s() - start < 0.3:
    x += 1
print(grown / 2**20, table3.cpu_s() - start)
"""
    # Started by a parent larger than the 1 GiB (a test worker or the driver can be): the
    # column must not report the parent's high-water mark, which Linux's ru_maxrss carries over.
    parent = f"""
import subprocess, sys
import numpy as np
held = np.ones(2 * 2**30 // 8)
print(subprocess.run([sys.executable, "-c", {code!r}], capture_output=True, text=True,
                     check=True).stdout)
"""
    out = subprocess.run([sys.executable, "-c", parent], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    grown_mib, cpu = float(out[0]), float(out[1])
    assert 1020 <= grown_mib <= 1100, grown_mib
    assert 0.3 <= cpu < 0.4, cpu
