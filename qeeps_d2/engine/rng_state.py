"""The process's random-number generator states (torch CPU / CUDA, numpy, ``random``) as a
checkpoint entry that ``torch.load(..., weights_only=True)`` reads (tensors and plain numbers).

Saved by the :class:`~qeeps_d2.engine.Trainer` with every checkpoint and restored on
``--resume``, so that what draws random numbers during a step (RPN / ROI-head sampling with
torch, anything using numpy or ``random``) draws the same numbers as the uninterrupted run.
"""
from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state"]


def get_rng_state() -> Dict[str, Any]:
    """The current RNG states as ``{name: tensor or number}``."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached_gaussian),
        "python_version": int(version),
        "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": None if py_gauss is None else float(py_gauss),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore states saved by :func:`get_rng_state` (CUDA only if saved and available)."""
    torch.set_rng_state(state["torch"])
    np.random.set_state((
        "MT19937", state["numpy_keys"].numpy().astype(np.uint32), int(state["numpy_pos"]),
        int(state["numpy_has_gauss"]), float(state["numpy_cached_gaussian"]),
    ))
    random.setstate((
        int(state["python_version"]), tuple(int(v) for v in state["python_state"].tolist()),
        state["python_gauss"],
    ))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
