"""QEEPS-D2: Query-guided End-to-End Person Search as a Detectron2 extension.

Importing this package registers every component with Detectron2: the data sets
(``cuhk_sysu_*``, ``prw_*``, ``synthps_*``), the ``QEEPS`` meta-architecture, its backbone,
proposal generator and ROI heads.
"""
from .config import add_qeeps_config
from .data import builtin as _builtin_datasets  # noqa: F401  (registers the data sets)
from . import modeling  # noqa: F401  (registers the model components)

__all__ = ["add_qeeps_config"]
__version__ = "0.1.0"
