"""On-disk cache of parsed data set files (numpy only).

Parsing the large CUHK-SYSU .mat files or reading 18k image headers takes seconds to minutes;
their parsed form is pickled once and reused while the source files are unchanged. A cache entry is
keyed by a *fingerprint* of its sources (path, size and modification time of every file), so any
change to a source invalidates it.

Entries live in ``<data set root>/.cache/qeeps_d2/`` or, when that is not writable, in
``$XDG_CACHE_HOME/qeeps_d2`` (default ``~/.cache/qeeps_d2``); when neither is writable the value is
computed every time. Setting ``QEEPS_D2_NO_CACHE=1`` disables the cache.
"""
from __future__ import annotations

import hashlib
import logging
import os
import pickle
import tempfile
from typing import Callable, Iterable, List, TypeVar

__all__ = ["cached", "file_fingerprint"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when the layout of any cached value changes.
_CACHE_FORMAT = 1


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


def cached(root: str, tag: str, fingerprint: str, compute: Callable[[], T]) -> T:
    """Return the cached value of ``compute()`` for ``(root, tag, fingerprint)``, computing it once.

    Args:
        root: the data set root, where the preferred cache folder lives.
        tag: names the kind of value, e.g. ``"cuhk_images"``; part of the file name.
        fingerprint: identifies the sources (see :func:`file_fingerprint`).
        compute: produces the value (picklable) when no valid cache entry exists.
    """
    if os.environ.get("QEEPS_D2_NO_CACHE"):
        return compute()
    key = hashlib.sha1(f"{_CACHE_FORMAT}\0{os.path.abspath(root)}\0{tag}\0{fingerprint}".encode())
    file_name = f"{tag}-{key.hexdigest()}.pkl"
    dirs = _cache_dirs(root)
    for folder in dirs:
        path = os.path.join(folder, file_name)
        try:
            with open(path, "rb") as f:
                return pickle.load(f)
        except OSError:  # absent, or the folder is unusable
            continue
        except Exception as e:  # a corrupt or foreign entry: recompute and overwrite it
            logger.warning("Ignoring unreadable cache entry %s: %s", path, e)
    value = compute()
    for i, folder in enumerate(dirs):
        # Stale entries are pruned only in the data set's own folder: the per-user folder is
        # shared by several roots.
        if _store(folder, file_name, tag, value, prune=(i == 0)):
            break
    return value


def _store(folder: str, file_name: str, tag: str, value, prune: bool) -> bool:
    """Atomically write ``value`` to ``folder/file_name``; ``prune`` drops other ``tag`` entries."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pkl")
    except OSError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(value, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, os.path.join(folder, file_name))
    except OSError:
        if os.path.exists(tmp):
            os.remove(tmp)
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
