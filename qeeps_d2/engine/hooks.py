"""Training hooks of the QEEPS :class:`~qeeps_d2.engine.Trainer`."""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from detectron2.engine import HookBase

__all__ = ["NonFiniteLossCheck", "non_finite_terms"]


def non_finite_terms(loss_dict: Dict[str, torch.Tensor]) -> List[str]:
    """``"name=value"`` for every loss term of ``loss_dict`` that is NaN or infinite."""
    bad = []
    for name, value in loss_dict.items():
        v = float(value.detach().float().sum()) if torch.is_tensor(value) else float(value)
        if not math.isfinite(v):
            bad.append(f"{name}={v}")
    return bad


class NonFiniteLossCheck(HookBase):
    """Stop training at the first NaN or infinite loss term, naming the iteration and the term.

    Detectron2's trainer notices a non-finite *total* loss only after the backward pass and
    prints every term. This hook looks at the model's loss dict as soon as the forward pass
    returns it (a forward hook on ``trainer.model``, active while the model is in training
    mode) and raises ``FloatingPointError`` before the backward pass and the optimizer step,
    so the weights of the last good iteration are left untouched, e.g.::

        FloatingPointError: non-finite loss at iteration 12: loss_oim=nan (finite: loss_cls=0.69,
        ...); training stopped before the backward pass; last checkpoint: output/model_0000009.pth
    """

    def before_train(self):
        self._handle = self.trainer.model.register_forward_hook(self._check)

    def after_train(self):
        self._handle.remove()

    def _check(self, module, inputs, outputs):
        if not module.training or not isinstance(outputs, dict):
            return
        bad = non_finite_terms(outputs)
        if not bad:
            return
        finite = [f"{k}={float(v.detach().float().sum()):.4g}" for k, v in outputs.items()
                  if not any(b.startswith(f"{k}=") for b in bad)]
        checkpointer = getattr(self.trainer, "checkpointer", None)
        last = checkpointer.get_checkpoint_file() if checkpointer is not None else ""
        raise FloatingPointError(
            f"non-finite loss at iteration {self.trainer.iter}: {', '.join(bad)} "
            f"(finite: {', '.join(finite) or 'none'}); training stopped before the backward "
            f"pass; last checkpoint: {last or 'none'}"
        )
