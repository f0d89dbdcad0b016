"""QEEPS model components; importing this module registers them with Detectron2."""
