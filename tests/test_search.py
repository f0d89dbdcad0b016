"""qeeps-search: gallery sources (folder, MJPG video), PersonSearcher in both modes against a
manual forward of the model, ranking / top-k / frame keeping, rendering, the CLI end to end and
its user errors (exit 2, one line naming the input, nothing written)."""
import json
import logging
import os

import cv2
import numpy as np
import pytest
import torch

import search_fixtures
from qeeps_d2.data.mapper import PersonSearchMapper
from qeeps_d2.search import (
    GalleryFrame,
    Match,
    PersonSearcher,
    count_gallery,
    draw_matches,
    iter_gallery,
    match_strip,
    resolve_device,
    write_html_report,
)
from qeeps_d2.search.cli import main
from qeeps_d2.search.render import CORRECT_COLOUR, QUERY_COLOUR, WRONG_COLOUR

QUERY_BOX = (10.0, 8.0, 40.0, 60.0)  # in the 96x64 query image


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A gallery folder of 6 PNG images, a 20-frame video and a query image."""
    root = tmp_path_factory.mktemp("search_data")
    folder = str(root / "gallery")
    images = search_fixtures.write_image_folder(folder, 6)
    video = str(root / "clip.avi")
    search_fixtures.write_video(video, 20)
    query = str(root / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    return {"root": root, "folder": folder, "images": images, "video": video, "query": query}


@pytest.fixture(scope="module", params=[False, True], ids=["agnostic", "guided"])
def model_files(request, tmp_path_factory):
    """(config path, weights path, cfg, model) of a tiny model, query-agnostic or guided."""
    folder = tmp_path_factory.mktemp("agnostic" if not request.param else "guided")
    return search_fixtures.save_model_files(str(folder), request.param)


@pytest.fixture(scope="module")
def agnostic_files(tmp_path_factory):
    return search_fixtures.save_model_files(str(tmp_path_factory.mktemp("cli_model")), False)


# ---------------------------------------------------------------------------- galleries
def test_folder_gallery_sorted_every_and_unreadable_skipped(tmp_path, caplog):
    images = search_fixtures.write_image_folder(str(tmp_path), 5)
    (tmp_path / "img_02.png").write_bytes(b"not an image")  # unreadable: skipped
    (tmp_path / "notes.txt").write_text("ignored")
    os.makedirs(tmp_path / "sub")
    cv2.imwrite(str(tmp_path / "sub" / "deeper.png"), images[0])  # not recursive
    cv2.imwrite(str(tmp_path / "A.JPG"), images[0])  # upper-case extension, sorts first
    gallery = iter_gallery(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.search.gallery"):
        frames = list(gallery)
    assert [(f.name, f.index) for f in frames] == [
        ("A.JPG", 0), ("img_00.png", 1), ("img_01.png", 2), ("img_03.png", 4), ("img_04.png", 5)]
    assert np.array_equal(frames[2].image, images[1]) and frames[2].image.dtype == np.uint8
    assert gallery.skipped == ["img_02.png"] and gallery.num_read == 5
    assert "img_02.png" in caplog.text and "skipped 1 unreadable image(s) of 6" in caplog.text
    assert count_gallery(str(tmp_path)) == 6
    every = iter_gallery(str(tmp_path), every=3)  # indices 0 and 3 (img_02.png, unreadable)
    assert [f.index for f in every] == [0] and every.skipped == ["img_02.png"]
    assert count_gallery(str(tmp_path), every=3) == 2
    assert [f.index for f in iter_gallery(str(tmp_path), every=2)] == [0, 2, 4]


def test_video_gallery_every_fifth_frame(data):
    frames = list(iter_gallery(data["video"], every=5))
    assert [f.index for f in frames] == [0, 5, 10, 15]
    assert [f.name for f in frames] == ["frame_000000", "frame_000005", "frame_000010",
                                        "frame_000015"]
    assert [search_fixtures.frame_level(f.image) for f in frames] == [0, 5, 10, 15]
    assert frames[0].image.shape == (search_fixtures.FRAME_H, search_fixtures.FRAME_W, 3)
    assert count_gallery(data["video"], every=5) == 4
    assert count_gallery(data["video"], every=3) == 7
    assert len(list(iter_gallery(data["video"]))) == 20


def test_truncated_video_is_searched_as_far_as_it_reads_with_a_warning(data, tmp_path, caplog):
    """A video cut in half: its frames up to the cut are read, and a warning says how many of
    the announced frames were read (not a silent, half-searched exit 0)."""
    whole = open(data["video"], "rb").read()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.search.gallery"):
        gallery = iter_gallery(str(cut), every=2)
        frames = list(gallery)
    read = len(frames)
    assert 0 < read < 10 and gallery.frames_short > 0
    decoded = 20 - gallery.frames_short
    assert frames[-1].index == (decoded - 1) // 2 * 2
    assert f"ends after {decoded} of the 20 frames its container announces" in caplog.text
    # the whole video: no warning
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="qeeps_d2.search.gallery"):
        whole_gallery = iter_gallery(data["video"])
        assert len(list(whole_gallery)) == 20
    assert whole_gallery.frames_short == 0 and "announces" not in caplog.text


def test_gallery_errors_name_the_input(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iter_gallery(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match="empty holds no"):
        iter_gallery(str(tmp_path / "empty"))
    (tmp_path / "fake.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="cannot open gallery video .*fake.mp4"):
        iter_gallery(str(tmp_path / "fake.mp4"))
    with pytest.raises(ValueError, match="every"):
        iter_gallery(str(tmp_path / "empty"), every=0)


# ---------------------------------------------------------------------------- searcher
def _manual_matches(cfg, model, data, guided):
    """Rows (frame name, box, det, similarity) of a direct model forward on file records."""
    mapper = PersonSearchMapper(cfg, is_train=False)
    names = sorted(os.listdir(data["folder"]))
    rows = []
    with torch.no_grad():
        if not guided:
            query = mapper({"file_name": data["query"], "query_box": list(QUERY_BOX)})
            query_embed = model([query])[0]["query_embed"]
        for name in names:
            record = {"file_name": os.path.join(data["folder"], name)}
            if guided:
                record.update(query_file_name=data["query"], query_box=list(QUERY_BOX))
            inst = model([mapper(record)])[0]["instances"]
            sims = inst.pred_sims if guided else inst.pred_embeds @ query_embed
            rows += [(name, b, s, q) for b, s, q in zip(
                inst.pred_boxes.tensor.tolist(), inst.scores.tolist(), sims.tolist())]
    return rows


def test_search_equals_a_manual_forward(model_files, data):
    """Agnostic: query_embed @ pred_embeds; guided: the pair outputs' pred_sims; both filtered
    by DET_THRESH and ranked by similarity (batched search = one image per forward)."""
    _, _, cfg, model = model_files
    guided = model.query_guided
    rows = _manual_matches(cfg, model, data, guided)
    kept = sorted([r for r in rows if r[2] >= search_fixtures.DET_THRESH], key=lambda r: -r[3])
    assert 0 < len(kept) < len(rows)  # the threshold matters here
    searcher = PersonSearcher(cfg, model)
    assert searcher.query_guided == guided
    matches = searcher.search(data["query"], QUERY_BOX, iter_gallery(data["folder"]),
                              batch_size=4, progress=False)
    assert [m.frame for m in matches] == [r[0] for r in kept]
    assert [m.index for m in matches] == [int(r[0][4:6]) for r in kept]
    np.testing.assert_allclose([m.box for m in matches], [r[1] for r in kept], atol=1e-3)
    np.testing.assert_allclose([m.det_score for m in matches], [r[2] for r in kept], atol=1e-5)
    np.testing.assert_allclose([m.similarity for m in matches], [r[3] for r in kept], atol=1e-5)
    assert all(m.image is None for m in matches)


def test_ranking_topk_and_kept_frames(model_files, data):
    _, _, cfg, model = model_files
    searcher = PersonSearcher(cfg, model)
    frames = [GalleryFrame(f"f{i}", image, 10 + i) for i, image in enumerate(data["images"])]
    query = cv2.imread(data["query"])
    everything = searcher.search(query, QUERY_BOX, frames, progress=False)
    sims = [m.similarity for m in everything]
    assert sims == sorted(sims, reverse=True) and len(everything) > 3
    top3 = searcher.search(query, QUERY_BOX, iter(frames), topk=3, batch_size=2,
                           progress=False, keep_frames=True)
    assert [m.frame for m in top3] == [m.frame for m in everything[:3]]
    np.testing.assert_allclose([m.box for m in top3], [m.box for m in everything[:3]], atol=1e-3)
    for m in top3:
        assert m.image is frames[m.index - 10].image


def test_search_streams_and_keeps_only_the_top_frames(agnostic_files):
    """Frames come from a generator; after the search only the top-1 match's frame is alive."""
    import gc
    import weakref

    _, _, cfg, model = agnostic_files
    refs = []

    def frames():
        for i in range(6):
            image = search_fixtures.random_image(100 + i)
            refs.append(weakref.ref(image))
            yield GalleryFrame(f"f{i}", image, i)

    (best,) = PersonSearcher(cfg, model).search(search_fixtures.random_image(7), QUERY_BOX,
                                                frames(), topk=1, progress=False,
                                                keep_frames=True)
    gc.collect()
    alive = [i for i, r in enumerate(refs) if r() is not None]
    assert len(refs) == 6 and alive == [best.index]
    assert refs[best.index]() is best.image


