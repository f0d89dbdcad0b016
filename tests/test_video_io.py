"""Video in and out for qeeps-search (#14 part 4): URL / camera sources, the PyAV decoder, a
bound on live streams, and the annotated output video."""
import json

import cv2
import numpy as np
import pytest

import search_fixtures
from qeeps_d2.search.gallery import count_gallery, is_stream, iter_gallery
from qeeps_d2.search.searcher import Match
from qeeps_d2.search.video_output import AnnotatedVideoWriter

W, H = search_fixtures.FRAME_W, search_fixtures.FRAME_H


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("video") / "clip.avi")
    search_fixtures.write_video(path, 20)
    return path


@pytest.mark.parametrize("text, expected", [
    ("0", True), (3, True), ("rtsp://cam.local/stream1", True), ("http://host/v.mp4", True),
    ("file:///tmp/x.avi", True), ("clip.mp4", False), ("/data/frames", False),
    ("./0.mp4", False), ("10a", False),
])
def test_streams_are_urls_and_camera_indices(text, expected):
    assert is_stream(text) is expected


def test_pyav_decodes_the_same_frames_as_opencv(video):
    pytest.importorskip("av")
    by_opencv = list(iter_gallery(video, every=3, backend="opencv"))
    gallery = iter_gallery(video, every=3, backend="pyav")
    by_pyav = list(gallery)
    assert gallery.decoder == "PyAV" and gallery.fps == pytest.approx(10.0)
    assert [f.index for f in by_pyav] == [f.index for f in by_opencv] == list(range(0, 20, 3))
    assert [search_fixtures.frame_level(f.image) for f in by_pyav] == list(range(0, 20, 3))
    for a, b in zip(by_pyav, by_opencv):
        assert a.image.shape == b.image.shape == (H, W, 3)
        # two MJPEG decoders: equal up to their rounding
        assert np.abs(a.image.astype(int) - b.image.astype(int)).mean() < 3
    assert count_gallery(video, every=3, backend="pyav") == 7


def test_a_url_is_read_as_a_stream_bounded_by_max_frames(video):
    url = "file://" + video  # FFmpeg's file protocol: a URL source without a network
    gallery = iter_gallery(url, every=2, max_frames=4)
    assert gallery.is_stream and gallery.is_video
    frames = list(gallery)
    assert [f.index for f in frames] == [0, 2, 4, 6]
    assert [search_fixtures.frame_level(f.image) for f in frames] == [0, 2, 4, 6]
    assert count_gallery(url, every=2) is None  # a stream has no length
    assert count_gallery(url, every=2, max_frames=4) == 4
    assert len(list(iter_gallery(url))) == 20  # unbounded: to the stream's end
    assert gallery.frames_short == 0


def test_a_stream_cannot_be_continued_or_opened_when_absent(tmp_path):
    with pytest.raises(ValueError, match="cannot be continued"):
        iter_gallery("rtsp://127.0.0.1:9/none", start=3)
    with pytest.raises(ValueError, match=r"cannot open gallery stream or camera file://"):
        iter_gallery("file://" + str(tmp_path / "missing.avi"))
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        iter_gallery("0", max_frames=0)
    with pytest.raises(ValueError, match="unknown video backend 'gstreamer'"):
        iter_gallery(str(tmp_path), backend="gstreamer")


def _match(box, sim, index=0):
    return Match(f"frame_{index:06d}", index, tuple(float(v) for v in box), 0.9, sim)


def _green(frame, box):
    """Fraction of the box outline's pixels that are green (as CORRECT_COLOUR, after video
    compression)."""
    x1, y1, x2, y2 = box
    edge = np.concatenate([frame[y1:y2, x1 - 1:x1 + 2].reshape(-1, 3),
                           frame[y1:y2, x2 - 1:x2 + 2].reshape(-1, 3)]).astype(int)
    b, g, r = edge[:, 0], edge[:, 1], edge[:, 2]
    return float(np.mean((g > 120) & (g > r + 50) & (g > b + 50)))


@pytest.mark.parametrize("ext", [".avi", ".mp4"])
def test_output_video_marks_the_best_match_above_the_threshold(tmp_path, ext):
    path = str(tmp_path / f"out{ext}")
    grey = np.full((120, 160, 3), 90, np.uint8)
    target, other = (20, 20, 60, 100), (90, 20, 130, 100)
    with AnnotatedVideoWriter(path, fps=10, threshold=0.5) as video:
        video.write(grey, [_match(other, 0.3), _match(target, 0.8)], 0)  # found
        video.write(grey, [_match(other, 0.3), _match(target, 0.4)], 1)  # below threshold
        video.write(grey, [], 2)                                          # nobody
        video.write(cv2.resize(grey, (80, 60)), [_match((5, 5, 30, 50), 0.9)], 3)  # other size
    assert video.frames_written == 4
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    assert len(frames) == 4 and frames[0].shape == (120, 160, 3)
    assert _green(frames[0], target) > 0.5 and _green(frames[0], other) < 0.1
    assert _green(frames[1], target) < 0.1 and _green(frames[1], other) < 0.1
    # the half-size frame is scaled 2x into the video's size: its match lands at 2x its box
    assert _green(frames[3], (10, 10, 60, 100)) > 0.5


