"""qeeps-view (the results viewer) and the protocol ranking it shows, on the tiny CUHK-SYSU and
PRW fixtures."""
import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from importlib import metadata

import cv2
import numpy as np
import pytest

from model_fixtures import REPO
from qeeps_d2.data.search_protocol import Gallery
from qeeps_d2.evaluation.cli import main as eval_main
from qeeps_d2.evaluation.ranking import rank_query
from qeeps_d2.evaluation.results_file import write_results
from qeeps_d2.evaluation.search_metrics import TOP_K, score_query
from qeeps_d2.viewer import QuerySelection, build_viewer, select_queries
from qeeps_d2.viewer import report as viewer_report
from qeeps_d2.viewer.cli import main

# CUHK fixture, G100: query 0 (s5.jpg) has targets in s6, s7; query 1 (s6.jpg) in s8, and s7 is
# listed twice as a negative (as in test_eval_cli).
CUHK_QUERIES = [
    {"index": 0, "image": "s5.jpg", "gallery": {
        "s6.jpg": [[5, 5, 30, 65, 0.9, 0.8]], "s7.jpg": [[20, 20, 40, 60, 0.9, 0.3]],
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.5]]}},
    {"index": 1, "image": "s6.jpg", "gallery": {
        "s8.jpg": [[10, 10, 30, 60, 0.9, 0.4], [40, 10, 60, 60, 0.3, 0.99]],
        "s7.jpg": [[20, 20, 40, 60, 0.95, 0.6]]}},
]
# G100: q0 ranks 0.8 (TP) 0.5 0.3 (TP): AP 5/6, first right at 1; q1 ranks s7 0.6 twice (listed
# twice), s8 0.4 (TP): AP 1/3, first right at rank 3 of the scored ranking; s8's row of
# det_score 0.3 is below the threshold (were it ranked, AP 1/4).


@pytest.fixture(autouse=True)
def datasets_env(cuhk_prw_env):
    """Every test here reads the CUHK-SYSU / PRW fixtures (tests/conftest.py)."""
    return cuhk_prw_env


def _write(tmp_path, queries, dataset="cuhk_sysu_test", name="results.json.gz", **extra):
    path = str(tmp_path / name)
    write_results(path, dataset, queries, **extra)
    return path


