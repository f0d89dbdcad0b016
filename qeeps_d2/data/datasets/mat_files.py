"""Reading and writing MATLAB .mat files of the person-search data sets, with clear errors.

Numpy/scipy only. Reading wraps :func:`scipy.io.loadmat` so that a missing file raises
``FileNotFoundError`` and an unreadable one ``ValueError``, both naming the file and what it is
(``"CUHK-SYSU pool list"``). Writing produces byte-identical files for identical content: scipy
stamps the creation time into the 116-byte MAT-file header text, which is replaced by a fixed text.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, Sequence

import numpy as np
import scipy.io

__all__ = ["read_mat", "read_mat_key", "write_mat", "MatLayoutError"]

_HEADER_TEXT_BYTES = 116
_HEADER_TEXT = b"MATLAB 5.0 MAT-file, written by qeeps_d2"


class MatLayoutError(ValueError):
    """A .mat file was read but does not have the expected structure."""


def read_mat(path: str, what: str) -> Dict[str, Any]:
    """Load ``path`` with scipy's defaults (no squeezing, structs as records).

    Args:
        path: the .mat file.
        what: a short description used in error messages, e.g. ``"CUHK-SYSU image list"``.
    Returns:
        the dict of variables from :func:`scipy.io.loadmat`.
    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a readable .mat file.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # scipy raises many types (ValueError, TypeError, MatReadError, ...)
        raise ValueError(f"{what} {path} is not a readable .mat file: {e}") from e


def read_mat_key(path: str, what: str, keys: Sequence[str]) -> np.ndarray:
    """Load ``path`` and return the value of the first of ``keys`` present in it.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unreadable file, or none of ``keys`` in it (the message lists the keys found).
    """
    content = read_mat(path, what)
    for key in keys:
        if key in content:
            return content[key]
    found = sorted(k for k in content if not k.startswith("__"))
    expected = " or ".join(map(repr, keys))
    raise MatLayoutError(f"{what} {path}: expected a variable named {expected}, found {found}")


def write_mat(path: str, variables: Dict[str, Any]) -> None:
    """Write ``variables`` to ``path`` as a compressed MAT 5 file with a fixed header text.

    Parent folders are created. Identical ``variables`` give identical bytes.
    """
    buffer = io.BytesIO()
    scipy.io.savemat(buffer, variables, do_compression=True, oned_as="row")
    data = bytearray(buffer.getvalue())
    data[:_HEADER_TEXT_BYTES] = _HEADER_TEXT.ljust(_HEADER_TEXT_BYTES, b" ")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes(data))
