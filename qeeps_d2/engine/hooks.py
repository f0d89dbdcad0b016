"""Training hooks of the QEEPS :class:`~qeeps_d2.engine.Trainer`."""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from detectron2.engine import HookBase

__all__ = ["NonFiniteLossCheck", "OIMTableInit", "labeled_box_records", "labeled_identity_means",
           "non_finite_terms"]


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


def labeled_box_records(records):
    """For each record with labeled people: (the record without its annotations and with
    ``given_boxes`` = the labeled boxes, their ``person_id`` list), in record order."""
    for r in records:
        labeled = [a for a in r.get("annotations", []) if a.get("person_id", -1) >= 0]
        if not labeled:
            continue
        record = {k: v for k, v in r.items() if k != "annotations"}
        record["given_boxes"] = [a["bbox"] for a in labeled]
        yield record, [a["person_id"] for a in labeled]


@torch.no_grad()
def labeled_identity_means(model, records, mapper, num_pids: int):
    """(num_pids, D) L2-normalised mean embedding of each labeled identity's annotated boxes,
    embedded by ``model`` in eval mode as at test time (``given_boxes``, one image per forward);
    rows of identities without a box are 0.

    Args:
        records: Detectron2 dataset dicts whose annotations carry ``person_id`` (>= 0 labeled).
        mapper: a test-time :class:`~qeeps_d2.data.mapper.PersonSearchMapper`.
    """
    was_training = model.training
    model.eval()
    sums = None
    try:
        for record, ids in labeled_box_records(records):
            out = model([mapper(record)])[0]["instances"]
            embeds = out.pred_embeds.float()
            if sums is None:
                sums = embeds.new_zeros((num_pids, embeds.shape[1]))
            pids = torch.as_tensor(ids, device=embeds.device)
            sums.index_add_(0, pids, embeds)
    finally:
        model.train(was_training)
    return torch.nn.functional.normalize(sums, dim=1) if sums is not None else None


class OIMTableInit(HookBase):
    """Fill an all-zero OIM lookup table before the first iteration with each labeled training
    identity's mean embedding under the loaded weights (``MODEL.QEEPS.OIM.LUT_INIT "weights"``).

    With an identity-pretrained trunk the embeddings already separate people, but a zero table
    gives the OIM loss no positive to pull towards for the first epoch, while the features move:
    the rows filled later are stale and the loss climbs (seen on SynthPS: OIM loss 12-15 instead
    of about log(table + queue size) = 6.4, and the detector's ClsNet stuck at its prior). A
    table that is already non-zero (a resumed run, or a checkpoint that holds one) is kept.
    """

    def __init__(self, records, mapper):
        self._records = records
        self._mapper = mapper

    def before_train(self):
        from detectron2.utils import comm

        model = self.trainer.model
        model = getattr(model, "module", model)
        oim = model.roi_heads.oim_loss
        if self.trainer.iter > 0 or bool(oim.lut.abs().sum() > 0):
            return
        means = labeled_identity_means(model, self._records, self._mapper, oim.num_pids)
        if means is not None:
            oim.lut.copy_(means.to(oim.lut))
            if comm.get_world_size() > 1:  # same table on every rank
                torch.distributed.broadcast(oim.lut, 0)