def test_output_video_without_threshold_marks_each_frames_best(tmp_path):
    writer = AnnotatedVideoWriter(str(tmp_path / "o.avi"), fps=0)
    assert writer.fps == 5.0  # unknown source rate
    frame = writer.annotate(np.full((120, 160, 3), 90, np.uint8),
                            [_match((20, 20, 60, 100), 0.1), _match((90, 20, 130, 100), 0.2)], 7)
    assert _green(frame, (90, 20, 130, 100)) > 0.5 and _green(frame, (20, 20, 60, 100)) < 0.1


def test_output_video_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"out\.gif: unknown extension '\.gif'"):
        AnnotatedVideoWriter(str(tmp_path / "out.gif"), fps=5)
    blocked = tmp_path / "file"
    blocked.write_text("")
    writer = AnnotatedVideoWriter(str(blocked / "out.avi"), fps=5)  # a file where a folder goes
    with pytest.raises(OSError):
        writer.write(np.zeros((40, 40, 3), np.uint8), [], 0)


# ------------------------------------------------------------------ qeeps-search with video
@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return search_fixtures.save_model_files(str(tmp_path_factory.mktemp("model")), False)


def _frames(path):
    capture = cv2.VideoCapture(path)
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            return frames
        frames.append(frame)


def test_on_frame_sees_every_frames_matches_with_their_final_similarities(video, model_files):
    from qeeps_d2.search import PersonSearcher

    config, weights, _, _ = model_files
    searcher = PersonSearcher.from_config(config, weights, device="cpu")
    query = search_fixtures.random_image(7)
    seen = []
    ranked = searcher.search(query, (10, 8, 40, 60), iter_gallery(video, every=4), progress=False,
                             on_frame=lambda frame, found: seen.append((frame.index, found)))
    assert [i for i, _ in seen] == [0, 4, 8, 12, 16]
    flat = sorted((m for _, found in seen for m in found), key=lambda m: -m.similarity)
    assert len(ranked) > 0 and flat == ranked

def test_on_frame_is_refused_in_a_cascade(video, tmp_path):
    from qeeps_d2.search import PersonSearcher

    config, weights, _, _ = search_fixtures.save_model_files(str(tmp_path), True)
    searcher = PersonSearcher.from_config(config, weights, device="cpu")
    with pytest.raises(ValueError, match="on_frame is called with final similarities"):
        searcher.search(search_fixtures.random_image(7), (10, 8, 40, 60), iter_gallery(video),
                        on_frame=print, cascade_topk=2)


def test_search_cli_writes_an_annotated_video_of_a_url_source(video, model_files, tmp_path):
    from qeeps_d2.search.cli import main

    config, weights, _, _ = model_files
    query = str(tmp_path / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    out, clip = tmp_path / "out", tmp_path / "annotated.avi"
    assert main(["--config-file", config, "--weights", weights, "--query", query,
                 "--box", "10,8,40,60", "--input", "file://" + video, "--every", "2",
                 "--max-frames", "6", "--output", str(out), "--output-video", str(clip),
                 "--match-threshold", "-1", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["gallery"]["frames_searched"] == 6
    assert results["gallery"]["output_video"] == str(clip)
    frames = _frames(str(clip))
    assert len(frames) == 6 and frames[0].shape == (H, W, 3)
    # the best match of the search is drawn green in its frame of the video
    best = results["matches"][0]
    x1, y1, x2, y2 = (int(round(v)) for v in best["box"])
    drawn = frames[best["index"] // 2]
    assert _green(drawn, (max(x1, 1), y1, min(x2, W - 2), y2)) > 0.3
    capture = cv2.VideoCapture(str(clip))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(5.0)  # 10 fps source, every 2nd frame


@pytest.mark.parametrize("extra, message", [
    (["--output-video", "v.avi", "--cascade-topk", "2"], "--output-video draws each frame"),
    (["--max-frames", "0"], "--max-frames must be >= 1"),
])
def test_search_cli_video_option_errors(video, model_files, tmp_path, capsys, extra, message):
    from qeeps_d2.search.cli import main

    config, weights, _, _ = model_files
    query = str(tmp_path / "q.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    assert main(["--config-file", config, "--weights", weights, "--query", query, "--box",
                 "10,8,40,60", "--gallery", video, "--output", str(tmp_path / "o"),
                 *extra]) == 2
    assert message in capsys.readouterr().err
