"""Registers the built-in person-search data sets with Detectron2 (filled in by the data layer)."""
