"""SynthPS: determinism, CUHK-SYSU read-back, identities and galleries, atomic ensure, CLI.

All data sets here are tiny (small images, a few identities, the 51 pool images a TestG50 needs).
"""
import os
from collections import Counter

import numpy as np
import pytest

from qeeps_d2.data.synthps import generator as synthps
from qeeps_d2.data.datasets.cuhk_sysu import load_cuhk_sysu, load_cuhk_sysu_protocol, num_train_pids
from qeeps_d2.data.synthps import ensure_synthps, generate_synthps, main, synthps_stats
from qeeps_d2.data.synthps.render import (
    LOOKALIKE_ATTRIBUTES,
    Pose,
    lookalike_variant,
    render_person,
    sample_appearance,
)

TINY = dict(num_train_ids=4, num_test_ids=3, train_images=8, test_images=51, image_size=(96, 72),
            persons_per_image=(2, 4), appearances_per_id=(2, 6), illumination=1.0, gallery_sizes=(50,))


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthps") / "synthps")
    generate_synthps(root, seed=3, **TINY)
    return root


def _files(root):
    """{relative path: bytes} of every file under root, caches excluded."""
    out = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".cache"]
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tiny_root, tmp_path):
    reference = _files(tiny_root)
    generate_synthps(str(tmp_path / "again"), seed=3, **TINY)
    generate_synthps(str(tmp_path / "other"), seed=4, **TINY)
    again, other = _files(str(tmp_path / "again")), _files(str(tmp_path / "other"))
    assert again == reference
    assert "annotation/Images.mat" in reference and "Image/SSM/s59.jpg" in reference
    assert "annotation/test/train_test/TestG50.mat" in reference
    assert set(other) == set(reference)
    assert other["annotation/Images.mat"] != reference["annotation/Images.mat"]
    assert sum(other[k] != reference[k] for k in reference if k.endswith(".jpg")) == 59


def test_cuhk_loader_reads_back_the_intended_counts(tiny_root):
    stats = synthps_stats(tiny_root)
    train, test = load_cuhk_sysu(tiny_root, "train"), load_cuhk_sysu(tiny_root, "test")
    protocol = load_cuhk_sysu_protocol(tiny_root, 50, dataset="synthps_test")
    assert (len(train), len(test)) == (8, 51) == (stats["train_images"], stats["test_images"])
    annotations = [a for d in train + test for a in d["annotations"]]
    assert len(annotations) == stats["boxes"]
    assert sum(a["person_id"] >= 0 for a in annotations) == stats["labeled_boxes"]
    assert all(2 <= len(d["annotations"]) <= 4 for d in train + test)
    assert num_train_pids(tiny_root) == 4
    assert {a["person_id"] for d in train for a in d["annotations"]} == {-1, 0, 1, 2, 3}
    assert len(protocol.queries) == stats["queries"] == 3
    assert stats["seed"] == 3 and stats["image_size"] == [96, 72]


def test_identities_appear_twice_and_galleries_hold_exactly_the_other_appearances(tiny_root):
    train, test = load_cuhk_sysu(tiny_root, "train"), load_cuhk_sysu(tiny_root, "test")
    train_counts = Counter(a["person_id"] for d in train for a in d["annotations"])
    assert all(train_counts[pid] >= 2 for pid in range(4))
    # Every appearance of test identity k, as (image, box).
    seen = {}
    for d in test:
        for a in d["annotations"]:
            if a["person_id"] >= 0:
                seen.setdefault(a["person_id"], set()).add((d["image_id"], tuple(a["bbox"])))
    protocol = load_cuhk_sysu_protocol(tiny_root, 50)
    for query in protocol.queries:
        gallery = protocol.gallery(query.index)
        positive = ~np.isnan(gallery.gt_boxes[:, 0])
        n = int(positive.sum())
        assert len(gallery) == 50 and len(set(gallery.images)) == 50
        assert query.image not in gallery.images
        assert positive[:n].all() and not positive[n:].any()  # positives first
        found = {(im, tuple(box)) for im, box in zip(gallery.images[:n], gallery.gt_boxes[:n])}
        assert found | {(query.image, tuple(query.box))} == seen[query.person_id]
        assert n >= 1
    for d in train + test:
        for a in d["annotations"]:
            x1, y1, x2, y2 = a["bbox"]
            assert 0 <= x1 < x2 <= d["width"] and 0 <= y1 < y2 <= d["height"]


def test_lookalikes_differ_in_one_small_local_pattern():
    rng = np.random.default_rng(0)
    base = sample_appearance(rng)
    a = lookalike_variant(base, "logo", "circle")
    b = lookalike_variant(base, "logo", "cross")
    assert [f for f in a.__dict__ if a.__dict__[f] != b.__dict__[f]] == ["logo"]
    pose = Pose(facing=1, stance=0.05, arm_angles=(10.0, 10.0), elbow_bends=(0.0, 0.0))
    image_a, mask_a = render_person(a, pose, 160)
    image_b, mask_b = render_person(b, pose, 160)
    assert mask_a.shape == (160, 120) and np.array_equal(mask_a, mask_b)
    changed = np.abs(image_a - image_b).sum(axis=2) > 0
    assert 0 < changed.sum() < 0.05 * mask_a.sum()
    with pytest.raises(ValueError, match="logo"):
        lookalike_variant(base, "logo", "none")