def test_searcher_from_config_loads_the_weights(model_files, data):
    config, weights, cfg, model = model_files
    searcher = PersonSearcher.from_config(config, weights, device="cpu")
    assert searcher.cfg.MODEL.WEIGHTS == weights and searcher.cfg.MODEL.DEVICE == "cpu"
    assert not searcher.model.training
    loaded = searcher.model.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert searcher.search(data["query"], QUERY_BOX, iter_gallery(data["folder"]), topk=2,
                           progress=False)


def test_search_input_errors(agnostic_files, data):
    _, _, cfg, model = agnostic_files
    searcher = PersonSearcher(cfg, model)
    gallery = iter_gallery(data["folder"])
    with pytest.raises(ValueError, match="query.png: query box .* outside the 96x64 image"):
        searcher.search(data["query"], (50, 10, 120, 60), gallery, progress=False)
    with pytest.raises(ValueError, match="empty"):
        searcher.search(data["query"], (10, 10, 10, 60), gallery, progress=False)
    with pytest.raises(ValueError, match="gallery frame bad: expected an HxWx3 uint8"):
        searcher.search(data["query"], QUERY_BOX,
                        [GalleryFrame("bad", np.zeros((64, 96), np.uint8), 0)], progress=False)
    with pytest.raises(ValueError, match="topk"):
        searcher.search(data["query"], QUERY_BOX, gallery, topk=0, progress=False)
    with pytest.raises(ValueError, match="unknown device 'gpu'"):
        resolve_device("gpu")
    assert resolve_device("cuda:1") == "cuda:1"


