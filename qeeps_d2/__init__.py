"""QEEPS-D2: Query-guided End-to-End Person Search as a Detectron2 extension.

Importing this package registers every component with Detectron2: the data sets
(``cuhk_sysu_*``, ``prw_*``, ``synthps_*``), the ``QEEPS`` meta-architecture, its backbone,
proposal generator and ROI heads. ``register_person_search(name, json_file)`` adds a custom data
set (one JSON file, format in ``qeeps_d2.data.datasets.custom``).
"""
import warnings

# Detectron2 (2024 source) calls torch.jit.script at import time, which torch 2.14 deprecates
# with a FutureWarning on every start of every command; it says nothing about QEEPS-D2 itself.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from .config import add_qeeps_config  # noqa: E402
# registers the data sets
from .data.datasets import builtin as _builtin_datasets  # noqa: F401,E402
from .data.datasets.builtin import register_person_search  # noqa: E402
from . import modeling  # noqa: F401,E402  (registers the model components)

__all__ = ["add_qeeps_config", "register_person_search"]
__version__ = "0.1.0"
