"""Reading the JSON files a run depends on, with errors that name the file and what is wrong."""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterable
from typing import Any

from lora_jax.errors import FileFormatError


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """The parsed contents of a JSON file.

    Raises:
      FileNotFoundError: no such file.
      FileFormatError: the file is empty or not valid JSON (line and column named).
    """
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise FileFormatError(f"{path} is empty; it should hold a {what}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise FileFormatError(f"{path} is not valid JSON ({error.msg} at line {error.lineno} "
                              f"column {error.colno}); it should hold a {what}") from None


def read_json_object(path: str | os.PathLike, *, what: str = "JSON object",
                     required: Iterable[str] = ()) -> dict[str, Any]:
    """`read_json` for a file that must hold one object with the `required` keys.

    Raises:
      FileFormatError: not an object, or a required key is missing (all missing keys named).
    """
    value = read_json(path, what=what)
    if not isinstance(value, dict):
        raise FileFormatError(f"{path} holds a JSON {type(value).__name__}, not the object of a "
                              f"{what}")
    missing = [key for key in required if key not in value]
    if missing:
        raise FileFormatError(f"{path} lacks {', '.join(map(repr, missing))}, which a {what} "
                              "must have")
    return value
