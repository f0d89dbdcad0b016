"""On-disk cache of parsed data set files (numpy only; nothing is ever unpickled).

Parsing the large CUHK-SYSU .mat files or reading 18k image headers takes seconds to minutes;
their parsed form is stored once and reused while the source files are unchanged. A cache entry is
keyed by a *fingerprint* of its sources (path, size and modification time of every file), so any
change to a source invalidates it.

An entry is one ``.npz`` archive read with ``allow_pickle=False``: numeric and string arrays plus
a JSON text telling how they nest. Loading an entry therefore cannot run code (a planted pickle is
refused, not loaded). The cached values are built from numeric numpy arrays, lists of str, lists
of arrays, tuples and dicts of these; their expected layout is given as a *spec* (:class:`Array`,
:data:`STRINGS`, :class:`ArrayList`, tuples and dicts of specs).

A bad entry (not an .npz archive -- e.g. a pickle written by an older version --, unreadable,
written for another key, or holding arrays of another dtype, shape or nesting than the spec) is a
cache miss: one warning line naming the file, then the value is recomputed and the entry
rewritten atomically.

Entries live in ``<data set root>/.cache/qeeps_d2/`` or, when that is not writable, in
``$XDG_CACHE_HOME/qeeps_d2`` (default ``~/.cache/qeeps_d2``); when neither is writable the value is
computed every time. Setting ``QEEPS_D2_NO_CACHE=1`` disables the cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, TypeVar

import numpy as np

from ...utils.atomic_write import write_atomically

__all__ = ["Array", "ArrayList", "STRINGS", "cached", "file_fingerprint"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when the layout of any cached value changes (2: .npz entries instead of pickles).
_CACHE_FORMAT = 2
_ZIP_MAGIC = b"PK\x03\x04"
_KEY, _SPEC, _VALUE = "__key__", "__spec__", "value"


@dataclass(frozen=True)
class Array:
    """Spec of a numeric ndarray: its dtype (e.g. ``"float64"``) and shape, ``None`` for a free
    length (``Array("float64", (None, 4))`` is any (n, 4) float64 array)."""

    dtype: str
    shape: Tuple[Optional[int], ...]

    def check(self, value: Any, name: str) -> np.ndarray:
        """``value`` if it matches this spec, else ValueError naming the mismatch."""
        if not (isinstance(value, np.ndarray) and value.dtype == np.dtype(self.dtype)
                and value.ndim == len(self.shape)
                and all(n is None or n == m for n, m in zip(self.shape, value.shape))):
            got = (f"{value.dtype} array of shape {value.shape}" if isinstance(value, np.ndarray)
                   else type(value).__name__)
            raise ValueError(f"{name}: expected a {self.dtype} array of shape "
                             f"{tuple(self.shape)}, got {got}")
        return value


@dataclass(frozen=True)
class ArrayList:
    """Spec of a list of arrays, each matching ``item`` (whose first length must be free); stored
    as the arrays concatenated along their first axis plus their lengths."""

    item: Array


class _Strings:
    """Spec of a list of str (stored as a numpy unicode array)."""

    def __repr__(self) -> str:
        return "STRINGS"


STRINGS = _Strings()
"""Spec of a list of str."""


def file_fingerprint(paths: Iterable[str]) -> str:
    """A hex digest of the absolute path, size and mtime (ns) of each file, in the given order.

    Raises:
        FileNotFoundError: one of the files does not exist (from ``os.stat``).
    """
    digest = hashlib.sha1()
    for path in paths:
        st = os.stat(path)
        digest.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _cache_dirs(root: str) -> List[str]:
    user = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [os.path.join(root, ".cache", "qeeps_d2"), os.path.join(user, "qeeps_d2")]


def cached(root: str, tag: str, fingerprint: str, compute: Callable[[], T], spec=None) -> T:
    """Return the cached value of ``compute()`` for ``(root, tag, fingerprint)``, computing it once.

    Args:
        root: the data set root, where the preferred cache folder lives.
        tag: names the kind of value, e.g. ``"cuhk_images"``; part of the file name.
        fingerprint: identifies the sources (see :func:`file_fingerprint`).
        compute: produces the value when no valid cache entry exists.
        spec: the layout the value must have (see the module docstring); an entry that does not
            match it is a miss. ``None``: the layout is taken from the value when it is stored
            and from the entry when it is read (only its consistency is then checked).
    """
    if os.environ.get("QEEPS_D2_NO_CACHE"):
        return compute()
    key = hashlib.sha1(
        f"{_CACHE_FORMAT}\0{os.path.abspath(root)}\0{tag}\0{fingerprint}".encode()).hexdigest()
    file_name = f"{tag}-{key}.npz"
    dirs = _cache_dirs(root)
    for folder in dirs:
        path = os.path.join(folder, file_name)
        try:
            f = open(path, "rb")
        except OSError:  # absent, or the folder is unusable
            continue
        with f:
            try:
                return _read_entry(f, key, spec)
            except Exception as e:  # noqa: BLE001 - any bad content is a miss; no code ran
                reason = str(e) if type(e) is ValueError else f"{type(e).__name__}: {e}"
                reason = reason.replace("\n", " ")
                logger.warning("Ignoring bad cache entry %s (%s); rebuilding it", path, reason)
                break  # rebuild now so that the bad entry gets overwritten
    value = compute()
    arrays = _entry_arrays(key, spec, value)
    for i, folder in enumerate(dirs):
        # Stale entries are pruned only in the data set's own folder: the per-user folder is
        # shared by several roots.
        if _store(folder, file_name, tag, arrays, prune=(i == 0)):
            break
    return value


# ------------------------------------------------------------------------------------------------
# Reading and writing entries
# ------------------------------------------------------------------------------------------------

def _read_entry(f, key: str, spec):
    """The value stored in the open entry ``f``; ValueError (or any error) when it is bad."""
    if f.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
        raise ValueError("not an .npz archive (a pickle of an older version, or a foreign file)")
    f.seek(0)
    with np.load(f, allow_pickle=False) as npz:
        arrays = {name: npz[name] for name in npz.files}
    if _text(arrays.pop(_KEY, None), _KEY) != key:
        raise ValueError("written for another key")
    stored_spec = _text(arrays.pop(_SPEC, None), _SPEC)
    if spec is None:
        spec = _spec_from_json(json.loads(stored_spec))
    used: List[str] = []
    value = _decode(spec, _VALUE, arrays, used)
    extra = sorted(set(arrays) - set(used))
    if extra:
        raise ValueError(f"unexpected arrays {extra[:3]}")
    return value


def _text(array, name: str) -> str:
    if not (isinstance(array, np.ndarray) and array.dtype.kind == "U" and array.ndim == 0):
        raise ValueError(f"{name}: expected a text entry")
    return str(array[()])


def _entry_arrays(key: str, spec, value) -> Dict[str, np.ndarray]:
    """The arrays of the entry storing ``value`` (ValueError when it does not match ``spec``)."""
    spec = _spec_of(value) if spec is None else spec
    arrays = {_KEY: np.array(key), _SPEC: np.array(json.dumps(_spec_to_json(spec)))}
    _encode(spec, value, _VALUE, arrays)
    return arrays


def _store(folder: str, file_name: str, tag: str, arrays: Dict[str, np.ndarray],
           prune: bool) -> bool:
    """Atomically write ``arrays`` to ``folder/file_name``; ``prune`` drops other ``tag`` entries
    (older keys and old-format pickles). False when the folder is not writable."""
    try:
        os.makedirs(folder, exist_ok=True)
        write_atomically(os.path.join(folder, file_name), lambda f: np.savez(f, **arrays))
    except OSError:
        return False
    if not prune:
        return True
    for other in os.listdir(folder):
        if other.startswith(tag + "-") and other != file_name:
            try:
                os.remove(os.path.join(folder, other))
            except OSError:
                pass
    return True


# ------------------------------------------------------------------------------------------------
# Specs: encoding, decoding, JSON form
# ------------------------------------------------------------------------------------------------

def _encode(spec, value, name: str, out: Dict[str, np.ndarray]) -> None:
    """Add the arrays of ``value`` (checked against ``spec``) to ``out``, named under ``name``."""
    if isinstance(spec, Array):
        out[name] = spec.check(value, name)
    elif spec is STRINGS:
        if not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise ValueError(f"{name}: expected a list of str, got {type(value).__name__}")
        out[name] = np.array(value, dtype=str).reshape(-1)
    elif isinstance(spec, ArrayList):
        if not isinstance(value, list):
            raise ValueError(f"{name}: expected a list of arrays, got {type(value).__name__}")
        items = [spec.item.check(v, f"{name}[{i}]") for i, v in enumerate(value)]
        empty = np.zeros((0, *spec.item.shape[1:]), np.dtype(spec.item.dtype))
        out[name + "#rows"] = np.concatenate([empty, *items])
        out[name + "#lengths"] = np.array([len(v) for v in items], np.int64)
    elif isinstance(spec, tuple):
        if not (isinstance(value, tuple) and len(value) == len(spec)):
            raise ValueError(f"{name}: expected a tuple of {len(spec)}")
        for i, (s, v) in enumerate(zip(spec, value)):
            _encode(s, v, f"{name}/{i}", out)
    elif isinstance(spec, dict):
        if not (isinstance(value, dict) and set(value) == set(spec)):
            raise ValueError(f"{name}: expected a dict with keys {sorted(spec)}")
        for k, s in spec.items():
            _encode(s, value[k], f"{name}/{k}", out)
    else:
        raise TypeError(f"{name}: not a cache spec: {spec!r}")


def _decode(spec, name: str, arrays: Dict[str, np.ndarray], used: List[str]):
    """The value stored under ``name`` in ``arrays``; ValueError when it does not match ``spec``.
    The names of the arrays read are appended to ``used``."""

    def get(entry: str) -> np.ndarray:
        if entry not in arrays:
            raise ValueError(f"{entry}: missing")
        used.append(entry)
        return arrays[entry]

    if isinstance(spec, Array):
        return spec.check(get(name), name)
    if spec is STRINGS:
        strings = get(name)
        if strings.ndim != 1 or strings.dtype.kind != "U":
            raise ValueError(f"{name}: expected a 1-d text array, got {strings.dtype} "
                             f"{strings.shape}")
        return [str(s) for s in strings]
    if isinstance(spec, ArrayList):
        rows = spec.item.check(get(name + "#rows"), name)
        lengths = Array("int64", (None,)).check(get(name + "#lengths"), name + " lengths")
        if (lengths < 0).any() or lengths.sum() != len(rows):
            raise ValueError(f"{name}: lengths do not add up to the {len(rows)} rows")
        return np.split(rows, np.cumsum(lengths)[:-1]) if len(lengths) else []
    if isinstance(spec, tuple):
        return tuple(_decode(s, f"{name}/{i}", arrays, used) for i, s in enumerate(spec))
    if isinstance(spec, dict):
        return {k: _decode(s, f"{name}/{k}", arrays, used) for k, s in spec.items()}
    raise TypeError(f"{name}: not a cache spec: {spec!r}")


def _spec_of(value):
    """The spec of ``value`` (free lengths), for values cached without a spec."""
    if isinstance(value, np.ndarray):
        return Array(value.dtype.name, (None,) * value.ndim)
    if isinstance(value, tuple):
        return tuple(_spec_of(v) for v in value)
    if isinstance(value, dict):
        return {k: _spec_of(v) for k, v in value.items()}
    if isinstance(value, list) and value and all(isinstance(v, np.ndarray) for v in value):
        return ArrayList(Array(value[0].dtype.name, (None, *value[0].shape[1:])))
    if isinstance(value, list):
        return STRINGS  # checked to hold str when encoded
    raise TypeError(f"cannot cache a {type(value).__name__}")


def _spec_to_json(spec):
    if isinstance(spec, Array):
        return {"array": spec.dtype, "shape": list(spec.shape)}
    if isinstance(spec, ArrayList):
        return {"list_of": _spec_to_json(spec.item)}
    if spec is STRINGS:
        return {"strings": True}
    if isinstance(spec, tuple):
        return {"tuple": [_spec_to_json(s) for s in spec]}
    if isinstance(spec, dict):
        return {"dict": {k: _spec_to_json(s) for k, s in spec.items()}}
    raise TypeError(f"not a cache spec: {spec!r}")


def _spec_from_json(obj):
    """Inverse of :func:`_spec_to_json`; ValueError on anything else (read from a cache file)."""
    if isinstance(obj, dict) and len(obj) == 1:
        (kind, arg), = obj.items()
        if kind == "strings" and arg is True:
            return STRINGS
        if kind == "list_of":
            item = _spec_from_json(arg)
            if isinstance(item, Array) and item.shape and item.shape[0] is None:
                return ArrayList(item)
        if kind == "tuple" and isinstance(arg, list):
            return tuple(_spec_from_json(s) for s in arg)
        if kind == "dict" and isinstance(arg, dict):
            return {str(k): _spec_from_json(s) for k, s in arg.items()}
    if isinstance(obj, dict) and set(obj) == {"array", "shape"} and isinstance(obj["array"], str) \
            and isinstance(obj["shape"], list) \
            and all(n is None or (isinstance(n, int) and n >= 0) for n in obj["shape"]) \
            and np.dtype(obj["array"]).kind in "biuf":
        return Array(obj["array"], tuple(obj["shape"]))
    raise ValueError(f"not a cache layout: {str(obj)[:80]}")
