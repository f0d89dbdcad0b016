"""``add_qeeps_config``: every configuration key QEEPS adds to Detectron2's defaults."""
from detectron2.config import CfgNode as CN


def add_qeeps_config(cfg):
    """Add the QEEPS keys (``cfg.MODEL.QEEPS`` and friends) to a Detectron2 config, in place."""
    _C = cfg
    _C.MODEL.QEEPS = CN()
