"""Interrupted training resumes exactly: a run SIGKILLed mid-training and restarted with
``--resume`` computes the same losses, iteration by iteration, as an uninterrupted run; the
training stream is deterministic per iteration; a crash while saving keeps the last checkpoint.
"""
import json
import re
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from detectron2.modeling import build_model

import dataset_fixtures
from model_fixtures import REPO, tiny_cfg
from qeeps_d2.checkpoint import QEEPSCheckpointer
from qeeps_d2.data.samplers import ResumableBatchSampler, ResumableTrainLoader
from qeeps_d2.engine.rng_state import get_rng_state, set_rng_state

WORKER = os.path.join(REPO, "tests", "train_worker.py")
MAX_ITER, PERIOD, KILL_AT = 8, 3, 4  # checkpoints after iterations 2 and 5; killed before 4


@pytest.fixture(scope="module")
def train_setup(tmp_path_factory):
    """A tiny OIM config (random resize + flip, LR step, SEED -1) on the CUHK-SYSU fixture."""
    root = tmp_path_factory.mktemp("resume")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "datasets" / "CUHK-SYSU"))
    cfg = tiny_cfg()
    cfg.DATASETS.TRAIN = ("cuhk_sysu_train",)
    cfg.DATASETS.TEST = ()
    cfg.INPUT.MIN_SIZE_TRAIN = (56, 64, 72)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.EPOCHS = 0
    cfg.SOLVER.MAX_ITER = MAX_ITER
    cfg.SOLVER.STEPS = (5,)
    cfg.SOLVER.WARMUP_ITERS = 2
    cfg.SOLVER.BASE_LR = 0.01
    cfg.SOLVER.CHECKPOINT_PERIOD = PERIOD
    cfg.TEST.EVAL_PERIOD = 0
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.SEED = -1  # the shipped configs' default: the run's seed is drawn, stored and reused
    config = root / "tiny.yaml"
    config.write_text(cfg.dump())
    return root, str(config)


def _train(root, config, out, losses, kill_at=-1, resume=False, opts=()):
    env = dict(os.environ, DETECTRON2_DATASETS=str(root / "datasets"),
               QEEPS_TEST_LOSSES=str(losses), QEEPS_TEST_KILL_AT=str(kill_at),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, WORKER, "--config-file", config] + (["--resume"] if resume else [])
    cmd += ["OUTPUT_DIR", str(out), *opts]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def _losses(path):
    return {r.pop("iter"): r for r in map(json.loads, open(path).read().splitlines())}


def _logged_losses(out):
    """The loss entries of the last line Detectron2's JSONWriter wrote to metrics.json (medians
    over its 20-iteration window)."""
    last = json.loads(open(out / "metrics.json").read().splitlines()[-1])
    return {k: v for k, v in last.items() if k.startswith("loss") or k == "total_loss"}


