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


def _flags(parser):
    """option string -> dest of every option of ``parser``."""
    return {s: a.dest for a in parser._actions for s in a.option_strings}


def _tool_parser(name):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(__file__), "..", "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._parser()


def test_every_tool_names_its_model_and_output_flags_alike():
    """The same flag names across qeeps-search, qeeps-index, qeeps-export-onnx, the tools and
    the other console scripts (Detectron2's demo/demo.py names; the old names as aliases)."""
    from qeeps_d2.data.datasets import convert
    from qeeps_d2.export import cli as export_cli
    from qeeps_d2.search import cli as search_cli, index_cli
    from qeeps_d2.viewer import cli as viewer_cli

    model_tools = {"qeeps-search": search_cli._parser(), "qeeps-index": index_cli._parser(),
                   "qeeps-export-onnx": export_cli._parser(),
                   "cascade_eval": _tool_parser("cascade_eval")}
    for name, parser in model_tools.items():
        flags = _flags(parser)
        assert flags["--config-file"] == flags.get("--config", flags["--config-file"]), name
        assert "--weights" in flags and "--opts" in flags, name
    for name in ("qeeps-search", "qeeps-index", "cascade_eval"):
        assert "--confidence-threshold" in _flags(model_tools[name]), name
    output_tools = dict(model_tools, **{"qeeps-view": viewer_cli._parser(),
                                        "qeeps-convert-dataset": convert._parser()})
    for name, parser in output_tools.items():
        flags = _flags(parser)
        assert "--output" in flags, name
        if "--out" in flags:
            assert flags["--out"] == flags["--output"], name
    search = _flags(model_tools["qeeps-search"])
    assert search["--input"] == search["--gallery"]  # qeeps-index's --input
