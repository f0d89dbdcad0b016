"""Writing a file so that readers see either the old content or the new one, never a part."""
from __future__ import annotations

import os
import tempfile
from typing import Any, Callable, List

__all__ = ["write_atomically", "remove_stale_temp_files"]


def write_atomically(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Call ``write(f)`` on a temporary file beside ``path``, flush it to disk, then rename it to
    ``path`` (an existing file is replaced only once the new one is complete); on any error the
    temporary file is removed and ``path`` is left as it was.

    A process killed (SIGKILL) while writing leaves at most a stray ``.<name>.*.tmp`` beside
    ``path``, never a truncated ``path``.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temp_files(folder: str) -> List[str]:
    """Delete the ``.<name>.*.tmp`` files :func:`write_atomically` leaves in ``folder`` when its
    process is killed mid-write; call only where no other process is writing there. Returns the
    removed paths."""
    if not os.path.isdir(folder):
        return []
    removed = []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed
