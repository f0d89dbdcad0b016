"""QSSE-Net (paper Sec. 4.1): query-guided Siamese squeeze-and-excitation in the ResNet BaseNet.

The query and gallery branches share every weight, so both are run as ONE batch through one
ResNet: ``x = cat([gallery (B), query (B)])``, pair ``i`` being rows ``i`` and ``B + i``. In every
residual block of the chosen stages, the residual output ``U`` (before the shortcut is added) of
both branches is squeezed by global average pooling (over each image's own valid region when
the batch canvas is padded), the two descriptors are concatenated and excited into one channel
weight vector shared by both branches (Eq. 1)::

    s = sigmoid(W2 relu(W1 [z_q, z_g]))        W1: 2C -> 2C/r,  W2: 2C/r -> C

and the block output is ``relu(X + s * U)`` for both branches (Eq. 2, X = the shortcut). With
``MODEL.QEEPS.QSSE.GATE_SCALE`` k the gate is ``k * sigmoid(.)`` (k = 1: Eq. 1), so that a model
fine-tuned from an OIM checkpoint can start at s = 1 where the gate still learns.

Blocks subclass Detectron2's ``BottleneckBlock`` / ``BasicBlock`` and keep their parameter names
(``conv1/conv2/conv3/shortcut``), so model-zoo ResNet weights load unchanged; the new weights live
under ``<block>.qsse.*`` and stay trainable even where ``FREEZE_AT`` freezes the convolutions.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet

__all__ = [
    "FastPoolStem",
    "QuerySiameseExcitation",
    "QSSEBottleneckBlock",
    "QSSEBasicBlock",
    "QSSEResNet",
    "build_qsse_resnet_backbone",
]


class QuerySiameseExcitation(nn.Module):
    """The excitation of Eq. 1: two descriptors in, one channel weight vector out.

    Args:
        channels: C, channels of the residual output U.
        reduction: r; the hidden layer has ``max(2C // r, 1)`` units.
        init_gate: 0 keeps PyTorch's default initialisation (s about 0.5 * gate_scale at the
            start: with scale 1 that halves every residual of a network trained without QSSE);
            a value in (0, gate_scale) zeroes ``fc2.weight`` and sets ``fc2.bias`` to
            logit(init_gate / gate_scale), so s starts at ``init_gate`` for every input.
        gate_scale: the range of s, ``s = gate_scale * sigmoid(.)``: 1 is the paper's Eq. 1;
            2 lets a model fine-tuned from an OIM checkpoint start at s = 1 (``init_gate`` 1,
            exactly the OIM model) at the sigmoid's steepest point, where the gates can learn,
            instead of at a saturated s = 0.99 (slope 0.01) where they barely move.
    """

    def __init__(self, channels: int, reduction: int = 16, init_gate: float = 0.0,
                 gate_scale: float = 1.0):
        super().__init__()
        hidden = max(2 * channels // reduction, 1)
        self.fc1 = nn.Linear(2 * channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)
        if gate_scale <= 0:
            raise ValueError(f"QSSE gate_scale must be > 0, got {gate_scale}")
        if not 0.0 <= init_gate < gate_scale:
            raise ValueError(
                f"QSSE init_gate must be in [0, gate_scale={gate_scale}), got {init_gate}")
        self.gate_scale = float(gate_scale)
        if init_gate > 0:
            p = init_gate / gate_scale
            nn.init.zeros_(self.fc2.weight)
            nn.init.constant_(self.fc2.bias, math.log(p / (1.0 - p)))

    def forward(self, u: torch.Tensor, num_pairs: int,
                valid_sizes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            u: (2B, C, H, W) residual outputs, gallery rows first then the B query rows.
            num_pairs: B.
            valid_sizes: (2B, 2) int64, the (height, width) of each row's image at U's
                resolution; U is averaged over that top-left region only, so that the padding
                of a batch canvas does not change the squeeze. None = the whole map.
        Returns:
            (2B, C, 1, 1) channel weights s, identical for the two rows of a pair.
        """
        z = _valid_mean(u, valid_sizes)  # (2B, C)
        z_g, z_q = z[:num_pairs], z[num_pairs:]
        hidden = F.relu(self.fc1(torch.cat([z_q, z_g], dim=1)))
        s = self.gate_scale * torch.sigmoid(self.fc2(hidden))  # (B, C)
        return s.repeat(2, 1)[:, :, None, None]


