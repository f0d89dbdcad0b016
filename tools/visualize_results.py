#!/usr/bin/env python
"""Render a results file's queries and top-k matches as an HTML page (Detectron2's
``tools/visualize_json_results.py`` habit); the same as ``qeeps-view``, which see::

    python tools/visualize_results.py --results R.json.gz --dataset synthps_test --worst 20 \
        --output output/view
"""
import sys

from qeeps_d2.viewer.cli import main

if __name__ == "__main__":
    sys.exit(main())