def test_sigkilled_training_resumes_with_identical_losses(train_setup, tmp_path):
    """Also with the shipped ``SEED -1``: the run's seed is stored in OUTPUT_DIR and reused; the
    smoothed losses written after the resume match too, and a stale temp file of an
    interrupted save is removed."""
    root, config = train_setup
    run = _train(root, config, tmp_path / "run", tmp_path / "run.jsonl", kill_at=KILL_AT)
    assert run.returncode == -signal.SIGKILL
    assert (tmp_path / "run" / "last_checkpoint").read_text() == "model_0000002.pth"
    assert sorted(_losses(tmp_path / "run.jsonl")) == list(range(KILL_AT))
    seed = (tmp_path / "run" / "seed").read_text()
    stale = tmp_path / "run" / ".model_0000005.pth.x1y2z3.tmp"  # as a kill mid-save leaves it
    stale.write_bytes(b"partial")

    # the uninterrupted reference: the same run's seed, given explicitly
    ref = _train(root, config, tmp_path / "ref", tmp_path / "ref.jsonl", opts=["SEED", seed.strip()])
    assert ref.returncode == 0, ref.stderr[-3000:]
    expected = _losses(tmp_path / "ref.jsonl")
    assert sorted(expected) == list(range(MAX_ITER))

    resumed = _train(root, config, tmp_path / "run", tmp_path / "resumed.jsonl", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _losses(tmp_path / "resumed.jsonl")
    assert sorted(got) == list(range(3, MAX_ITER))  # iteration 3 was lost with the kill: redone
    assert not stale.exists()
    assert (tmp_path / "run" / "seed").read_text() == seed
    for it in got:
        assert set(got[it]) == set(expected[it])
        for name, value in got[it].items():
            assert value == pytest.approx(expected[it][name], rel=1e-5, abs=1e-7), (it, name)
    # the final weights agree too (model incl. the OIM lookup table and queue)
    a = torch.load(tmp_path / "ref" / "model_final.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "run" / "model_final.pth", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert "roi_heads.oim_loss.lut" in a and a["roi_heads.oim_loss.lut"].abs().sum() > 0
    ref_logged, run_logged = _logged_losses(tmp_path / "ref"), _logged_losses(tmp_path / "run")
    assert set(run_logged) == set(ref_logged) and len(ref_logged) >= 3
    for name, value in ref_logged.items():
        assert run_logged[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name


def _records(n, landscape):
    return [{"file_name": f"{i}.jpg", "width": 100 if i in landscape else 50, "height": 80}
            for i in range(n)]


def test_batch_sampler_is_a_function_of_seed_and_iteration():
    groups = np.array([1, 1, 0, 1, 0, 1, 1])
    a = ResumableBatchSampler(groups, total_batch_size=2, seed=3)
    b = ResumableBatchSampler(groups, total_batch_size=2, seed=3)
    # landscape group: 5 images -> 3 batches, portrait: 2 -> 1 batch
    assert a.batches_per_epoch == 4
    forward = [a.global_batch(i).tolist() for i in range(12)]
    backward = [b.global_batch(i).tolist() for i in reversed(range(12))][::-1]
    assert forward == backward
    for batch in forward:
        assert len({int(groups[i]) for i in batch}) == 1  # never mixes aspect groups
    # every epoch covers every image
    for e in range(3):
        assert set(sum(forward[4 * e:4 * e + 4], [])) == set(range(7))
    assert forward[:4] != forward[4:8]  # epochs are reshuffled
    other = ResumableBatchSampler(groups, 2, seed=4)
    assert [other.global_batch(i).tolist() for i in range(12)] != forward
    # two ranks split each global batch
    r0, r1 = (ResumableBatchSampler(groups, 2, seed=3, rank=r, world_size=2) for r in (0, 1))
    assert [r0.batch(i) + r1.batch(i) for i in range(12)] == forward


def _flip_mapper(record):
    """A mapper whose output depends on the global numpy / random RNGs (like augmentations)."""
    import random
    return {"name": record["file_name"], "np": float(np.random.rand()), "py": random.random()}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_loader_started_at_k_gives_the_batches_of_an_uninterrupted_stream(num_workers):
    records = _records(9, landscape={0, 1, 2, 5, 7})
    full = ResumableTrainLoader(records, _flip_mapper, 2, seed=11, num_workers=0)
    stream = iter(full)
    expected = [next(stream) for _ in range(10)]
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    resumed = ResumableTrainLoader(records, _flip_mapper, 2, seed=11, num_workers=num_workers)
    resumed.start_at(6)
    stream = iter(resumed)
    assert [next(stream) for _ in range(4)] == expected[6:]
    # the stream neither used nor disturbed the global numpy RNG of this process
    assert np.array_equal(np.random.get_state()[1], state)


def test_unmappable_record_is_replaced_deterministically():
    records = _records(4, landscape=set())
    mapper = lambda r: None if r["file_name"] == "1.jpg" else {"name": r["file_name"]}  # noqa
    loader = ResumableTrainLoader(records, mapper, 2, seed=0, group_by_aspect=False)
    stream = iter(loader)
    names = [[x["name"] for x in next(stream)] for _ in range(6)]
    assert "1.jpg" not in sum(names, [])
    loader.start_at(0)
    stream = iter(loader)
    assert [[x["name"] for x in next(stream)] for _ in range(6)] == names
    loader = ResumableTrainLoader(records, lambda r: None, 2, seed=0)
    with pytest.raises(RuntimeError, match="none of the 4 training records"):
        next(iter(loader))


def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = get_rng_state()
    expected = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    torch.save({"rng": state}, tmp_path / "rng.pth")
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), np.random.randn(), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])
    assert got[2:] == expected[2:]


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model(tiny_cfg())
    checkpointer = QEEPSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002", iteration=2)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    real_save = torch.save

    def crash_half_way(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)  # half the bytes written, then the process "dies"
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="simulated"):
        checkpointer.save("model_0000005", iteration=5)
    monkeypatch.undo()

    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000002.pth"]  # no debris
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    fresh = build_model(tiny_cfg())
    extra = QEEPSCheckpointer(fresh, str(tmp_path)).resume_or_load("", resume=True)
    assert extra["iteration"] == 2
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, good[key]), key


