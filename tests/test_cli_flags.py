"""The model and output flags every tool shares (Detectron2's demo/demo.py names)."""
import pytest

from qeeps_d2.utils.cli import (ArgumentParser, UsageError, add_model_arguments,
                                add_output_argument, model_opts)


def _parser():
    return add_output_argument(add_model_arguments(ArgumentParser(prog="t")), "out/default")


def test_detectron2_names_and_the_old_aliases_fill_the_same_fields():
    new = _parser().parse_args(["--config-file", "c.yaml", "--weights", "w.pth",
                                "--output", "o", "--confidence-threshold", "0.7",
                                "--opts", "MODEL.DEVICE", "cpu"])
    old = _parser().parse_args(["--config", "c.yaml", "--weights", "w.pth", "--out", "o",
                                "--confidence-threshold", "0.7", "--opts", "MODEL.DEVICE", "cpu"])
    assert vars(new) == vars(old)
    assert (new.config_file, new.output) == ("c.yaml", "o")
    # the threshold flag comes after --opts: it wins over a DET_THRESH given there
    assert model_opts(new) == ["MODEL.DEVICE", "cpu", "TEST.PERSON_SEARCH.DET_THRESH", "0.7"]


def test_defaults_leave_the_config_alone():
    args = _parser().parse_args(["--config-file", "c.yaml", "--weights", "w.pth"])
    assert model_opts(args) == [] and args.output == "out/default" and args.device is None


@pytest.mark.parametrize("argv, message", [
    (["--opts", "MODEL.DEVICE"], "--opts takes KEY VALUE pairs"),
    (["--confidence-threshold", "1.5"], r"--confidence-threshold must be in \[0, 1\], got 1.5"),
])
def test_bad_values_are_one_line_errors(argv, message):
    args = _parser().parse_args(["--config-file", "c.yaml", "--weights", "w.pth", *argv])
    with pytest.raises(UsageError, match=message):
        model_opts(args)


def test_config_file_is_required():
    with pytest.raises(UsageError, match="--config-file"):
        _parser().parse_args(["--weights", "w.pth"])
