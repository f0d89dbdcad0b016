"""Reading the project's JSON files (``.json``, or gzip-compressed ``.json.gz``) with one-line
errors that name the file: results files, custom data set files; and writing a report (the
benchmarks' JSON). Standard library only."""
from __future__ import annotations

import gzip
import json
import os
from typing import Any

from .atomic_write import write_atomically

__all__ = ["JSON_SUFFIXES", "load_json_file", "write_json_file"]

JSON_SUFFIXES = (".json", ".json.gz")


def load_json_file(path: str, what: str) -> Any:
    """The JSON content of ``path``, ``what`` naming the kind of file in the errors
    (``"results file"``).

    Raises:
        ValueError: ``<path>: a <what> must end with .json or .json.gz`` or ``<path>: not a
            readable JSON <what> (<reason>)`` (not JSON, truncated gzip, not UTF-8).
        FileNotFoundError: ``<path>: <what> not found``.
    """
    if not path.endswith(JSON_SUFFIXES):
        raise ValueError(f"{path}: a {what} must end with .json or .json.gz")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: {what} not found")
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return json.load(f)
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON {what} ({e})") from None


def write_json_file(path: str, content: Any) -> None:
    """Write ``content`` as indented JSON to ``path``, creating its folder; atomically (a run
    killed mid-write leaves the previous file, or none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomically(path, lambda f: json.dump(content, f, indent=1), mode="w")
