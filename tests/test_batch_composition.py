"""Results do not depend on batch composition: evaluation (test loader + evaluator, agnostic,
pairs, cascade) and ``PersonSearcher`` batch only inputs of one size after the test resize, so an
image or pair scored alone and inside a mixed-size batch gives the same outputs."""
import gzip
import json

import numpy as np
import pytest
import torch
from detectron2.evaluation import inference_on_dataset
from detectron2.modeling import build_model

import dataset_fixtures
import search_fixtures
from dist_eval_worker import eval_cfg, guided_model
from qeeps_d2.data.build import build_person_search_test_loader, load_test_protocol
from qeeps_d2.data.size_batching import (
    SizeGroupedInferenceBatchSampler,
    record_size_key,
    size_grouped_batches,
    resized_test_shape,
)
from qeeps_d2.evaluation.build import PersonSearchEvaluators
from qeeps_d2.search import GalleryFrame, PersonSearcher

# Test images of the CUHK-SYSU fixture at several sizes; after the tiny configs' test resize
# (short side 64, long side <= 96): s5, s9 -> 64x80, s10 (72x90) -> 64x80 too, s6 -> 71x64,
# s7 -> 59x96, s8 -> 64x85.
SIZES = {"s6.jpg": (100, 90), "s7.jpg": (80, 130), "s8.jpg": (90, 120), "s10.jpg": (72, 90)}


def test_resized_shape_is_detectron2s_resize():
    assert resized_test_shape(80, 100, 64, 96) == (64, 80)
    assert resized_test_shape(72, 90, 64, 96) == (64, 80)
    assert resized_test_shape(80, 130, 64, 96) == (59, 96)  # long side capped
    assert resized_test_shape(100, 90, 64, 96) == (71, 64)
    assert resized_test_shape(100, 90, 0, 96) == (100, 90)  # MIN_SIZE_TEST 0: no resize
    pair = {"height": 80, "width": 100, "query_file_name": "q", "query_box": [0, 0, 1, 1],
            "query_height": 100, "query_width": 90}
    assert record_size_key(pair, 64, 96) == ("pair", (64, 80), (71, 64))
    assert record_size_key({"height": 72, "width": 90, "query_box": [0, 0, 1, 1]}, 64, 96) == (
        "query", (64, 80))
    assert record_size_key({"height": 72, "width": 90}, 64, 96) == ("gallery", (64, 80))


def test_size_grouped_batches_keep_one_key_and_every_record():
    keys = ["a", "b", "a", "a", "c", "b", "a"]
    batches = size_grouped_batches(keys, 2)
    assert batches == [[0, 2], [1, 5], [3, 6], [4]]
    assert sorted(i for b in batches for i in b) == list(range(len(keys)))
    assert size_grouped_batches(keys, 1) == [[i] for i in range(len(keys))]
    with pytest.raises(ValueError, match="batch size"):
        size_grouped_batches(keys, 0)


@pytest.mark.parametrize("world_size,size,batch_size,shards", [
    (2, 10, 2, [range(0, 6), range(6, 10)]),   # 5 batches: 3 + 2
    (2, 9, 4, [range(0, 8), range(8, 9)]),     # the last batch is short
    (3, 7, 1, [range(0, 3), range(3, 5), range(5, 7)]),  # = InferenceSampler
    (2, 1, 4, [range(0, 1), range(1, 1)]),     # fewer batches than ranks
])
def test_sampler_shards_whole_batches(world_size, size, batch_size, shards, monkeypatch):
    """With one size, each rank gets a contiguous run of whole batches, every record once."""
    from detectron2.utils import comm

    monkeypatch.setattr(comm, "get_world_size", lambda: world_size)
    for rank, shard in enumerate(shards):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        sampler = SizeGroupedInferenceBatchSampler(["one size"] * size, batch_size)
        batches = list(sampler)
        assert [i for b in batches for i in b] == list(shard) and len(sampler) == len(batches)
        assert all(len(b) <= batch_size for b in batches)


def test_sampler_ranks_form_the_single_process_batches(monkeypatch):
    from detectron2.utils import comm

    keys = ["a", "b", "a", "a", "c", "b", "a", "a"]
    single = size_grouped_batches(keys, 3)
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    got = []
    for rank in range(2):
        monkeypatch.setattr(comm, "get_rank", lambda: rank)
        got += list(SizeGroupedInferenceBatchSampler(keys, 3))
    assert got == single


