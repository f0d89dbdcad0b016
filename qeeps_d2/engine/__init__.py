"""Training and evaluation entry points built on Detectron2's engine."""
from .trainer import Trainer, setup_cfg

__all__ = ["Trainer", "setup_cfg"]
