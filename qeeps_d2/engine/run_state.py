"""What a training run keeps beside its weights so that ``--resume`` continues it exactly: the
run's seed (``SEED -1`` draws one, once per run) and the recent logged metrics.

- :func:`resolve_run_seed`: with ``SEED`` < 0 the seed is drawn when a run starts and stored in
  ``OUTPUT_DIR/seed``; ``--resume`` reads it back, so a resumed run builds the same training
  records and streams as the run it continues (a fresh draw gave different weights: 141 of 170
  tensors differed after a kill and resume).
- :func:`metric_history` / :func:`restore_metric_history`: the last values of every logged
  scalar, saved with each checkpoint and put back into the resumed run's ``EventStorage``, so the
  smoothed losses Detectron2's writers print and write to ``metrics.json`` (medians over a
  20-iteration window) match the uninterrupted run's instead of restarting their window.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Tuple

from detectron2.utils import comm
from detectron2.utils.events import EventStorage

from qeeps_d2.utils.atomic_write import write_atomically

__all__ = ["SEED_FILE", "resolve_run_seed", "metric_history", "restore_metric_history",
           "HISTORY_LENGTH"]

logger = logging.getLogger(__name__)

SEED_FILE = "seed"
# Values kept per scalar: Detectron2's writers smooth over 20 iterations; 100 leaves room for
# writers with longer windows.
HISTORY_LENGTH = 100


def resolve_run_seed(output_dir: str, resume: bool) -> int:
    """The seed of a run whose config says ``SEED -1``: the one stored in
    ``output_dir/seed`` when resuming (if there is one), otherwise a fresh draw shared by all
    processes, stored there by the main process. Call from every process (it gathers)."""
    path = os.path.join(output_dir, SEED_FILE)
    if resume and os.path.isfile(path):
        with open(path) as f:
            text = f.read().strip()
        try:
            seed = int(text)
        except ValueError:
            raise ValueError(f"{path}: expected the run's seed (an integer), found {text[:40]!r}")
        logger.info("SEED -1: resuming with the run's seed %d (from %s)", seed, path)
        return seed
    seed = int(comm.shared_random_seed())
    if comm.is_main_process():
        os.makedirs(output_dir, exist_ok=True)
        write_atomically(path, lambda f: f.write(f"{seed}\n"), mode="w")
    logger.info("SEED -1: this run's seed is %d (stored in %s; --resume reuses it)", seed, path)
    return seed


def metric_history(storage: EventStorage, length: int = HISTORY_LENGTH
                   ) -> Dict[str, Dict[str, object]]:
    """``{name: {"values": [(value, iteration), ...], "smooth": bool}}``: the last ``length``
    values of every scalar in ``storage`` (plain numbers: a ``weights_only`` checkpoint entry)."""
    hints = storage.smoothing_hints()
    return {
        name: {"values": [(float(v), int(it)) for v, it in buffer.values()[-length:]],
               "smooth": bool(hints.get(name, True))}
        for name, buffer in storage.histories().items()
    }


def restore_metric_history(storage: EventStorage, history: Dict[str, Dict[str, object]]) -> None:
    """Put values saved by :func:`metric_history` back into ``storage`` (a resumed run's, before
    its first step), at their original iterations."""
    for name, entry in history.items():
        values: List[Tuple[float, int]] = entry["values"]
        for value, iteration in values:
            storage.put_scalar(name, value, smoothing_hint=entry["smooth"], cur_iter=iteration)
