"""Tiny QEEPS configs and random inputs for CPU model tests."""
import os

import torch

from detectron2.config import get_cfg
from detectron2.structures import Boxes, Instances

from qeeps_d2 import add_qeeps_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_cfg(qsse=False, qrpn=False, qsimnet=False, config_file=None):
    """A CPU config with a narrow bottleneck ResNet (res4: 128 channels) and small sizes."""
    cfg = get_cfg()
    add_qeeps_config(cfg)
    cfg.merge_from_file(config_file or os.path.join(REPO, "configs", "Base-QEEPS-C4.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.RESNETS.NORM = "BN"
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 16
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 32
    cfg.MODEL.RESNETS.WIDTH_PER_GROUP = 8
    cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION = 6
    cfg.MODEL.RPN.POST_NMS_TOPK_TRAIN = 50
    cfg.MODEL.RPN.POST_NMS_TOPK_TEST = 20
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 16
    cfg.MODEL.QEEPS.EMBED_DIM = 16
    cfg.MODEL.QEEPS.OIM.NUM_PIDS = 5
    cfg.MODEL.QEEPS.OIM.QUEUE_SIZE = 4
    cfg.MODEL.QEEPS.QRPN.POOLER_RESOLUTION = 3
    cfg.MODEL.QEEPS.QSSE.ENABLED = qsse
    cfg.MODEL.QEEPS.QRPN.ENABLED = qrpn
    cfg.MODEL.QEEPS.QSIMNET.ENABLED = qsimnet
    cfg.INPUT.MIN_SIZE_TRAIN = (64,)
    cfg.INPUT.MAX_SIZE_TRAIN = 96
    cfg.INPUT.MIN_SIZE_TEST = 64
    cfg.INPUT.MAX_SIZE_TEST = 96
    return cfg


def random_instances(h, w, boxes, pids, query_pid=None):
    inst = Instances((h, w))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(pids), dtype=torch.int64)
    inst.gt_pids = torch.tensor(pids, dtype=torch.int64)
    if query_pid is not None:
        inst.gt_is_query = inst.gt_pids == query_pid
    return inst


def pair_inputs(seed=0, with_gt=True):
    """Two query-gallery pairs of different sizes (one gallery with no labeled person)."""
    g = torch.Generator().manual_seed(seed)
    img = lambda h, w: torch.randint(0, 255, (3, h, w), generator=g).float()  # noqa: E731
    pairs = [
        {
            "image": img(64, 96), "height": 64, "width": 96,
            "query_image": img(64, 80), "query_box": torch.tensor([10.0, 8.0, 40.0, 60.0]),
        },
        {
            "image": img(72, 88), "height": 72, "width": 88,
            "query_image": img(64, 96), "query_box": torch.tensor([50.0, 4.0, 80.0, 62.0]),
        },
    ]
    if with_gt:
        pairs[0]["instances"] = random_instances(
            64, 96, [[5, 5, 35, 60], [50, 10, 90, 62]], [2, -1], query_pid=2
        )
        pairs[1]["instances"] = random_instances(72, 88, [[20, 10, 60, 70]], [-1], query_pid=4)
    return pairs


def scene_inputs(seed=0, with_gt=True):
    """The gallery images of :func:`pair_inputs` alone (the OIM baseline's training inputs)."""
    return [
        {k: v for k, v in x.items() if not k.startswith("query_")}
        for x in pair_inputs(seed, with_gt)
    ]


def fill_oim_lut(model, seed=0):
    """Fill the OIM lookup table with random unit rows: with the all-zero initial table the OIM
    logits are constant and the re-id head would get no gradient on a first step."""
    oim = model.roi_heads.oim_loss
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        oim.lut.copy_(torch.nn.functional.normalize(torch.randn(oim.lut.shape, generator=g), dim=1))


def settle_batchnorm(model, inputs, momentum: float = 1.0):
    """Set every BatchNorm's running statistics to those of one training forward on ``inputs``
    (which need ``instances``), so that the randomly initialised model gives normalised
    activations, hence non-degenerate detections, in eval mode (``momentum`` < 1 blends them
    with the current statistics). Leaves the model in eval mode."""
    from detectron2.utils.events import EventStorage

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.momentum = momentum
    model.train()
    with torch.no_grad(), EventStorage():
        model(inputs)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()
