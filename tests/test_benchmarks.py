"""The benchmark scripts' arithmetic (never timings): derived ratios, table, protocol costs."""
import argparse
import importlib.util
import json
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ROW = {"size": "r50_600", "input_hw": [600, 1000], "oim_train_step_s": 10.0,
       "qeeps_train_step_s": 17.0, "oim_gallery_image_s": 8.0, "oim_query_box_s": 1.0,
       "qeeps_pair_s_b1": 9.0, "qeeps_pair_s_b2": 12.0, "oim_gallery_image_gflop": 560.0,
       "qeeps_pair_gflop": 684.0, "oim_proposals": 300.0, "qeeps_proposals": 300.0,
       "peak_rss_mib": 5000.0}
INFO = {"device": "cpu", "precision": "fp32", "threads": 2, "cpu": "x86_64",
        "matmul_fp32_gflops": 120.0}


def test_derive_uses_the_faster_batch_size_and_table_shows_it():
    run = _load("run")
    row = run.derive(dict(ROW), batch=2)
    assert row["best_b"] == 1
    assert row["train_ratio"] == pytest.approx(1.7)
    assert row["pair_vs_gallery_image"] == pytest.approx(9.0 / 8.0)
    assert row["qeeps_pair_gflops"] == pytest.approx(684.0 / 9.0)
    args = argparse.Namespace(batch=2, runs=3, warmup=1, device="cpu", precision="fp32")
    table = run.format_table(INFO, [row], args)
    line = [l for l in table.splitlines() if l.startswith("| r50_600")][0]
    assert "| 1.70 |" in line and "1.12 (B=1)" in line and "76 (63%)" in line
    assert "300 / 300" in line and "5000 MiB" in line
    assert "| - | 8.000 s |" in line and "| - | - | 1.12 (B=1) |" in line  # no stock row


def test_ratios_against_stock_detectron2():
    run = _load("run")
    row = run.derive(dict(ROW, stock_image_s=7.5), batch=2)
    assert row["oim_vs_stock"] == pytest.approx(8.0 / 7.5)
    assert row["pair_vs_stock"] == pytest.approx(9.0 / 7.5)  # the faster pair batch size
    args = argparse.Namespace(batch=2, runs=3, warmup=1, device="cpu", precision="fp32")
    line = [l for l in run.format_table(INFO, [row], args).splitlines()
            if l.startswith("| r50_600")][0]
    assert "| 7.500 s | 8.000 s |" in line and "| 1.07 | 1.20 | 1.12 (B=1) |" in line


def test_protocol_cost_counts_and_durations(tmp_path, capsys):
    cost = _load("protocol_cost")
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"info": INFO, "args": {"batch": 2}, "rows": [ROW]}))
    assert cost.main([str(path), "--size", "r50_600", "--k", "10"]) == 0
    out = capsys.readouterr().out
    cuhk = [l for l in out.splitlines() if l.startswith("| CUHK-SYSU G100")][0]
    # 290,000 pairs x 9 s = 30.2 days; cascade: 29,000 x 9 + 6,978 x 8 + 2,900 x 1 s = 3.7 days
    assert cuhk == "| CUHK-SYSU G100 | 290,000 | 30.2 days | 3.7 days (29,000 pairs) |"
    mini = [l for l in out.splitlines() if l.startswith("| PRW-mini")][0]
    # 300 x 9 + 6,112 x 8 + 30 x 1 s = 51,626 s = 14.3 h
    assert mini.endswith("| 14.3 h (300 pairs) |")
    with pytest.raises(SystemExit):
        cost.main([str(path), "--size", "r50_900"])