def test_every_identity_of_a_full_lookalike_split_has_a_one_attribute_twin():
    apps = synthps._sample_identities(np.random.default_rng(1), 7, lookalike_fraction=1.0)
    for app in apps:
        twins = [o for o in apps if o is not app and sum(
            app.__dict__[f] != o.__dict__[f] for f in app.__dict__) == 1]
        assert twins
        assert {f for o in twins for f in app.__dict__ if app.__dict__[f] != o.__dict__[f]} <= set(
            LOOKALIKE_ATTRIBUTES)


def test_bad_knobs_are_named():
    with pytest.raises(ValueError, match="unknown SynthPS knob"):
        generate_synthps("/nonexistent", num_ids=3)
    with pytest.raises(ValueError, match="gallery_sizes"):
        generate_synthps("/nonexistent", **{**TINY, "gallery_sizes": (20,)})
    with pytest.raises(ValueError, match="test_images"):
        generate_synthps("/nonexistent", **{**TINY, "test_images": 50})


def test_ensure_is_atomic_and_does_not_regenerate(tmp_path, monkeypatch):
    root = str(tmp_path / "synthps")

    def failing_writer(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(synthps, "write_cuhk_sysu", failing_writer)
    with pytest.raises(RuntimeError, match="disk full"):
        ensure_synthps(root, seed=1, **TINY)
    assert os.listdir(tmp_path) == []  # neither the final folder nor a temporary one is left
    monkeypatch.undo()

    assert ensure_synthps(root, seed=1, **TINY) == root
    assert synthps_stats(root)["seed"] == 1
    monkeypatch.setattr(synthps, "generate_synthps", failing_writer)
    assert ensure_synthps(root, seed=2, **TINY) == root  # present: not generated again
    assert synthps_stats(root)["seed"] == 1
    assert os.listdir(tmp_path) == ["synthps"]


def test_ensure_loser_of_a_race_uses_the_winners_folder(tmp_path, monkeypatch):
    root = str(tmp_path / "synthps")
    real = synthps.generate_synthps

    def racing(folder, seed, **knobs):
        real(root, seed=7, **knobs)  # another process finishes first, straight into root
        return real(folder, seed, **knobs)

    monkeypatch.setattr(synthps, "generate_synthps", racing)
    assert ensure_synthps(root, seed=1, **TINY) == root
    assert synthps_stats(root)["seed"] == 7
    assert os.listdir(tmp_path) == ["synthps"]


def test_ensure_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "synthps").mkdir()
    (tmp_path / "synthps" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="holds no annotation/Images.mat"):
        ensure_synthps(str(tmp_path / "synthps"), **TINY)


def test_cli_generates_then_reports(tmp_path, capsys):
    root = str(tmp_path / "synthps")
    args = ["--root", root, "--seed", "5", "--num-train-ids", "2", "--num-test-ids", "2",
            "--train-images", "6", "--test-images", "51", "--image-size", "80", "64",
            "--persons-per-image", "3", "3", "--gallery-sizes", "50"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "queries" in first and "already present" not in first
    assert main(args) == 0
    second = capsys.readouterr().out
    assert "already present" in second and "boxes" in second
    assert synthps_stats(root)["boxes"] == 3 * 57


def test_appearances_per_id_bounds_every_identity(tmp_path):
    root = str(tmp_path / "synthps")
    generate_synthps(root, seed=5, **{**TINY, "appearances_per_id": (3, 3)})
    train, test = load_cuhk_sysu(root, "train"), load_cuhk_sysu(root, "test")
    counts = Counter(a["person_id"] for d in train for a in d["annotations"] if a["person_id"] >= 0)
    assert sorted(counts.values()) == [3, 3, 3, 3]
    protocol = load_cuhk_sysu_protocol(root, 50)
    for query in protocol.queries:  # the query's own appearance + 2 positives in its gallery
        assert int((~np.isnan(protocol.gallery(query.index).gt_boxes[:, 0])).sum()) == 2
    with pytest.raises(ValueError, match="appearances_per_id"):
        generate_synthps(root, **{**TINY, "appearances_per_id": (1, 3)})


def test_ensure_warns_about_or_replaces_a_differently_generated_data_set(tmp_path, caplog):
    root = str(tmp_path / "synthps")
    ensure_synthps(root, seed=1, **TINY)
    assert synthps.knob_differences(root, seed=1, **TINY) == []
    assert synthps.knob_differences(root, seed=1, **{**TINY, "illumination": 0.5}) == [
        "illumination: 1.0 here, 0.5 asked"]
    with caplog.at_level("WARNING", logger=synthps.logger.name):
        ensure_synthps(root, seed=1, **{**TINY, "illumination": 0.5})
    assert "illumination: 1.0 here, 0.5 asked" in caplog.text
    assert synthps.knob_differences(root, seed=1, **TINY) == []  # kept as it was
    ensure_synthps(root, seed=2, replace_different=True, **{**TINY, "illumination": 0.5})
    assert synthps.knob_differences(root, seed=2, **{**TINY, "illumination": 0.5}) == []
    assert synthps_stats(root)["seed"] == 2


def test_data_sets_from_before_the_appearances_knob_count_as_two_to_six(tmp_path):
    import json

    root = str(tmp_path / "synthps")
    generate_synthps(root, seed=1, **{**TINY, "appearances_per_id": (2, 6)})
    path = os.path.join(root, synthps.META_FILE)
    with open(path) as f:
        meta = json.load(f)
    del meta["knobs"]["appearances_per_id"]
    with open(path, "w") as f:
        json.dump(meta, f)
    assert synthps.knob_differences(root, seed=1, **{**TINY, "appearances_per_id": (2, 6)}) == []
    assert synthps.knob_differences(root, seed=1, **{**TINY, "appearances_per_id": (4, 10)}) == [
        "appearances_per_id: [2, 6] here, [4, 10] asked"]
