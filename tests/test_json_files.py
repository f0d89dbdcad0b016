"""utils.json_files: the reader's one-line errors are tested with the results file; here the
report writer the benchmarks use."""
import json

import pytest

from qeeps_d2.utils.json_files import load_json_file, write_json_file


def test_write_json_file_creates_its_folder_and_round_trips(tmp_path):
    path = tmp_path / "a" / "b" / "report.json"
    write_json_file(str(path), {"rows": [1, 2.5], "name": "x"})
    assert load_json_file(str(path), "report") == {"rows": [1, 2.5], "name": "x"}
    write_json_file(str(path), {"rows": []})  # replaces
    assert json.loads(path.read_text()) == {"rows": []}


def test_write_json_file_that_fails_leaves_the_previous_file(tmp_path):
    path = tmp_path / "report.json"
    write_json_file(str(path), {"ok": True})
    with pytest.raises(TypeError):
        write_json_file(str(path), {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]  # no temporary file left
