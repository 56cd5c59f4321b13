"""Datasets read from local files (never copied into the project)."""

import os
import pathlib

_REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def data_dir() -> pathlib.Path:
    """The data root: $LORA_JAX_DATA_DIR, else `../shared/data` beside the project root.

    Raises:
      FileNotFoundError: the directory does not exist; the message says how to set it.
    """
    path = pathlib.Path(os.environ.get("LORA_JAX_DATA_DIR", _REPO_ROOT.parent / "shared" / "data"))
    if not path.is_dir():
        raise FileNotFoundError(
            f"data directory {path} does not exist; set LORA_JAX_DATA_DIR to the folder that "
            "holds glue/, e2e/ and tokenizers/"
        )
    return path.absolute()


def resolve(root: str | os.PathLike | None) -> pathlib.Path:
    """The data root a run reads: `root` when given (a config's data.data_dir), else
    `data_dir()`. Every reader and the run's input record (`lora_jax.training.fingerprints`) go
    through here, so the config field and the environment variable name the data alike."""
    return pathlib.Path(root).expanduser().absolute() if root is not None else data_dir()