def _eval_json(capsys, *args):
    assert eval_main(["--json", *args]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _prw_queries():
    """PRW fixture results with three different APs: per query and gallery frame a distractor
    and, where the person is, the person's box, at similarities that put the person first in
    query 0, behind some distractors in query 1, nowhere in query 2 (too low a det_score)."""
    from qeeps_d2.data.datasets.catalog import load_protocol

    protocol = load_protocol("prw_test")
    queries = []
    for q in range(len(protocol)):
        gallery = protocol.gallery(q)
        rows = {}
        for k, (name, box) in enumerate(zip(gallery.images, gallery.gt_boxes)):
            rows[name] = [[0, 0, 8, 8, 0.9, 0.5 + 0.01 * k]]
            if not np.isnan(box[0]):
                sim, det = [(0.9, 0.9), (0.52, 0.9), (0.99, 0.3)][q]
                rows[name].append([*box.tolist(), det, sim - 0.001 * k])
        queries.append({"index": q, "image": protocol.queries[q].image, "gallery": rows})
    return queries


# ---------------------------------------------------------------------------------------------
# the ranking
# ---------------------------------------------------------------------------------------------

def _random_query(rng):
    """A gallery of 6 entries over 4 images (some listed twice, with the same or another
    target box) and random detections, some near the targets."""
    names = [f"g{i}.jpg" for i in range(4)]
    images = list(rng.choice(names, size=6))
    boxes = {n: np.array([10.0, 10.0, 40.0, 90.0]) + rng.integers(0, 20, 4) for n in names}
    gt = np.array([boxes[n] if rng.random() < 0.5 else [np.nan] * 4 for n in images])
    dets = {}
    for n in names:
        m = int(rng.integers(0, 5))
        rows = np.zeros((m, 6))
        rows[:, :4] = boxes[n] + rng.normal(0, 6, (m, 4))
        rows[:, 2:4] = np.maximum(rows[:, 2:4], rows[:, :2] + 1)
        rows[:, 4] = rng.choice([0.3, 0.6, 0.9], m)
        rows[:, 5] = rng.choice([0.1, 0.2, 0.5, 0.7, 0.8], m)  # ties on purpose
        dets[n] = rows
    return Gallery(images, gt), dets


def test_ranking_agrees_with_the_protocol_scoring():
    """best_rank <= k is score_query's hit@k; each kept detection is listed once, by descending
    similarity; the right ones are protocol true positives (one per image and target box)."""
    rng = np.random.default_rng(0)
    found = 0
    for _ in range(400):
        gallery, dets = _random_query(rng)
        ranked = rank_query(gallery, dets, 0.5)
        score = score_query(gallery, dets, 0.5)
        assert (ranked.best_rank is None) == (score.count_tp == 0)
        for k, hit in zip(TOP_K, score.hits):
            assert (ranked.best_rank is not None and ranked.best_rank <= k) == hit
        kept = sorted((n, tuple(r)) for n, rows in dets.items() for r in rows.tolist()
                      if r[4] >= 0.5 and n in gallery.images)
        assert sorted(zip(ranked.images, map(tuple, ranked.rows.tolist()))) == kept
        assert (np.diff(ranked.rows[:, 5]) <= 0).all()
        distinct_targets = len({(n, tuple(b)) for n, b in zip(gallery.images, gallery.gt_boxes)
                                if not np.isnan(b[0])})
        assert ranked.correct.sum() <= min(score.count_tp, distinct_targets)
        if len(set(gallery.images)) == len(gallery.images):
            assert ranked.correct.sum() == score.count_tp
        found += score.count_tp > 0
    assert found > 100  # the random queries do find their targets


def test_ranking_keeps_one_right_match_per_image_and_stable_ties():
    gallery = Gallery(["a.jpg", "b.jpg"], np.array([[0, 0, 10, 20], [np.nan] * 4], float))
    dets = {"b.jpg": np.array([[0, 0, 10, 20, 0.9, 0.7]]),
            "a.jpg": np.array([[0, 0, 10, 20, 0.9, 0.7],   # tied with b: a's entry comes first
                               [1, 0, 10, 20, 0.9, 0.6],   # a second box on the person: wrong
                               [0, 0, 10, 20, 0.5, 0.9]])}  # det_score 0.5 is kept (>=)
    ranked = rank_query(gallery, dets, 0.5)
    assert ranked.images == ["a.jpg", "a.jpg", "b.jpg", "a.jpg"]
    assert ranked.rows[:, 5].tolist() == [0.9, 0.7, 0.7, 0.6]
    assert ranked.correct.tolist() == [True, False, False, False]
    assert ranked.best_rank == 1 and ranked.count_gt == 1
    assert len(ranked.top(2)) == 2 and ranked.top(2).best_rank == 1


def test_ranking_of_an_image_listed_twice_with_two_targets():
    """CUHK-SYSU lists an image twice when it holds the person twice (two boxes): each box is
    right, though each is the true positive of one entry only; the protocol ranks both copies."""
    gallery = Gallery(["a.jpg", "a.jpg"], np.array([[0, 0, 10, 20], [30, 0, 40, 20]], float))
    dets = {"a.jpg": np.array([[0, 0, 10, 20, 0.9, 0.9], [30, 0, 40, 20, 0.9, 0.8]])}
    ranked = rank_query(gallery, dets, 0.5)
    assert ranked.rows[:, 5].tolist() == [0.9, 0.8]
    assert ranked.correct.tolist() == [True, True]
    assert ranked.best_rank == 1 and ranked.count_gt == 2
    assert score_query(gallery, dets, 0.5).count_tp == 2


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", ["100", "50"])
def test_page_metrics_are_what_qeeps_eval_prints(tmp_path, capsys, size):
    path = _write(tmp_path, CUHK_QUERIES)
    expected = _eval_json(capsys, "--dataset", "cuhk_sysu_test", "--gallery-size", size, path)
    out = tmp_path / "view"
    assert main(["--results", path, "--dataset", "cuhk_sysu_test", "--gallery-size", size,
                 "--all", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "queries.json").read_text())
    model = table["models"][0]
    for key in ("mAP", "top1", "top5", "top10", "num_queries"):
        assert model[key] == expected[key], key
    assert np.mean([q["ap"][0] for q in table["queries"]]) == pytest.approx(expected["mAP"])
    page = (out / "index.html").read_text()
    shown = f"mAP {100 * expected['mAP']:.2f}%, top-1 {100 * expected['top1']:.2f}%"
    assert shown in page and shown in printed
    assert table["protocol"] == f"cuhk_sysu_test/G{size}"


def test_table_rows_and_rendered_matches(tmp_path, monkeypatch):
    """Per query: AP, top-1, #gt and the first right rank; the strips get the ranked matches
    with their right / wrong flags, similarities and detection scores."""
    path = _write(tmp_path, CUHK_QUERIES)
    strips = []
    real_strip = viewer_report.match_strip

    def spy(query_image, query_box, matches, correct=None, title=None, **kw):
        strips.append(([(m.frame, m.similarity, m.det_score) for m in matches], correct, title,
                       list(query_box)))
        return real_strip(query_image, query_box, matches, correct=correct, title=title, **kw)

    monkeypatch.setattr(viewer_report, "match_strip", spy)
    report = build_viewer([path], str(tmp_path / "v"), selection=QuerySelection(all=True),
                          topk=5, progress=False)
    rows = {r.index: r for r in report.table}
    assert rows[0].ap[0] == pytest.approx(5 / 6) and rows[1].ap[0] == pytest.approx(1 / 3)
    assert (rows[0].top1, rows[1].top1) == ((True,), (False,))
    assert (rows[0].count_gt, rows[1].count_gt) == (2, 1)
    assert (rows[0].best_rank, rows[1].best_rank) == ((1,), (3,))
    assert (rows[0].image, rows[1].image) == ("s5.jpg", "s6.jpg")
    assert strips[0][0] == [("s6.jpg", 0.8, 0.9), ("s8.jpg", 0.5, 0.9), ("s7.jpg", 0.3, 0.9)]
    assert strips[0][1] == [True, False, True]
    assert strips[1][0] == [("s7.jpg", 0.6, 0.95), ("s8.jpg", 0.4, 0.9)]  # s7 once
    assert strips[1][1] == [False, True]
    assert strips[0][3] == [10.0, 10.0, 30.0, 60.0]  # the query box
    assert "AP 0.833, first right at rank 1, 2 of top-3 right (2 gallery" in strips[0][2]
    assert "first right at rank 3" in strips[1][2]
    # --topk cuts the strips, not the table
    strips.clear()
    build_viewer([path], str(tmp_path / "v"), selection=QuerySelection(queries=[0]), topk=1,
                 progress=False)
    assert [s[0] for s in strips] == [[("s6.jpg", 0.8, 0.9)]]


def test_page_is_self_contained_with_relative_jpeg_links(tmp_path):
    path = _write(tmp_path, CUHK_QUERIES)
    out = tmp_path / "view"
    assert main(["--results", path, "--all", "--output", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    links = re.findall(r'src="([^"]+)"', page)
    assert links == ["images/query_00000.jpg", "images/query_00001.jpg"]
    for link in links:
        assert cv2.imread(str(out / link)) is not None
        assert (out / link).read_bytes()[:2] == b"\xff\xd8"  # JPEG
    assert "http" not in page and "<link" not in page and "<script src" not in page
    assert page.count('href="#q0"') == 1 and 'id="q1"' in page
    # moved folder: the page still finds its images
    moved = tmp_path / "moved"
    shutil.move(str(out), str(moved))
    assert all((moved / link).is_file() for link in links)


def test_selection_worst_sample_queries(tmp_path):
    path = _write(tmp_path, _prw_queries(), dataset="prw_test")
    aps = {}

    def rendered(selection):
        report = build_viewer([path], str(tmp_path / "v"), selection=selection, progress=False)
        aps.update({r.index: r.ap[0] for r in report.table})
        page = (tmp_path / "v" / "index.html").read_text()
        assert re.findall(r'<section id="q(\d+)"', page) == [str(q) for q in report.rendered]
        assert sorted(os.listdir(tmp_path / "v" / "images")) == [
            f"query_{q:05d}.jpg" for q in sorted(report.rendered)]  # older images removed
        return report.rendered

    assert rendered(QuerySelection(all=True)) == [0, 1, 2]
    assert aps[0] > aps[1] > aps[2] == 0.0
    assert rendered(QuerySelection(worst=2)) == [2, 1]  # lowest AP first
    assert rendered(QuerySelection(queries=[1, 0])) == [1, 0]
    expected = sorted(np.random.RandomState(5).choice([0, 1, 2], size=2, replace=False))
    assert rendered(QuerySelection(sample=2, seed=5)) == expected
    assert rendered(QuerySelection()) == [0, 1, 2]  # default: 20 sampled, all of 3


def test_select_queries_orders_and_ties():
    ap = {3: 0.5, 1: 0.2, 7: 0.2, 9: 0.9}
    assert select_queries(ap, ap, QuerySelection(worst=3)) == [1, 7, 3]
    assert select_queries(ap, ap, QuerySelection(all=True)) == [1, 3, 7, 9]
    a = select_queries(range(100), {}, QuerySelection(sample=5, seed=1))
    assert a == sorted(a) and len(set(a)) == 5
    assert a == select_queries(range(100), {}, QuerySelection(sample=5, seed=1))
    assert a != select_queries(range(100), {}, QuerySelection(sample=5, seed=2))
    with pytest.raises(ValueError, match="query 4 is not in the results"):
        select_queries(ap, ap, QuerySelection(queries=[4]))
    with pytest.raises(ValueError, match="one way"):
        select_queries(ap, ap, QuerySelection(worst=1, sample=1))


def test_two_models_side_by_side(tmp_path, capsys):
    """The demo's layout: one image per query holding both models' strips, per-model columns
    and metric lines, each model's mean as qeeps-eval prints it for its file."""
    a = _write(tmp_path, CUHK_QUERIES, name="a.json")
    flipped = json.loads(json.dumps(CUHK_QUERIES))
    flipped[0]["gallery"]["s8.jpg"][0][5] = 0.95  # a distractor above q0's targets
    b = _write(tmp_path, flipped, name="b.json")
    out = tmp_path / "view"
    assert main(["--results", a, "--results", b, "--labels", "OIM,QEEPS", "--queries", "0",
                 "--output", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    for label, path in (("OIM", a), ("QEEPS", b)):
        expected = _eval_json(capsys, "--dataset", "cuhk_sysu_test", path)
        assert f"{label}: mAP {100 * expected['mAP']:.2f}%" in page
        assert f"AP {label}</th>" in page and f"best rank {label}</th>" in page
    table = json.loads((out / "queries.json").read_text())
    assert table["queries"][0]["best_rank"] == [1, 2]
    image = cv2.imread(str(out / "images" / "query_00000.jpg"))
    single = tmp_path / "single"
    assert main(["--results", a, "--queries", "0", "--output", str(single), "--no-progress"]) == 0
    one = cv2.imread(str(single / "images" / "query_00000.jpg"))
    assert image.shape[0] > 1.8 * one.shape[0]  # two strips stacked


_NODE_DOM = r"""
// a minimal DOM: one table, enough for the page's sorting script
const spec = JSON.parse(require("fs").readFileSync(0, "utf8"));
function el(tag) {
  return {tag, attrs: {}, dataset: {}, children: [], parentNode: null, listeners: {},
    getAttribute(k) { return k in this.attrs ? this.attrs[k] : null; },
    setAttribute(k, v) { this.attrs[k] = String(v); },
    removeAttribute(k) { delete this.attrs[k]; },
    addEventListener(e, f) { this.listeners[e] = f; },
    appendChild(c) { if (c.parentNode) { const s = c.parentNode.children;
      s.splice(s.indexOf(c), 1); } c.parentNode = this; this.children.push(c); },
    closest(t) { let n = this; while (n && n.tag !== t) n = n.parentNode; return n; },
    querySelectorAll() { return this.children; }};
}
const table = el("table"), head = el("tr"), body = el("tbody");
table.appendChild(head); table.tBodies = [body];
spec.headers.forEach(h => { const th = el("th"); th.dataset.num = h; head.appendChild(th); });
spec.rows.forEach((values, i) => { const tr = el("tr"); tr.id = i;
  tr.cells = values.map(v => ({dataset: {v}})); body.appendChild(tr); });
Object.defineProperty(body, "rows", {get() { return this.children; }});
global.document = {querySelectorAll() { return head.children; }};
eval(spec.script);
const out = [];
spec.clicks.forEach(c => { head.children[c].listeners.click();
  out.push(body.children.map(r => r.id)); });
console.log(JSON.stringify(out));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_clicking_a_header_sorts_the_table(tmp_path):
    """The page's own script, run by node on its own table: AP ascending (worst first), then
    descending; best rank with "-" (not found) last; the image column as text."""
    path = _write(tmp_path, _prw_queries(), dataset="prw_test")
    out = tmp_path / "view"
    assert main(["--results", path, "--all", "--output", str(out), "--no-progress"]) == 0
    page = (out / "index.html").read_text()
    script = re.search(r"<script>(.*)</script>", page, re.S).group(1)
    headers = re.findall(r'<th[^>]*data-num="(\d)"[^>]*>([^<]*)</th>', page)
    rows = [re.findall(r'data-v="([^"]*)"', tr) for tr in re.findall(r"<tr[^>]*>(<td.*?)</tr>",
                                                                      page)]
    column = {label: k for k, (_, label) in enumerate(headers)}
    clicks = [column["AP"], column["AP"], column["best rank"], column["image"]]
    spec = {"script": script, "headers": [n for n, _ in headers], "rows": rows, "clicks": clicks}
    result = subprocess.run(["node", "-e", _NODE_DOM], input=json.dumps(spec),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    orders = json.loads(result.stdout)
    ap = [float(r[column["AP"]]) for r in rows]
    assert [ap[i] for i in orders[0]] == sorted(ap) and ap[orders[0][0]] == 0.0
    assert [ap[i] for i in orders[1]] == sorted(ap, reverse=True)
    assert orders[2][-1] == 2  # query 2 has no right match: last when ascending
    images = [r[column["image"]] for r in rows]
    assert [images[i] for i in orders[3]] == sorted(images)


# ---------------------------------------------------------------------------------------------
# errors, the console script and the tools wrapper
# ---------------------------------------------------------------------------------------------

def _error(capsys, argv):
    assert main([*argv, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("qeeps-view: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_one_line_errors(tmp_path, capsys, cuhk_prw_root):
    path = _write(tmp_path, CUHK_QUERIES)
    out = ["--output", str(tmp_path / "v")]
    err = _error(capsys, ["--results", path, "--queries", "0,7", *out])
    assert "--queries: query 7 is not in the results (they hold 2 queries, 0-1)" in err
    assert "'x' is not a query index" in _error(capsys, ["--results", path, "--queries", "0,x",
                                                         *out])
    err = _error(capsys, ["--results", path, "--dataset", "prw_test", *out])
    assert "results are for data set 'cuhk_sysu_test', not 'prw_test'" in err and path in err
    missing = str(tmp_path / "no.json")
    assert "no.json: results file not found" in _error(capsys, ["--results", missing, *out])
    assert "not allowed with" in _error(capsys, ["--results", path, "--worst", "1", "--sample",
                                                 "1", *out])
    assert "--labels names 1 models for 2" in _error(
        capsys, ["--results", path, "--results", path, "--labels", "A", *out])
    assert "--topk must be at least 1" in _error(capsys, ["--results", path, "--topk", "0", *out])
    # results of another gallery size (an image outside the G100 galleries)
    stray = json.loads(json.dumps(CUHK_QUERIES))
    stray[0]["gallery"]["s5.jpg"] = [[10, 10, 30, 60, 0.9, 0.1]]
    other = _write(tmp_path, stray, name="g50.json")
    assert "not in its gallery" in _error(capsys, ["--results", other, *out])
    # the images folder missing
    images = cuhk_prw_root / "CUHK-SYSU" / "Image"
    images.rename(cuhk_prw_root / "CUHK-SYSU" / "Image.away")
    try:
        err = _error(capsys, ["--results", path, *out])
    finally:
        (cuhk_prw_root / "CUHK-SYSU" / "Image.away").rename(images)
    assert f"images folder {images / 'SSM'} of cuhk_sysu_test not found" in err


@pytest.fixture
def forget_custom_sets():
    """The custom names a test registers go with it (as tests/test_custom_dataset.py does)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from qeeps_d2.data.datasets import catalog

    before, custom = set(DatasetCatalog.list()), set(catalog.registered_names())
    yield
    for name in set(DatasetCatalog.list()) - before:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    for name in set(catalog.registered_names()) - custom:
        catalog._CUSTOM.pop(name, None)


def write_custom_set(folder, name):
    """A custom data set file (qeeps_d2.data.datasets.custom) of 4 images and 2 queries."""
    os.makedirs(folder, exist_ok=True)
    people = {"a.jpg": [([10, 10, 30, 60], 1), ([50, 10, 70, 60], 2)],
              "b.jpg": [([5, 5, 25, 55], 2)], "c.jpg": [([40, 20, 60, 70], 1)],
              "d.jpg": [([60, 10, 80, 60], -1), ([10, 10, 30, 60], 2)]}
    for seed, image in enumerate(people):
        pixels = np.random.default_rng(seed).integers(0, 256, (80, 100, 3), dtype=np.uint8)
        cv2.imwrite(os.path.join(folder, image), pixels)
    doc = {"format": "qeeps-person-search", "version": 1, "name": name,
           "images": [{"file_name": n, "width": 100, "height": 80,
                       "boxes": [{"box": b, "person_id": p} for b, p in boxes]}
                      for n, boxes in people.items()],
           "protocol": {"gallery": "all_other_images", "queries": [
               {"image": "a.jpg", "box": [10, 10, 30, 60], "person_id": 1},
               {"image": "b.jpg", "box": [5, 5, 25, 55], "person_id": 2}]}}
    path = os.path.join(folder, f"{name}.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    # query 0 (person 1) is in c.jpg: found at rank 2 (AP 1/2); query 1 (person 2) in a.jpg and
    # d.jpg: ranks 1 and 3 (AP 5/6)
    queries = [{"index": 0, "image": "a.jpg", "gallery": {
                   "c.jpg": [[40, 20, 60, 70, 0.9, 0.7]], "d.jpg": [[60, 10, 80, 60, 0.9, 0.8]]}},
               {"index": 1, "image": "b.jpg", "gallery": {
                   "a.jpg": [[50, 10, 70, 60, 0.9, 0.9]], "d.jpg": [[10, 10, 30, 60, 0.8, 0.6]],
                   "c.jpg": [[40, 20, 60, 70, 0.9, 0.7]]}}]
    return path, queries


def test_custom_data_set_file(tmp_path, capsys, forget_custom_sets):
    """--dataset FILE.json, as qeeps-eval takes it: the file's set is registered and viewed."""
    data, queries = write_custom_set(str(tmp_path / "custom"), "viewer_custom_test")
    path = _write(tmp_path, queries, dataset="viewer_custom_test")
    expected = _eval_json(capsys, "--dataset", data, path)
    out = tmp_path / "view"
    assert main(["--results", path, "--dataset", data, "--all", "--output", str(out),
                 "--no-progress"]) == 0
    table = json.loads((out / "queries.json").read_text())
    assert table["models"][0]["mAP"] == expected["mAP"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert [q["best_rank"] for q in table["queries"]] == [[2], [1]]
    assert len(os.listdir(out / "images")) == 2


def test_console_script_and_tools_wrapper(tmp_path, monkeypatch):
    scripts = {e.name: e.value for e in metadata.entry_points(group="console_scripts")}
    assert scripts["qeeps-view"] == "qeeps_d2.viewer.cli:main"
    path = _write(tmp_path, CUHK_QUERIES)
    out = tmp_path / "tool"
    monkeypatch.setattr(sys, "argv", ["visualize_results.py", "--results", path, "--worst", "1",
                                      "--output", str(out), "--no-progress"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(os.path.join(REPO, "tools", "visualize_results.py"), run_name="__main__")
    assert exit_info.value.code == 0
    assert os.listdir(out / "images") == ["query_00001.jpg"]  # the worst query
