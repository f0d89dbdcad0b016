"""QEEPS model components; importing this module registers them with Detectron2."""
from .meta_arch import QEEPS
from .qrpn import QueryGuidedRPN
from .qsse import build_qsse_resnet_backbone
from .roi_heads import QEEPSROIHeads

__all__ = ["QEEPS", "QueryGuidedRPN", "QEEPSROIHeads", "build_qsse_resnet_backbone"]
