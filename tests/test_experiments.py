"""The Table-1 engine (qeeps_d2.engine.experiments): evaluation folders, iterations from
metrics.json and table rows."""
import json

from qeeps_d2.engine.experiments import eval_dir_name, format_table, trained_iterations


def test_each_kind_of_evaluation_has_its_own_folder():
    names = {eval_dir_name(100), eval_dir_name(100, 10), eval_dir_name(100, gt_boxes=True),
             eval_dir_name(100, 10, gt_boxes=True), eval_dir_name(50)}
    assert len(names) == 5
    assert eval_dir_name(100, 10, gt_boxes=True) == "eval_G100_cascade10_gtboxes"


def _row(config, **extra):
    row = {"config": config, "recall": 95.0, "plain_recall": None, "iters": 600,
           "mAP@50": 30.04, "top1@50": 40.0, "mAP@100": 25.06, "top1@100": 35.0, "train_s": 120}
    row.update(extra)
    return row


def test_table_labels_cascade_and_ground_truth_box_rows():
    table = format_table([_row("oim.yaml"), _row("oim.yaml", gt_boxes=True),
                          _row("qeeps.yaml", cascade_topk=10, gt_boxes=True)], [100, 50])
    lines = table.splitlines()
    assert lines[0].startswith("| config | mAP G50 | top-1 G50 | mAP G100 | top-1 G100 |")
    assert lines[2] == "| oim.yaml | 30.0 | 40.0 | 25.1 | 35.0 | 95.0 | 600 | 2.0 | - |"
    assert lines[3].startswith("| oim.yaml, GT boxes | 30.0 |")
    assert lines[4].startswith("| qeeps.yaml (cascade, K=10), GT boxes |")


def test_iterations_come_from_detectron2_metrics_json(tmp_path):
    assert trained_iterations(str(tmp_path)) is None
    lines = [{"iteration": 19, "total_loss": 3.0}, {"iteration": 39, "total_loss": 2.0},
             {"iteration": 41, "person_search/mAP": 10.0}]
    (tmp_path / "metrics.json").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert trained_iterations(str(tmp_path)) == 42
    assert "| - | 2.0 |" in format_table([_row("oim.yaml", iters=None)], [100, 50])
