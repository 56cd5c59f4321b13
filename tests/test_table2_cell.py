"""The Table 2 miniature's report prints a command that reruns one of its cells; that command,
run as printed (its --out moved to a temporary directory), gives the committed record."""

import json
import pathlib
import re
import shlex

import pytest

from experiments import sweep

REPO = pathlib.Path(__file__).resolve().parents[1]


def printed_command() -> list[str]:
    """The sweep command after "Any single cell can be rerun" in experiments/README.md."""
    text = (REPO / "experiments" / "README.md").read_text()
    block = re.search(r"Any single cell can be rerun.*?```bash\n(.*?)```", text, re.S).group(1)
    argv = shlex.split(block.replace("\\\n", " "))
    assert argv[:3] == ["python", "-m", "experiments.sweep"], argv
    return argv[3:]


def test_the_report_prints_a_sweep_of_one_recorded_cell():
    argv = printed_command()
    only = argv[argv.index("--only") + 1]
    task = re.search(r"task=(\w+)", argv[argv.index("--config") + 1]).group(1)
    recorded = [p for p in (REPO / "experiments/results/table2/records" / task).glob("*.json")
                if re.search(only, p.stem)]
    assert len(recorded) == 1, (only, recorded)


@pytest.mark.slow  # one real MiniLM run of 250 steps: about 2 minutes
def test_the_printed_command_reproduces_its_cell(tmp_path, data_dir):
    argv = printed_command()
    argv[argv.index("--out") + 1] = str(tmp_path / "sweep")
    (record,) = sweep.main(argv)
    task = re.search(r"task=(\w+)", argv[argv.index("--config") + 1]).group(1)
    committed = json.loads((REPO / "experiments/results/table2/records" / task /
                            f"{record['name']}.json").read_text())
    for key in ("trained_params", "lora_params", "metric", "best_step", "best", "final"):
        assert record[key] == committed[key], key