class _Recorder(torch.nn.Module):
    """Runs the model and keeps every output by record, and the shapes of each batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.outputs, self.batches = {}, []

    def forward(self, inputs):
        outputs = self.model(inputs)
        self.batches.append([(tuple(x["image"].shape), tuple(x["query_image"].shape)
                              if "query_image" in x else None) for x in inputs])
        for x, out in zip(inputs, outputs):
            kind = "pair" if "query_file_name" in x else "query" if "query_box" in x else "image"
            self.outputs[(kind, x.get("query_index"), x["image_id"])] = out
        return outputs


def _fields(out):
    if "query_embed" in out:
        return {"query_embed": out["query_embed"]}
    inst = out["instances"]
    fields = {"boxes": inst.pred_boxes.tensor, "scores": inst.scores}
    for name in ("pred_embeds", "pred_sims"):
        if inst.has(name):
            fields[name] = inst.get(name)
    return fields


@pytest.fixture(scope="module")
def mixed_sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed_sizes")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"), image_sizes=SIZES)
    return root


@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "pairs"])
def test_evaluation_outputs_do_not_depend_on_the_batch(guided, mixed_sizes, monkeypatch):
    """The real loader, model and evaluator with BATCH_SIZE 1 and 4 on images of several sizes:
    every gallery image, query box and pair gets the same boxes, scores, embeddings and
    similarities, and the results files hold the same rows (float tolerance)."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(mixed_sizes))
    model = guided_model()
    if not guided:
        plain = build_model(eval_cfg(False, 0, ""))
        plain.load_state_dict(model.state_dict(), strict=False)
        model = plain
    runs = {}
    for batch_size in (1, 4):
        cfg = eval_cfg(guided, 0, "", batch_size)
        protocol = load_test_protocol(cfg, "cuhk_sysu_test")
        out = mixed_sizes / f"{'pairs' if guided else 'agnostic'}_b{batch_size}"
        recorder = _Recorder(model)
        evaluator = PersonSearchEvaluators("cuhk_sysu_test", protocol, output_dir=str(out),
                                           det_thresh=0.0)
        metrics = inference_on_dataset(
            recorder, build_person_search_test_loader(cfg, "cuhk_sysu_test", protocol), evaluator)
        with gzip.open(out / "cuhk_sysu_test_results.json.gz", "rt") as f:
            runs[batch_size] = (recorder, metrics, json.load(f))
    (alone, m1, doc1), (batched, m4, doc4) = runs[1], runs[4]
    # the batched run did batch (several records per forward), only equal sizes together
    assert max(len(b) for b in batched.batches) >= 2
    assert all(len(set(b)) == 1 for b in batched.batches)
    assert len({s for b in batched.batches for s in b}) >= 3  # and the sizes do differ
    assert alone.outputs.keys() == batched.outputs.keys()
    assert len(alone.outputs) == (10 if guided else 8)  # 2 x 5 pairs; 6 images + 2 queries
    for key, out in alone.outputs.items():
        a, b = _fields(out), _fields(batched.outputs[key])
        assert a.keys() == b.keys(), key
        for name in a:  # boxes in pixels: 1e-3 px
            torch.testing.assert_close(a[name], b[name], rtol=1e-4,
                                       atol=1e-3 if name == "boxes" else 1e-4,
                                       msg=lambda m: f"{key} {name}: {m}")
    rows = sum(len(r) for q in doc1["queries"] for r in q["gallery"].values())
    assert rows > 20  # the tiny model detects
    for q1, q4 in zip(doc1["queries"], doc4["queries"]):
        assert q1["gallery"].keys() == q4["gallery"].keys()
        for name in q1["gallery"]:
            np.testing.assert_allclose(q1["gallery"][name], q4["gallery"][name],
                                       rtol=1e-4, atol=1e-3)
    assert m1["person_search"]["mAP"] == pytest.approx(m4["person_search"]["mAP"], abs=1e-6)


def test_cascade_outputs_do_not_depend_on_the_batch(mixed_sizes, monkeypatch, tmp_path):
    """The Trainer's cascade (both stages) with BATCH_SIZE 1 and 4 writes the same rows."""
    from dist_eval_worker import read_results

    from qeeps_d2.engine import Trainer

    monkeypatch.setenv("DETECTRON2_DATASETS", str(mixed_sizes))
    model = guided_model()
    docs = []
    for batch_size in (1, 4):
        out = str(tmp_path / f"b{batch_size}")
        Trainer.test(eval_cfg(True, 3, out, batch_size), model)
        docs.append(read_results(out))
    assert docs[0]["mode"] == "cascade" and docs[0]["num_pairs"] == 6
    for q1, q4 in zip(docs[0]["queries"], docs[1]["queries"]):
        assert q1["gallery"].keys() == q4["gallery"].keys()
        for name in q1["gallery"]:
            np.testing.assert_allclose(q1["gallery"][name], q4["gallery"][name],
                                       rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("guided", [False, True], ids=["agnostic", "guided"])
def test_search_matches_do_not_depend_on_the_batch(guided, tmp_path):
    """qeeps-search over frames of several sizes: batch_size 4 gives batch_size 1's matches."""
    _, _, cfg, model = search_fixtures.save_model_files(str(tmp_path), guided)
    sizes = [(64, 96), (80, 80), (64, 96), (50, 120), (64, 96), (96, 64), (80, 80), (64, 96)]
    frames = [GalleryFrame(f"f{i}", search_fixtures.random_image(300 + i, h, w), i)
              for i, (h, w) in enumerate(sizes)]
    searcher = PersonSearcher(cfg, model)
    box = (10.0, 8.0, 40.0, 60.0)
    query = search_fixtures.random_image(7)
    alone = searcher.search(query, box, frames, batch_size=1, progress=False)
    batched = searcher.search(query, box, frames, batch_size=4, progress=False)
    assert len(alone) > 5
    assert [m.frame for m in alone] == [m.frame for m in batched]
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(a.box, b.box, rtol=1e-4, atol=1e-3)
        assert a.det_score == pytest.approx(b.det_score, abs=1e-4)
        assert a.similarity == pytest.approx(b.similarity, abs=1e-4)
