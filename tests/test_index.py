"""qeeps-index and qeeps-search --index (tiny CPU models): an index search ranks as qeeps-search
does, an interrupted build continues to the same files, two processes write the one-process
index, a build into another model's or source's index is refused in one line, a folder that
gained images is appended, --rerank re-scores in pair mode by the cascade's rule, and the
approximate (HNSW) search finds the exact top 10."""
import json
import os
import shutil

import cv2
import numpy as np
import pytest
import torch

import search_fixtures
from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.search import index as ix
from qeeps_d2.search.cli import main as search_main
from qeeps_d2.search.embedder import FrameDetections, TorchFrameEmbedder
from qeeps_d2.search.index_cli import main as index_main
from qeeps_d2.search.searcher import PersonSearcher

BOX = "10,8,40,60"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A folder of 7 PNG images, a 20-frame MJPG video and a query image."""
    root = tmp_path_factory.mktemp("index_data")
    folder = str(root / "gallery")
    search_fixtures.write_image_folder(folder, 7)
    video = str(root / "clip.avi")
    search_fixtures.write_video(video, 20)
    query = str(root / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    return {"root": root, "folder": folder, "video": video, "query": query}


@pytest.fixture(scope="module")
def oim(tmp_path_factory):
    """(config, weights) of the tiny query-agnostic model."""
    config, weights, _, _ = search_fixtures.save_model_files(
        str(tmp_path_factory.mktemp("oim")), guided=False)
    return config, weights


@pytest.fixture(scope="module")
def guided(tmp_path_factory):
    """(config, weights) of a tiny query-guided model that detects in both modes (the cascade
    tests' model)."""
    from dist_eval_worker import eval_cfg, guided_model

    folder = str(tmp_path_factory.mktemp("guided"))
    cfg = eval_cfg(True, 0, "")
    cfg.DATASETS.TEST = ()
    QEEPSCheckpointer(guided_model(), folder).save("model")
    config = os.path.join(folder, "config.yaml")
    with open(config, "w") as f:
        f.write(cfg.dump())
    return config, os.path.join(folder, "model.pth")


def _index(model, source, out, *extra):
    return index_main(["--config-file", model[0], "--weights", model[1], "--input", source,
                       "--output", str(out), "--device", "cpu", *extra])


def _files(folder):
    """{relative path: bytes} of every file under ``folder``."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = open(path, "rb").read()
    return found


@pytest.fixture(scope="module")
def folder_index(data, oim, tmp_path_factory):
    out = tmp_path_factory.mktemp("built") / "index"
    assert _index(oim, data["folder"], out, "--chunk-frames", "2", "--batch-size", "3") == 0
    return out


# ---------------------------------------------------------------------------- search
def test_index_search_equals_qeeps_search(folder_index, data, oim, tmp_path, capsys):
    manifest = ix.read_manifest(str(folder_index))
    assert manifest["status"] == "complete" and manifest["chunks"] == 4
    assert manifest["frames"] == [f"img_{i:02d}.png" for i in range(7)]
    assert manifest["model"]["backend"] == "torch" and manifest["num_detections"] > 10
    query = ["--query", data["query"], "--box", BOX, "--topk", "6"]
    assert search_main(["--index", str(folder_index), *query, "--out", str(tmp_path / "i")]) == 0
    assert "searched in the index (exact)" in capsys.readouterr().out
    # the same with the model given (Detectron2's flag names), and without an index
    assert search_main(["--index", str(folder_index), "--config-file", oim[0], "--weights",
                        oim[1], *query, "--out", str(tmp_path / "i2")]) == 0
    assert search_main(["--config-file", oim[0], "--weights", oim[1], "--gallery",
                        data["folder"], *query, "--out", str(tmp_path / "g"),
                        "--device", "cpu"]) == 0
    got, got2, ref = (json.load(open(tmp_path / d / "results.json")) for d in ("i", "i2", "g"))
    assert got["matches"] == got2["matches"]
    assert len(ref["matches"]) == 6
    assert [(m["frame"], m["index"]) for m in got["matches"]] == \
        [(m["frame"], m["index"]) for m in ref["matches"]]
    for key, atol in (("box", 1e-2), ("det_score", 1e-5), ("similarity", 1e-5)):
        np.testing.assert_allclose([m[key] for m in got["matches"]],
                                   [m[key] for m in ref["matches"]], atol=atol)
    assert got["gallery"]["frames_searched"] == 7 and got["index"]["approximate"] is False
    # the report: the same frames, read back from the source
    assert sorted(os.listdir(tmp_path / "i" / "report")) == \
        sorted(os.listdir(tmp_path / "g" / "report"))
    a = cv2.imread(str(tmp_path / "i" / "report" / "rank_001.jpg")).astype(int)
    b = cv2.imread(str(tmp_path / "g" / "report" / "rank_001.jpg")).astype(int)
    assert np.abs(a - b).mean() < 1.0


def test_unreadable_images_and_a_missing_chunk(folder_index, data, oim, tmp_path, capsys):
    """Unreadable images (one at the end: its chunk holds no frame) are listed and skipped as
    qeeps-search skips them; a chunk lost from the middle stops the merge and is rebuilt."""
    source = tmp_path / "broken"
    shutil.copytree(data["folder"], source)
    for name in ("img_03.png", "img_06.png"):
        (source / name).write_bytes(b"not an image")
    out = tmp_path / "index"
    assert _index(oim, str(source), out, "--chunk-frames", "2") == 0
    manifest = ix.read_manifest(str(out))
    assert manifest["skipped"] == ["img_03.png", "img_06.png"] and manifest["num_frames"] == 5
    assert manifest["chunks"] == 4 and manifest["frames"][6] == "img_06.png"
    last = json.load(open(out / "chunks" / "chunk_000003.json"))
    assert last["frames"] == [] and last["skipped"] == [[6, "img_06.png"]] and last["last"]
    loaded = ix.load_index(str(out))
    assert np.all(np.diff(loaded.positions) >= 0)  # rows in gallery order
    assert set(loaded.positions.tolist()) == {0, 1, 2, 4, 5}
    query = ["--query", data["query"], "--box", BOX, "--topk", "5"]
    assert search_main(["--index", str(out), *query, "--out", str(tmp_path / "i")]) == 0
    assert search_main(["--config-file", oim[0], "--weights", oim[1], "--gallery", str(source),
                        *query, "--device", "cpu", "--out", str(tmp_path / "g")]) == 0
    got, ref = (json.load(open(tmp_path / d / "results.json")) for d in ("i", "g"))
    assert [m["frame"] for m in got["matches"]] == [m["frame"] for m in ref["matches"]]
    assert got["gallery"]["skipped"] == ref["gallery"]["skipped"] == ["img_03.png", "img_06.png"]
    # a chunk lost from the middle
    built = _files(out)
    os.remove(out / "chunks" / "chunk_000001.json")
    with pytest.raises(ix.IndexIncomplete, match="1 of 4 chunks missing .first: 1."):
        ix.finalize_index(str(out))
    manifest["status"] = "building"  # as an interrupted build leaves it
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert _index(oim, str(source), out, "--chunk-frames", "2") == 0
    assert _files(out) == built


def test_confidence_threshold_filters_and_cannot_go_below_the_index(folder_index, data,
                                                                    tmp_path, capsys):
    data_ = ix.load_index(str(folder_index))
    stored = data_.manifest["det_thresh"]
    higher = float(np.median(data_.scores))
    query = np.ones(16, np.float32) / 4.0
    everything = ix.IndexSearcher(data_).search(query, 1000)
    kept = ix.IndexSearcher(data_, det_thresh=higher).search(query, 1000)
    assert len(everything) == len(data_.scores) > len(kept) > 0
    assert [m.row for m in kept] == [m.row for m in everything if m.det_score >= higher]
    with pytest.raises(ValueError, match="below the index's"):
        ix.IndexSearcher(data_, det_thresh=stored - 0.1)
    out = tmp_path / "out"
    assert search_main(["--index", str(folder_index), "--query", data["query"], "--box", BOX,
                        "--confidence-threshold", str(stored - 0.1), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "below the index's" in err and not out.exists()


def test_float16_index_ranks_as_float32(folder_index, data, oim, tmp_path):
    assert _index(oim, data["folder"], tmp_path / "h", "--chunk-frames", "2", "--dtype",
                  "float16") == 0
    full, half = ix.load_index(str(folder_index)), ix.load_index(str(tmp_path / "h"))
    assert ix.read_manifest(str(tmp_path / "h"))["dtype"] == "float16"
    assert os.path.getsize(tmp_path / "h" / "chunks" / "chunk_000000.npy") < \
        os.path.getsize(folder_index / "chunks" / "chunk_000000.npy")
    np.testing.assert_allclose(half.embeddings, full.embeddings, atol=1e-3)
    np.testing.assert_array_equal(half.boxes, full.boxes)


# ---------------------------------------------------------------------------- building
def _interrupt_after(monkeypatch, frames):
    """embed_frames raises KeyboardInterrupt once ``frames`` frames were embedded; returns the
    list of frame counts of the calls."""
    calls = []
    real = TorchFrameEmbedder.embed_frames

    def embed(self, images):
        if frames is not None and sum(calls) + len(images) > frames:
            raise KeyboardInterrupt
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(TorchFrameEmbedder, "embed_frames", embed)
    return calls


def test_interrupted_build_continues_to_the_same_index(data, oim, tmp_path, monkeypatch,
                                                       capsys):
    args = ("--every", "2", "--chunk-frames", "3", "--batch-size", "2")
    assert _index(oim, data["video"], tmp_path / "ref", *args) == 0
    reference = _files(tmp_path / "ref")
    assert json.loads(reference["manifest.json"])["frames"] == \
        [f"frame_{i:06d}" for i in range(0, 20, 2)]
    assert sum(n.endswith(".npy") for n in reference) == 4  # 10 frames in chunks of 3

    out = tmp_path / "out"
    _interrupt_after(monkeypatch, 7)  # in the third chunk
    assert _index(oim, data["video"], out, *args) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert sorted(os.listdir(out / "chunks")) == [
        "chunk_000000.json", "chunk_000000.npy", "chunk_000001.json", "chunk_000001.npy"]
    # a process killed while writing leaves a temporary file and a chunk without its marker
    (out / "chunks" / ".chunk_000002.npy.x1.tmp").write_bytes(b"half")
    (out / "chunks" / "chunk_000002.npy").write_bytes(b"half")
    with pytest.raises(ix.IndexIncomplete, match="run qeeps-index again"):
        ix.load_index(str(out))
    monkeypatch.undo()
    calls = _interrupt_after(monkeypatch, None)
    assert _index(oim, data["video"], out, *args) == 0
    assert sum(calls) == 4  # the last 4 frames, not the first 6 again
    assert _files(out) == reference
    # searched: the video's frame indices and frames, as qeeps-search --every 2 gives them
    query = ["--query", data["query"], "--box", BOX, "--topk", "4"]
    assert search_main(["--index", str(out), *query, "--out", str(tmp_path / "i")]) == 0
    assert search_main(["--config-file", oim[0], "--weights", oim[1], "--gallery", data["video"],
                        "--every", "2", *query, "--device", "cpu",
                        "--out", str(tmp_path / "g")]) == 0
    got, ref = (json.load(open(tmp_path / d / "results.json"))["matches"] for d in ("i", "g"))
    assert [(m["frame"], m["index"]) for m in got] == [(m["frame"], m["index"]) for m in ref]
    assert any(m["index"] > 0 for m in got)
    for rank in range(1, 5):  # the same frames drawn
        a, b = (cv2.imread(str(tmp_path / d / "report" / f"rank_{rank:03d}.jpg")).astype(int)
                for d in ("i", "g"))
        assert np.abs(a - b).mean() < 1.0
    frames = ix.read_frames(ix.load_index(str(out)), [7, 2, 4])
    assert {p: search_fixtures.frame_level(f) for p, f in frames.items()} == {2: 4, 4: 8, 7: 14}


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="launch gives each process a GPU: needs 2 (CPU processes without CUDA)")
def test_two_processes_build_the_one_process_index(data, oim, tmp_path):
    args = ("--every", "2", "--chunk-frames", "3")
    assert _index(oim, data["video"], tmp_path / "one", *args) == 0
    assert _index(oim, data["video"], tmp_path / "two", *args, "--num-gpus", "2") == 0
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert len(one) == 9 and two == one


def test_plan_split_and_overstated_video_length(data, oim, tmp_path):
    """Shares are contiguous; a container announcing more frames than the video has: the
    processes past the end write empty chunks, which the merge drops."""
    plan = ix.ChunkPlan((0, 1, 2, 3, 4), True)
    assert ix.split_chunks(plan, 0, 2) == ([0, 1], False)
    assert ix.split_chunks(plan, 1, 2) == ([2, 3, 4], True)
    one = ix.ChunkPlan((7,), True)  # fewer chunks than processes: one of them builds it
    assert sorted(ix.split_chunks(one, r, 2) for r in range(2)) == [([], False), ([7], True)]
    embedder = TorchFrameEmbedder.from_config(oim[0], oim[1], device="cpu")
    settings = ix.IndexSettings(model={"backend": "torch", "signature": "s"},
                                source=data["video"], every=2, det_thresh=0.3,
                                embed_dim=embedder.embed_dim, chunk_frames=3)
    out = str(tmp_path / "index")
    ix.prepare_index(out, settings)
    plan = ix.plan_chunks(out, frames_hint=30)  # the container says 30, the video has 10
    assert plan == ix.ChunkPlan(tuple(range(11)), True)
    for rank in range(3):
        chunks, open_end = ix.split_chunks(plan, rank, 3)
        ix.build_chunks(out, embedder, chunks, open_end, progress=False)
    assert os.path.exists(os.path.join(out, "chunks", "chunk_000004.json"))  # an empty last one
    manifest = ix.finalize_index(out)
    assert manifest["chunks"] == 4 and len(manifest["frames"]) == 10
    assert sorted(os.listdir(os.path.join(out, "chunks")))[-1] == "chunk_000003.npy"


@pytest.mark.parametrize("case", ["model", "weights", "source", "every", "changed_folder"])
def test_building_into_another_index_is_refused(case, folder_index, data, oim, guided,
                                                tmp_path, capsys):
    out = tmp_path / "index"
    shutil.copytree(folder_index, out)
    before = _files(out)
    model, source, extra = oim, data["folder"], ["--chunk-frames", "2"]
    if case == "model":
        model, named = guided, "was built with another model"
    elif case == "weights":  # the same config, one weight changed
        checkpoint = torch.load(oim[1], weights_only=False)
        name = next(k for k in checkpoint["model"] if k.endswith("proj.weight"))
        checkpoint["model"][name] = checkpoint["model"][name] * 1.01
        model = (oim[0], str(tmp_path / "other.pth"))
        torch.save(checkpoint, model[1])
        named = "was built with another model"
    elif case == "source":
        source = str(tmp_path / "other")
        search_fixtures.write_image_folder(source, 3)
        named = "was built from"
    elif case == "every":
        extra, named = extra + ["--every", "2"], "was built with --every 1, not 2"
    else:
        source = str(tmp_path / "changed")
        shutil.copytree(data["folder"], source)
        os.rename(os.path.join(source, "img_03.png"), os.path.join(source, "img_03b.png"))
        named = "changed since the index was started (image 3 was img_03.png, now img_03b.png"
        # the manifest names the source by path: make the copy the index's source
        manifest = json.loads(before["manifest.json"])
        manifest["source"]["path"] = os.path.abspath(source)
        (out / "manifest.json").write_text(json.dumps(manifest))
        before = _files(out)
    assert _index(model, source, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("qeeps-index: error:")
    assert named in err and "Traceback" not in err
    assert _files(out) == before


def test_a_folder_that_gained_images_is_appended(data, oim, tmp_path, monkeypatch):
    source = tmp_path / "grows"
    shutil.copytree(data["folder"], source)
    os.remove(source / "img_06.png")  # 6 images: chunks of 4 -> one full, one partial
    assert _index(oim, str(source), tmp_path / "index", "--chunk-frames", "4") == 0
    first = _files(tmp_path / "index")
    shutil.copy(os.path.join(data["folder"], "img_06.png"), source / "img_06.png")
    cv2.imwrite(str(source / "img_07.png"), search_fixtures.random_image(300))
    calls = _interrupt_after(monkeypatch, None)
    assert _index(oim, str(source), tmp_path / "index", "--chunk-frames", "4") == 0
    assert sum(calls) == 4  # the old partial chunk again (img_04..img_07), not the full one
    assert _index(oim, str(source), tmp_path / "fresh", "--chunk-frames", "4") == 0
    appended = _files(tmp_path / "index")
    assert appended == _files(tmp_path / "fresh")
    assert appended["chunks/chunk_000000.npy"] == first["chunks/chunk_000000.npy"]
    assert json.loads(appended["manifest.json"])["num_frames"] == 8


def test_frame_embedders_of_any_backend_build_an_index(data, tmp_path, monkeypatch):
    """The builder sees only the FrameEmbedder interface; --backend onnx builds through
    qeeps_d2.search.onnx_backend.OnnxFrameEmbedder (replaced here by a numpy embedder)."""
    import qeeps_d2.search.onnx_backend as onnx_backend

    class Fake:
        embed_dim = 4
        det_thresh = 0.5

        def __init__(self, onnx_file, det_thresh=None, providers=None, threads=None):
            self.onnx_file = onnx_file

        def embed_frames(self, images):
            found = []
            for image in images:
                level = float(image.mean())
                emb = np.array([[1, level, 0, 0], [0, 0, 1, level]], np.float32)
                emb /= np.linalg.norm(emb, axis=1, keepdims=True)
                found.append(FrameDetections(np.array([[0, 0, 4, 4], [1, 1, 5, 5]], np.float32),
                                             np.array([0.9, 0.4], np.float32), emb))
            return found

        def embed_query(self, image, box):
            return np.array([1, 0, 0, 0], np.float32)

    monkeypatch.setattr(onnx_backend, "OnnxFrameEmbedder", Fake)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not really onnx")
    assert index_main(["--backend", "onnx", "--onnx-file", str(model), "--input",
                       data["folder"], "--output", str(tmp_path / "index")]) == 0
    manifest = ix.read_manifest(str(tmp_path / "index"))
    assert manifest["model"]["backend"] == "onnx" and manifest["det_thresh"] == 0.5
    assert manifest["num_detections"] == 7  # the 0.4 detections are below the threshold
    out = tmp_path / "search"
    assert search_main(["--index", str(tmp_path / "index"), "--query", data["query"], "--box",
                        BOX, "--topk", "3", "--out", str(out)]) == 0
    matches = json.load(open(out / "results.json"))["matches"]
    assert [m["box"] for m in matches] == [[0, 0, 4, 4]] * 3
    assert index_main(["--backend", "onnx", "--input", data["folder"], "--output",
                       str(tmp_path / "x")]) == 2


# ---------------------------------------------------------------------------- re-ranking
def test_rerank_is_the_cascade_in_pair_mode(data, guided, oim, tmp_path, monkeypatch, capsys):
    out = tmp_path / "index"
    assert _index(guided, data["folder"], out, "--chunk-frames", "3") == 0
    pairs = []
    real = PersonSearcher._run_pairs

    def run_pairs(self, batch, query):
        pairs.extend(f.name for f in batch)
        return real(self, batch, query)

    monkeypatch.setattr(PersonSearcher, "_run_pairs", run_pairs)
    query = ["--query", data["query"], "--box", BOX, "--topk", "8"]
    assert search_main(["--index", str(out), "--rerank", "2", *query,
                        "--out", str(tmp_path / "r")]) == 0
    assert len(pairs) == 2  # only the two shortlisted frames ran as pairs
    rescored = set(pairs)
    pairs.clear()
    assert search_main(["--config-file", guided[0], "--weights", guided[1], "--gallery",
                        data["folder"], "--cascade-topk", "2", *query, "--device", "cpu",
                        "--out", str(tmp_path / "c")]) == 0
    assert set(pairs) == rescored
    got = json.load(open(tmp_path / "r" / "results.json"))
    ref = json.load(open(tmp_path / "c" / "results.json"))
    assert [(m["frame"], m["index"]) for m in got["matches"]] == \
        [(m["frame"], m["index"]) for m in ref["matches"]]
    np.testing.assert_allclose([m["similarity"] for m in got["matches"]],
                               [m["similarity"] for m in ref["matches"]], atol=1e-5)
    sims = [m["similarity"] for m in got["matches"]]
    assert max(sims) >= -1 > min(sims)  # re-scored on top, shifted first-stage rows below
    assert got["index"]["rerank"] == 2
    # without --rerank: first-stage similarities only
    assert search_main(["--index", str(out), *query, "--out", str(tmp_path / "p")]) == 0
    plain = json.load(open(tmp_path / "p" / "results.json"))["matches"]
    assert min(m["similarity"] for m in plain) >= -1
    capsys.readouterr()
    # a query-agnostic re-ranking model is refused
    assert search_main(["--index", str(out), "--rerank", "2", "--config-file", oim[0],
                        "--weights", oim[1], *query, "--out", str(tmp_path / "x")]) == 2
    assert "--rerank needs a query-guided model" in capsys.readouterr().err


def test_another_model_cannot_embed_the_query(folder_index, data, guided, tmp_path, capsys):
    assert search_main(["--index", str(folder_index), "--config-file", guided[0], "--weights",
                        guided[1], "--query", data["query"], "--box", BOX,
                        "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "was built with another model" in err


# ---------------------------------------------------------------------------- approximate
def _clustered(n, dim, seed):
    """Unit vectors around n // 10 identity centres (cosine to their centre about 0.9)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n // 10, dim)).astype(np.float32)
    x = centres[rng.integers(0, len(centres), n)]
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x += 0.5 * rng.standard_normal(x.shape).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True), centres


