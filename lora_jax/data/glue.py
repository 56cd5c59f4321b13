"""GLUE tasks from the original TSV files (the `download_glue_data.py` layout)."""

import csv
import pathlib


def read_sst2(path: str | pathlib.Path) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels of an SST-2 `train.tsv` or `dev.tsv`.

    Raises:
      ValueError: a malformed row, named by file and line.
    """
    path = pathlib.Path(path)
    sentences, labels = [], []
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header != ["sentence", "label"]:
            raise ValueError(f"{path}:1: expected the header 'sentence<TAB>label', got {header}")
        for line, row in enumerate(rows, start=2):
            if len(row) != 2 or row[1] not in ("0", "1"):
                raise ValueError(f"{path}:{line}: expected 'sentence<TAB>0|1', got {row}")
            sentences.append(row[0])
            labels.append(int(row[1]))
    return sentences, labels
