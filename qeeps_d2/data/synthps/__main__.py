"""``python -m qeeps_d2.data.synthps``: the ``qeeps-synthps`` command."""
from .cli import main

raise SystemExit(main())