def _memory_index(tmp_path, embeddings, scores, approximate):
    n = len(embeddings)
    manifest = {"det_thresh": 0.0, "embed_dim": embeddings.shape[1], "num_detections": n,
                "approximate": None}
    if approximate:
        ix.build_approximate_index(embeddings, str(tmp_path / "hnsw.faiss"))
        manifest["approximate"] = {"kind": "hnsw", "file": "hnsw.faiss"}
    return ix.IndexData(str(tmp_path), manifest, np.arange(n, dtype=np.int32),
                        np.zeros((n, 4), np.float32), scores, embeddings,
                        [f"f{i}" for i in range(n)], 1)


def test_approximate_search_recall_against_exact(tmp_path):
    embeddings, centres = _clustered(4000, 32, seed=0)
    scores = np.random.default_rng(1).uniform(0, 1, len(embeddings)).astype(np.float32)
    data = _memory_index(tmp_path, embeddings, scores, approximate=True)
    exact = ix.IndexSearcher(data, approximate=False)
    approx = ix.IndexSearcher(data)
    assert approx.approximate and not exact.approximate
    queries = centres[:40] / np.linalg.norm(centres[:40], axis=1, keepdims=True)
    recall = np.mean([len({m.row for m in exact.search(q, 10)}
                          & {m.row for m in approx.search(q, 10)}) / 10 for q in queries])
    assert recall >= 0.95
    # a higher threshold: the approximate search only returns detections above it
    above = ix.IndexSearcher(data, det_thresh=0.5)
    above_exact = ix.IndexSearcher(data, det_thresh=0.5, approximate=False)
    found = [m for q in queries for m in above.search(q, 10)]
    assert len(found) == 400 and min(m.det_score for m in found) >= 0.5
    recall = np.mean([len({m.row for m in above_exact.search(q, 10)}
                          & {m.row for m in above.search(q, 10)}) / 10 for q in queries])
    assert recall >= 0.95
    with pytest.raises(ValueError, match="not L2-normalised"):
        exact.search(2 * queries[0], 5)


def test_exact_search_orders_ties_by_gallery_order(tmp_path):
    base = np.eye(8, dtype=np.float32)
    embeddings = base[[3, 1, 1, 5, 1, 2, 1]]  # rows 1, 2, 4, 6 tie with the query
    data = _memory_index(tmp_path, embeddings, np.ones(7, np.float32), approximate=False)
    rows = [m.row for m in ix.IndexSearcher(data).search(base[1], 3)]
    assert rows == [1, 2, 4]