def test_crash_while_tagging_keeps_the_previous_tag(tmp_path, monkeypatch):
    model = build_model(tiny_cfg())
    checkpointer = QEEPSCheckpointer(model, str(tmp_path))
    checkpointer.save("model_0000002")
    real_replace = os.replace

    def fail_on_tag(src, dst):
        if os.path.basename(dst) == "last_checkpoint":
            raise OSError("killed while tagging (simulated)")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_tag)
    with pytest.raises(OSError, match="simulated"):
        checkpointer.save("model_0000005")
    monkeypatch.undo()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------- long searches
@pytest.fixture(scope="module")
def video_search(tmp_path_factory):
    import cv2
    import search_fixtures
    root = tmp_path_factory.mktemp("video_search")
    config, weights, _, _ = search_fixtures.save_model_files(str(root / "model"), guided=False)
    video = str(root / "clip.avi")
    search_fixtures.write_video(video, 20)
    query = str(root / "query.png")
    cv2.imwrite(query, search_fixtures.random_image(7))
    return ["--config", config, "--weights", weights, "--query", query, "--box", "10,8,40,60",
            "--gallery", video, "--topk", "5", "--save-every", "4", "--device", "cpu"]


def _record_frames(monkeypatch, stop_after=None):
    """Make PersonSearcher.search record the frame indices it reads; Ctrl-C after
    ``stop_after`` frames."""
    from qeeps_d2.search.searcher import PersonSearcher
    seen = []
    real = PersonSearcher.search

    def search(self, query, box, gallery, **kwargs):
        def frames():
            for frame in gallery:
                if stop_after is not None and len(seen) == stop_after:
                    raise KeyboardInterrupt
                seen.append(frame.index)
                yield frame
        return real(self, query, box, frames(), **kwargs)

    monkeypatch.setattr(PersonSearcher, "search", search)
    return seen


def test_interrupted_video_search_continues_to_the_same_results(video_search, tmp_path,
                                                                monkeypatch, capsys):
    from qeeps_d2.search.cli import main
    ref, out = tmp_path / "ref", tmp_path / "out"
    partial = tmp_path / ".out.partial"
    assert main(video_search + ["--out", str(ref)]) == 0
    expected = json.loads((ref / "results.json").read_text())
    assert expected["gallery"]["frames_searched"] == 20 and len(expected["matches"]) == 5

    seen = _record_frames(monkeypatch, stop_after=10)  # Ctrl-C in the third chunk of 4 frames
    assert main(video_search + ["--out", str(out)]) == 130
    assert re.search(r"interrupted after 1[01] frames; the first 8 are saved in .*\.out\.partial",
                     capsys.readouterr().err)
    assert not out.exists()
    state = json.loads((partial / "state.json").read_text())
    assert state["frames_done"] == 8 and state["num_read"] == 8
    kept = sorted(n for n in os.listdir(partial) if n.endswith(".png"))
    assert kept == sorted({f"frame_{m['index']:09d}.png" for m in state["matches"]})
    monkeypatch.undo()

    seen = _record_frames(monkeypatch)
    assert main(video_search + ["--out", str(out)]) == 0
    assert seen == list(range(8, 20))  # continued after the saved frames, nothing redone
    assert json.loads((out / "results.json").read_text()) == expected
    assert sorted(os.listdir(out / "report")) == sorted(os.listdir(ref / "report"))
    for name in os.listdir(ref / "report"):  # the same frames drawn (kept losslessly)
        if name.endswith(".jpg"):
            assert (out / "report" / name).read_bytes() == (ref / "report" / name).read_bytes()
    assert not partial.exists()


def test_progress_of_another_search_is_not_reused(video_search, tmp_path, monkeypatch):
    from qeeps_d2.search.cli import main
    out = tmp_path / "out"
    _record_frames(monkeypatch, stop_after=6)
    assert main(video_search + ["--out", str(out)]) == 130
    monkeypatch.undo()
    seen = _record_frames(monkeypatch)
    other_box = [a if a != "10,8,40,60" else "12,8,40,60" for a in video_search]
    assert main(other_box + ["--out", str(out)]) == 0
    assert seen == list(range(20))
    assert not (tmp_path / ".out.partial").exists()
