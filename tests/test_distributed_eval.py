"""Distributed evaluation: two CPU processes (gloo) through Detectron2's ``launch`` give the same
results files as one process, for the agnostic, pair and cascade runs of ``Trainer.test``."""
import json

import pytest
import torch
from detectron2.engine import launch

import dataset_fixtures
import dist_eval_worker


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(one-process output folder, two-process output folder) of dist_eval_worker.RUNS."""
    tmp = tmp_path_factory.mktemp("dist_eval")
    dataset_fixtures.make_cuhk_sysu_fixture(str(tmp / "CUHK-SYSU"))
    mp = pytest.MonkeyPatch()
    mp.setenv("DETECTRON2_DATASETS", str(tmp))  # inherited by the spawned workers
    weights = str(tmp / "model.pth")
    torch.save(dist_eval_worker.guided_model().state_dict(), weights)
    threads = torch.get_num_threads()
    try:
        # batches of 2 pairs: with shards cut at arbitrary records (5 pairs per query) the two
        # ranks would batch differently from the single process; the fixture's images share one
        # size (the sharding of size-grouped batches: tests/test_batch_composition.py)
        launch(dist_eval_worker.evaluate_runs, 1, args=(weights, str(tmp / "one"), 2))
        launch(dist_eval_worker.evaluate_runs, 2, dist_url="auto",
               args=(weights, str(tmp / "two"), 2))
    finally:
        torch.set_num_threads(threads)
        mp.undo()
    return tmp / "one", tmp / "two"


@pytest.mark.parametrize("name", list(dist_eval_worker.RUNS))
def test_two_processes_write_the_single_process_results(runs, name):
    one, two = (dist_eval_worker.read_results(str(folder / name)) for folder in runs)
    assert one["mode"] == ("cascade" if name == "cascade" else name)
    rows = sum(len(r) for q in one["queries"] for r in q["gallery"].values())
    assert rows > 20 and len(one["queries"]) == 2  # the tiny model detects
    assert two == one  # the same rows, bit for bit (JSON floats round-trip)
    with open(runs[0] / name / "inference" / "cuhk_sysu_test_metrics.json") as f:
        metrics_one = json.load(f)
    with open(runs[1] / name / "inference" / "cuhk_sysu_test_metrics.json") as f:
        assert json.load(f) == metrics_one
    if name == "cascade":
        assert (one["cascade_topk"], one["num_pairs"]) == (2, 4)