# ---------------------------------------------------------------------------- rendering
def _match(image, box, sim, frame="f"):
    return Match(frame, 0, box, 0.9, sim, image)


def test_draw_matches_draws_a_copy():
    image = np.zeros((60, 80, 3), np.uint8)
    out = draw_matches(image, [(10, 20, 50, 55)], ["#1"], [(0, 0, 255)])
    assert not image.any()
    assert tuple(out[40, 10]) == (0, 0, 255) and tuple(out[40, 30]) == (0, 0, 0)
    assert (out[:20, 10:40] == (0, 0, 255)).all(axis=2).any()  # the label tab above the box
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_matches(image, [(0, 0, 5, 5), (1, 1, 4, 4)], ["a"], [(0, 0, 0)] * 2)


def test_match_strip_layout_and_correctness_frames():
    frame = search_fixtures.random_image(3, 120, 160)
    matches = [_match(frame, (20, 10, 60, 100), 0.9), _match(frame, (90, 30, 120, 110), 0.5),
               _match(frame, (0, 0, 160, 120), 0.1)]
    strip = match_strip(frame, (30, 20, 70, 110), matches, correct=[True, False, None],
                        title="QEEPS", height=96)
    plain = match_strip(frame, (30, 20, 70, 110), matches, height=96)
    assert strip.dtype == np.uint8 and strip.ndim == 3
    assert strip.shape[0] > plain.shape[0]  # the title band
    for colour, expected in ((CORRECT_COLOUR, 1), (WRONG_COLOUR, 1), (QUERY_COLOUR, 2)):
        hit = (strip == colour).all(axis=2)
        assert hit.any()
        assert (hit.sum(axis=0) > strip.shape[0] // 2).any() == (expected > 0)  # frame sides
    assert not (plain == CORRECT_COLOUR).all(axis=2).any()
    assert not (plain == WRONG_COLOUR).all(axis=2).any()
    empty = match_strip(frame, (30, 20, 70, 110), [], height=96)
    assert empty.shape[1] < plain.shape[1]
    with pytest.raises(ValueError, match="2 correct flags"):
        match_strip(frame, (30, 20, 70, 110), matches, correct=[True, False])
    with pytest.raises(ValueError, match="#1 .*has no image"):
        match_strip(frame, (30, 20, 70, 110), [Match("x.jpg", 0, (0, 0, 5, 5), 1.0, 1.0)])


def test_html_report_links_relative_and_escapes(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    cv2.imwrite(str(images / "a b.jpg"), np.zeros((4, 4, 3), np.uint8))
    out = tmp_path / "report"
    path = write_html_report(str(out), "Search <1>",
                             [("Query & matches", [str(images / "a b.jpg")], "sim > 0.5")])
    assert path == str(out / "index.html")
    page = open(path).read()
    assert 'src="../imgs/a%20b.jpg"' in page and "Search &lt;1&gt;" in page
    assert "Query &amp; matches" in page and "sim &gt; 0.5" in page and "http" not in page
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        write_html_report(str(out), "t", [("h", [str(images / "missing.jpg")], "")])


# ---------------------------------------------------------------------------- CLI
def _cli(config, weights, query_args, gallery, out, *extra):
    return main(["--config", config, "--weights", weights, *query_args, "--gallery", gallery,
                 "--out", str(out), "--device", "cpu", *extra])


def test_cli_video_end_to_end(model_files, data, tmp_path, capsys):
    config, weights, cfg, model = model_files
    out = tmp_path / "out"
    assert _cli(config, weights, ["--query", data["query"], "--box", "10,8,40,60"],
                data["video"], out, "--topk", "3", "--every", "5", "--batch-size", "3") == 0
    stdout = capsys.readouterr().out
    results = json.load(open(out / "results.json"))
    assert results["query"] == {"image": data["query"], "box": list(QUERY_BOX), "crop": False}
    assert results["model"]["query_guided"] == model.query_guided
    assert results["model"]["det_thresh"] == search_fixtures.DET_THRESH
    assert results["gallery"]["frames_searched"] == 4 and results["gallery"]["skipped"] == []
    matches = results["matches"]
    assert [m["rank"] for m in matches] == [1, 2, 3]
    assert all(m["index"] % 5 == 0 and m["frame"] == f"frame_{m['index']:06d}" for m in matches)
    expected = PersonSearcher(cfg, model).search(
        data["query"], QUERY_BOX, iter_gallery(data["video"], every=5), topk=3, progress=False)
    assert [m["frame"] for m in matches] == [m.frame for m in expected]
    np.testing.assert_allclose([m["similarity"] for m in matches],
                               [m.similarity for m in expected], atol=1e-6)
    report = sorted(os.listdir(out / "report"))
    assert report == ["index.html", "query.jpg", "rank_001.jpg", "rank_002.jpg", "rank_003.jpg",
                      "strip.jpg"]
    page = open(out / "report" / "index.html").read()
    assert 'src="rank_001.jpg"' in page and matches[0]["frame"] in page
    assert cv2.imread(str(out / "report" / "rank_001.jpg")).shape == (64, 96, 3)
    assert "4 frames searched" in stdout and matches[0]["frame"] in stdout
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary folder left


def test_cli_query_crop_replaces_an_existing_out(agnostic_files, data, tmp_path, capsys):
    config, weights, _, _ = agnostic_files
    crop = str(tmp_path / "crop.png")
    cv2.imwrite(crop, search_fixtures.random_image(9, 48, 24))
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old run")
    assert _cli(config, weights, ["--query-crop", crop], data["folder"], out) == 0
    results = json.load(open(out / "results.json"))
    assert results["query"] == {"image": crop, "box": [0.0, 0.0, 24.0, 48.0], "crop": True}
    assert results["gallery"]["frames_searched"] == 6
    assert 0 < len(results["matches"]) <= 10
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["crop.png", "out"]


@pytest.mark.parametrize("case", [
    "missing_query", "unreadable_query", "box_outside", "box_zero_size", "box_malformed",
    "missing_gallery", "unreadable_video", "missing_weights", "weights_mismatch",
    "unknown_device", "crop_and_box",
])
def test_cli_user_errors(case, agnostic_files, data, tmp_path, capsys):
    config, weights, _, _ = agnostic_files
    query = ["--query", data["query"], "--box", "10,8,40,60"]
    gallery, device, named = data["folder"], "cpu", None
    if case == "missing_query":
        query[1] = named = str(tmp_path / "nope.jpg")
    elif case == "unreadable_query":
        query[1] = named = str(tmp_path / "broken.jpg")
        open(named, "w").write("garbage")
    elif case == "box_outside":
        query[3], named = "50,10,120,60", "outside the 96x64"
    elif case == "box_zero_size":
        query[3], named = "10,8,10,60", "empty"
    elif case == "box_malformed":
        query[3], named = "10,8,40", "--box"
    elif case == "missing_gallery":
        gallery = named = str(tmp_path / "no_gallery")
    elif case == "unreadable_video":
        gallery = named = str(tmp_path / "clip.mp4")
        open(gallery, "w").write("garbage")
    elif case == "missing_weights":
        weights = named = str(tmp_path / "missing.pth")
    elif case == "weights_mismatch":
        config = search_fixtures.write_wider_config(str(tmp_path / "wide.yaml"), False)
        named = "do not fit"
    elif case == "unknown_device":
        device, named = "tpu", "unknown device 'tpu'"
    elif case == "crop_and_box":
        query += ["--query-crop", data["query"]]
        named = "--query-crop"
    out = tmp_path / "out"
    code = main(["--config", config, "--weights", weights, *query, "--gallery", gallery,
                 "--out", str(out), "--device", device])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("qeeps-search: error:")
    assert named in err and "Traceback" not in err
    assert not out.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out")]
