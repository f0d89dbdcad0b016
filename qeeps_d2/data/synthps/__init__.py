"""SynthPS, the embedded procedural person-search benchmark: the generator (:mod:`.generator`,
written in the CUHK-SYSU layout), the person renderer (:mod:`.render`) and the
``qeeps-synthps`` command (:mod:`.cli`)."""
from .cli import main
from .generator import (
    DEFAULT_KNOBS,
    ensure_synthps,
    format_synthps_stats,
    generate_synthps,
    knob_differences,
    synthps_stats,
)

__all__ = ["DEFAULT_KNOBS", "ensure_synthps", "format_synthps_stats", "generate_synthps",
           "knob_differences", "synthps_stats", "main"]
