"""tools/search_check.py: gallery folders built from the protocol, qeeps-search run per query,
hits counted with the IoU rule (tiny SynthPS, tiny random model: the mechanics, not accuracy)."""
import importlib.util
import json
import os

import pytest

from qeeps_d2.data.synthps import generate_synthps

import search_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location(
        "search_check", os.path.join(REPO, "tools", "search_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_search_check_builds_galleries_and_counts_hits(tmp_path, monkeypatch, capsys):
    datasets = tmp_path / "datasets"
    generate_synthps(str(datasets / "synthps"), seed=0, num_train_ids=4, num_test_ids=3,
                     train_images=8, test_images=51, image_size=(96, 72),
                     persons_per_image=(2, 3), appearances_per_id=(2, 6), gallery_sizes=(50,))
    monkeypatch.setenv("DETECTRON2_DATASETS", str(datasets))
    config, weights, _, _ = search_fixtures.save_model_files(str(tmp_path / "model"), guided=False)
    out = tmp_path / "check"
    assert _tool().main(["--config", config, "--weights", weights, "--queries", "2",
                         "--distractors", "3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [q["query"] for q in summary["queries"]] == [0, 1]
    for q in summary["queries"]:
        folder = out / f"q{q['query']:03d}"
        assert q["gallery"] == q["positives"] + 3 == len(os.listdir(folder / "gallery"))
        matches = json.loads((folder / "search" / "results.json").read_text())["matches"]
        assert len(matches) <= 5
        assert set(q["hit_ranks"]) <= {m["rank"] for m in matches}
    assert summary["hits_top5"] == sum(bool(q["hit_ranks"]) for q in summary["queries"])
    assert f"{summary['hits_top5']} of 2 queries found in the top 5" in capsys.readouterr().out
