"""Local GLUE files: real rows in, malformed rows named by file and line."""

import pytest

from lora_jax.data.glue import read_sst2


def test_sst2_dev_counts(data_dir):
    sentences, labels = read_sst2(data_dir / "glue" / "SST-2" / "dev.tsv")
    assert len(sentences) == 872
    assert sum(labels) == 444  # SOURCES.md: 444 positive / 428 negative


def test_malformed_row_names_file_and_line(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_text("sentence\tlabel\ngood movie\t1\nno label here\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected"):
        read_sst2(path)