def _valid_mean(u: torch.Tensor, valid_sizes: Optional[torch.Tensor]) -> torch.Tensor:
    """(N, C, H, W) -> (N, C): the mean of each row over its top-left ``valid_sizes[i]``
    (height, width) region ((N, 2) int64), or over the whole map when ``valid_sizes`` is None."""
    if valid_sizes is None:
        return u.mean(dim=(2, 3))
    h, w = valid_sizes[:, :1], valid_sizes[:, 1:]  # (N, 1) each
    rows = torch.arange(u.shape[2], device=u.device) < h  # (N, H)
    cols = torch.arange(u.shape[3], device=u.device) < w  # (N, W)
    mask = (rows[:, :, None] & cols[:, None, :]).to(u.dtype)  # (N, H, W)
    return torch.einsum("nchw,nhw->nc", u, mask) / (h * w).to(u.dtype)


class _QSSEMixin:
    """Shared logic of the QSSE blocks: ``num_pairs`` (and ``valid_sizes``, the images' extents
    at this block's output resolution) are set by :class:`QSSEResNet` per forward; 0 pairs
    means "no pairing" and the block behaves exactly like the stock one.

    A paired forward keeps its channel weights in ``gates`` (B, C, 1, 1), one row per pair, until
    the next forward; with ``row_gates`` (R, C, 1, 1) set (:meth:`QSSEResNet.forward_from`) the
    block weights the residual of each of R inputs (e.g. boxes pooled from those images) with
    its own row instead of computing an excitation."""

    num_pairs: int = 0
    valid_sizes: Optional[torch.Tensor] = None
    gates: Optional[torch.Tensor] = None
    row_gates: Optional[torch.Tensor] = None

    def _init_qsse(self, reduction: int, init_gate: float = 0.0, gate_scale: float = 1.0):
        self.qsse = QuerySiameseExcitation(self.out_channels, reduction, init_gate, gate_scale)

    def _residual(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        if self.row_gates is not None:  # replay the gates of a paired forward, row by row
            u = self._residual(x)
            shortcut = x if self.shortcut is None else self.shortcut(x)
            return F.relu_(shortcut + self.row_gates * u)
        if self.num_pairs == 0:
            return super().forward(x)
        if x.shape[0] != 2 * self.num_pairs:
            raise ValueError(
                f"QSSE block expects 2 x {self.num_pairs} images (gallery then query), "
                f"got a batch of {x.shape[0]}"
            )
        u = self._residual(x)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        s = self.qsse(u, self.num_pairs, self.valid_sizes)
        self.gates = s[: self.num_pairs]
        return F.relu_(shortcut + s * u)

    def freeze(self):
        """Freeze the convolutions like the stock block, but keep QSSE trainable."""
        super().freeze()
        for p in self.qsse.parameters():
            p.requires_grad = True
        return self


class QSSEBottleneckBlock(_QSSEMixin, BottleneckBlock):
    """``BottleneckBlock`` (1x1, 3x3, 1x1) with a QSSE excitation on its residual output."""

    def __init__(self, in_channels, out_channels, *, qsse_reduction: int = 16,
                 qsse_init_gate: float = 0.0, qsse_gate_scale: float = 1.0, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._init_qsse(qsse_reduction, qsse_init_gate, qsse_gate_scale)

    def _residual(self, x):
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        return self.conv3(out)


class QSSEBasicBlock(_QSSEMixin, BasicBlock):
    """``BasicBlock`` (3x3, 3x3; ResNet-18/34) with a QSSE excitation on its residual output."""

    def __init__(self, in_channels, out_channels, *, qsse_reduction: int = 16,
                 qsse_init_gate: float = 0.0, qsse_gate_scale: float = 1.0, **kwargs):
        super().__init__(in_channels, out_channels, **kwargs)
        self._init_qsse(qsse_reduction, qsse_init_gate, qsse_gate_scale)

    def _residual(self, x):
        return self.conv2(F.relu_(self.conv1(x)))


class QSSEResNet(ResNet):
    """A ``ResNet`` whose forward takes the number of (gallery, query) pairs in the batch.

    ``forward(x)`` is the stock single-stream forward; ``forward(x, num_pairs=B)`` runs the
    Siamese forward on ``x = cat([gallery, query])`` of 2B images, coupling the branches in the
    QSSE blocks (when there are any). With ``image_sizes`` (the ImageList's, in input pixels)
    each block squeezes every image over its own valid region only: ``ceil(h / s) x ceil(w / s)``
    at the block's cumulative stride s, the extent of the feature map of that image unpadded
    (the stem's stride-2 conv and max-pool and every stride-2 conv map n to ceil(n / 2)).
    """

    @property
    def qsse_blocks(self) -> List[_QSSEMixin]:
        return [m for m in self.modules() if isinstance(m, _QSSEMixin)]

    def _block_strides(self):
        """(block, cumulative stride of its output) for every QSSE block."""
        stride = self.stem.stride
        for stage in self.stages:
            for block in stage:
                stride *= block.stride
                if isinstance(block, _QSSEMixin):
                    yield block, stride

    @contextmanager
    def _paired(self, num_pairs: int, image_sizes: Optional[torch.Tensor] = None):
        """Set ``num_pairs`` and the per-image valid extents ((N, 2) int64 ``image_sizes`` in
        input pixels, or None) of every QSSE block for one forward."""
        blocks = list(self._block_strides())
        for b, stride in blocks:
            b.num_pairs = num_pairs
            b.gates = None  # this forward's, if paired
            b.valid_sizes = None if image_sizes is None else (image_sizes + stride - 1) // stride
        try:
            yield
        finally:
            for b, _ in blocks:
                b.num_pairs = 0
                b.valid_sizes = None

    def forward(self, x, num_pairs: int = 0,
                image_sizes: Optional[Sequence[Tuple[int, int]]] = None):
        """
        Args:
            x: (N, 3, H, W) images; with ``num_pairs`` B > 0, N = 2B, gallery rows first.
            num_pairs: B, or 0 for the stock single-stream forward.
            image_sizes: N (height, width) of the images inside the padded canvas (input
                pixels); None = every image fills the canvas.
        """
        if image_sizes is not None:
            if len(image_sizes) != x.shape[0]:
                raise ValueError(f"{len(image_sizes)} image_sizes for a batch of {x.shape[0]}")
            # (h, w) pairs of ints, or of 0-d tensors when traced (fvcore's FLOP count)
            image_sizes = torch.stack([torch.as_tensor(tuple(s), dtype=torch.int64)
                                       for s in image_sizes]).to(x.device)
        with self._paired(num_pairs, image_sizes):
            return super().forward(x)


    def forward_to(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        """(N, 3, H, W) images -> the output of ``stage`` (single stream; later stages skipped)."""
        x = self.stem(x)
        for name, st in zip(self.stage_names, self.stages):
            x = st(x)
            if name == stage:
                return x
        raise ValueError(f"the backbone has no stage {stage!r}")

    def stages_after(self, stage: str) -> Dict[str, nn.Module]:
        """The stages after ``stage``, by name, in order (ValueError for an unknown stage)."""
        if stage not in self.stage_names:
            raise ValueError(f"the backbone has no stage {stage!r}")
        start = self.stage_names.index(stage) + 1
        return dict(zip(self.stage_names[start:], self.stages[start:]))

    def forward_from(self, x: torch.Tensor, stage: str,
                     image_index: Optional[torch.Tensor] = None,
                     stages: Optional[Sequence[nn.Module]] = None) -> torch.Tensor:
        """Run the stages after ``stage`` on ``x``, e.g. boxes ROI-pooled from that stage's
        output (the identity path of MODEL.QEEPS.ID_POOLER).

        Args:
            x: (R, C, h, w) features at the resolution of ``stage``'s output.
            stage: a stage name ("res2", "res3", ...).
            image_index: (R,) int64, the image each row comes from. After a paired forward, a
                QSSE block weights row r's residual with the channel weights of pair
                ``image_index[r]`` in that forward (the same for its gallery and its query
                image); after a single-stream forward the blocks are the stock ones.
            stages: copies of those stages to run instead (same blocks, in order; their QSSE
                blocks replay the gates of this backbone's), or None for the backbone's own.
        Returns:
            (R, C_last, h', w'): the output of the last stage.
        """
        own = list(self.stages_after(stage).values())
        stages = own if stages is None else list(stages)
        sources = [b for st in own for b in st if isinstance(b, _QSSEMixin)]
        targets = [b for st in stages for b in st if isinstance(b, _QSSEMixin)]
        if len(sources) != len(targets):
            raise ValueError(f"{len(targets)} QSSE blocks in the given stages, "
                             f"{len(sources)} in the backbone's")
        paired = [(src, dst) for src, dst in zip(sources, targets) if src.gates is not None]
        if paired and image_index is None:
            raise ValueError("forward_from after a paired forward needs each row's image_index")
        for src, dst in paired:
            dst.row_gates = src.gates[image_index]
        try:
            for st in stages:
                x = st(x)
        finally:
            for _, dst in paired:
                dst.row_gates = None
        return x


class FastPoolStem(BasicStem):
    """Detectron2's ``BasicStem`` (same parameters and output) whose 3x3/2 max-pool runs on a
    channels-last view: PyTorch's CPU max-pool on NCHW tensors is unvectorised (measured here:
    78 ms vs 5.6 ms on a (8, 32, 120, 180) batch, one thread). Max is exact, so the output is
    identical; it is returned in the layout of the convolution's output (NCHW, or channels-last
    in a channels-last network, MODEL.QEEPS.CHANNELS_LAST)."""

    def forward(self, x):
        """(N, 3, H, W) -> (N, C, ceil(H/4), ceil(W/4))."""
        x = F.relu_(self.conv1(x))
        if x.device.type != "cpu":
            return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        layout = (torch.contiguous_format if x.is_contiguous() else torch.channels_last)
        x = F.max_pool2d(x.contiguous(memory_format=torch.channels_last), 3, 2, 1)
        return x.contiguous(memory_format=layout)


@BACKBONE_REGISTRY.register()
def build_qsse_resnet_backbone(cfg, input_shape: ShapeSpec):
    """Detectron2's ``build_resnet_backbone`` with QSSE blocks in ``MODEL.QEEPS.QSSE.STAGES``
    (when ``MODEL.QEEPS.QSSE.ENABLED``); otherwise the stock ResNet (as a :class:`QSSEResNet`,
    whose forward also accepts ``num_pairs``). Same parameter names as the stock builder."""
    # fmt: off
    norm                = cfg.MODEL.RESNETS.NORM
    freeze_at           = cfg.MODEL.BACKBONE.FREEZE_AT
    out_features        = cfg.MODEL.RESNETS.OUT_FEATURES
    depth               = cfg.MODEL.RESNETS.DEPTH
    num_groups          = cfg.MODEL.RESNETS.NUM_GROUPS
    width_per_group     = cfg.MODEL.RESNETS.WIDTH_PER_GROUP
    bottleneck_channels = num_groups * width_per_group
    in_channels         = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS
    out_channels        = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    stride_in_1x1       = cfg.MODEL.RESNETS.STRIDE_IN_1X1
    qsse_on             = cfg.MODEL.QEEPS.QSSE.ENABLED
    qsse_stages         = set(cfg.MODEL.QEEPS.QSSE.STAGES)
    qsse_reduction      = cfg.MODEL.QEEPS.QSSE.REDUCTION
    qsse_init_gate      = cfg.MODEL.QEEPS.QSSE.INIT_GATE
    qsse_gate_scale     = cfg.MODEL.QEEPS.QSSE.GATE_SCALE
    # fmt: on
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE) or cfg.MODEL.RESNETS.RES5_DILATION != 1:
        raise ValueError("QEEPS backbones support neither deformable convs nor a dilated res5")
    unknown = qsse_stages - {"res2", "res3", "res4"}
    if unknown:
        raise ValueError(f"MODEL.QEEPS.QSSE.STAGES has unknown stages {sorted(unknown)}")
    num_blocks_per_stage = {
        18: [2, 2, 2, 2],
        34: [3, 4, 6, 3],
        50: [3, 4, 6, 3],
        101: [3, 4, 23, 3],
        152: [3, 8, 36, 3],
    }[depth]
    basic = depth in (18, 34)  # BasicBlock stages; any RES2_OUT_CHANNELS (the SynthPS configs
    # use a half-width ResNet-18 trained from scratch)

    stem = FastPoolStem(in_channels=input_shape.channels, out_channels=in_channels, norm=norm)
    max_stage = max(int(f[-1]) for f in out_features if f.startswith("res"))
    stages = []
    for idx, stage_idx in enumerate(range(2, max_stage + 1)):
        name = f"res{stage_idx}"
        stage_kargs = {
            "num_blocks": num_blocks_per_stage[idx],
            "stride_per_block": [1 if idx == 0 else 2] + [1] * (num_blocks_per_stage[idx] - 1),
            "in_channels": in_channels,
            "out_channels": out_channels,
            "norm": norm,
        }
        with_qsse = qsse_on and name in qsse_stages
        if basic:
            stage_kargs["block_class"] = QSSEBasicBlock if with_qsse else BasicBlock
        else:
            stage_kargs["block_class"] = QSSEBottleneckBlock if with_qsse else BottleneckBlock
            stage_kargs["bottleneck_channels"] = bottleneck_channels
            stage_kargs["stride_in_1x1"] = stride_in_1x1
            stage_kargs["num_groups"] = num_groups
        if with_qsse:
            stage_kargs["qsse_reduction"] = qsse_reduction
            stage_kargs["qsse_init_gate"] = qsse_init_gate
            stage_kargs["qsse_gate_scale"] = qsse_gate_scale
        stages.append(ResNet.make_stage(**stage_kargs))
        in_channels = out_channels
        out_channels *= 2
        bottleneck_channels *= 2
    return QSSEResNet(stem, stages, out_features=out_features, freeze_at=freeze_at)
