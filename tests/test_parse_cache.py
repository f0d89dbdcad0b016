"""The parse cache never unpickles: planted, garbage and wrong-typed entries are misses that are
warned about once and rebuilt; entries round-trip exactly and follow their sources (#16 item 4)."""
import logging
import os
import pickle

import numpy as np
import pytest
import scipy.io

import dataset_fixtures
from qeeps_d2.data.datasets import cuhk_sysu, parse_cache, prw
from qeeps_d2.data.datasets.parse_cache import STRINGS, Array, ArrayList, cached, file_fingerprint

LOGGER = "qeeps_d2.data.datasets.parse_cache"
WARNING = "Ignoring bad cache entry"


@pytest.fixture
def cuhk_root(tmp_path):
    return dataset_fixtures.make_cuhk_sysu_fixture(str(tmp_path / "CUHK-SYSU"))["root"]


def _parses(root):
    """Every cached CUHK-SYSU parse (the .mat files and the test image sizes)."""
    parsed = {"images": cuhk_sysu._read_images(root), "pool": cuhk_sysu.read_test_pool(root),
              "train": cuhk_sysu._read_train(root), "testg50": cuhk_sysu._read_testg(root, 50),
              "testg100": cuhk_sysu._read_testg(root, 100)}
    parsed["test"] = [(d["file_name"], d["height"], d["width"],
                       [(a["bbox"], a["person_id"]) for a in d["annotations"]])
                      for d in cuhk_sysu.load_cuhk_sysu(root, "test")]
    return parsed


def _uncached(root, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv("QEEPS_D2_NO_CACHE", "1")
        return _parses(root)


def _assert_same(got, expected):
    """Equal values of equal types, dtypes and shapes, recursively."""
    assert type(got) is type(expected)
    if isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and got.shape == expected.shape
        np.testing.assert_array_equal(got, expected)
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            _assert_same(g, e)
    elif isinstance(expected, dict):
        assert list(got) == list(expected)
        for k in expected:
            _assert_same(got[k], expected[k])
    else:
        assert got == expected


def _entries(folder):
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith("."))


class _RunsCode:
    """Unpickling this creates the folder ``marker``: proof that the pickle's code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.mark.parametrize("where", ["root", "user"])
def test_planted_pickle_never_runs(cuhk_root, tmp_path, monkeypatch, caplog, where):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user"))
    if where == "user":  # the root's cache folder cannot exist: the per-user one is used
        open(os.path.join(cuhk_root, ".cache"), "w").close()
    folder = (os.path.join(cuhk_root, ".cache", "qeeps_d2") if where == "root"
              else str(tmp_path / "user" / "qeeps_d2"))
    expected = _uncached(cuhk_root, monkeypatch)
    _parses(cuhk_root)
    marker = str(tmp_path / "code-ran")
    entries = _entries(folder)
    assert len(entries) == 6  # Images, pool, Train, TestG50, TestG100, test image sizes
    for path in entries:
        with open(path, "wb") as f:
            pickle.dump(_RunsCode(marker), f)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = _parses(cuhk_root)
    assert not os.path.exists(marker)
    _assert_same(got, expected)
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == len(entries)
    assert all("\n" not in w and "not an .npz archive" in w for w in warnings)
    assert sorted(w.split()[4] for w in warnings) == entries  # each names its file
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):  # the entries were rewritten
        _assert_same(_parses(cuhk_root), expected)
    assert WARNING not in caplog.text and not os.path.exists(marker)


def test_old_pickle_entries_are_not_read_and_are_pruned(cuhk_root, tmp_path, monkeypatch):
    folder = os.path.join(cuhk_root, ".cache", "qeeps_d2")
    os.makedirs(folder)
    old = os.path.join(folder, "cuhk_pool-" + "0" * 40 + ".pkl")
    marker = str(tmp_path / "code-ran")
    with open(old, "wb") as f:
        pickle.dump(_RunsCode(marker), f)
    _parses(cuhk_root)
    assert not os.path.exists(marker) and not os.path.exists(old)
    assert all(name.endswith(".npz") for name in os.listdir(folder))


def _wrong_types(path):
    """The entry at ``path`` with its key and layout kept but every value array replaced by a
    float vector (wrong dtype for names and ids, wrong shape for boxes)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: (npz[k] if k.startswith("__") else np.zeros(3)) for k in npz.files}
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _garbage(path):
    with open(path, "wb") as f:
        f.write(b"PK\x03\x04 garbage that is no zip archive")


def _object_array(path):
    with open(path, "wb") as f:
        np.savez(f, __key__=np.array("k"), value=np.array([{"a": 1}], dtype=object))


def _swapped(path):
    """Right format and layout, but stored for another key (e.g. copied from another name)."""
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["__key__"] = np.array("0" * 40)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage, reason", [
    (_wrong_types, "expected a"),
    (_garbage, "BadZipFile"),
    (_object_array, "allow_pickle=False"),
    (_swapped, "written for another key"),
])
def test_bad_entries_are_warned_about_and_rebuilt(cuhk_root, monkeypatch, caplog, damage,
                                                 reason):
    expected = _uncached(cuhk_root, monkeypatch)
    _parses(cuhk_root)
    entries = _entries(os.path.join(cuhk_root, ".cache", "qeeps_d2"))
    for path in entries:
        damage(path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _assert_same(_parses(cuhk_root), expected)
    warnings = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(warnings) == len(entries) and all("\n" not in w for w in warnings)
    assert any(reason in w for w in warnings), warnings
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        _assert_same(_parses(cuhk_root), expected)
    assert WARNING not in caplog.text


def test_round_trip_equals_the_uncached_parse(cuhk_root, tmp_path, monkeypatch):
    expected = _uncached(cuhk_root, monkeypatch)
    _assert_same(_parses(cuhk_root), expected)  # computed and stored

    def no_loadmat(*args, **kwargs):
        raise AssertionError("loadmat called although the cache is valid")

    monkeypatch.setattr(scipy.io, "loadmat", no_loadmat)
    _assert_same(_parses(cuhk_root), expected)  # read back
    monkeypatch.undo()

    prw_root = dataset_fixtures.make_prw_fixture(str(tmp_path / "PRW"))["root"]
    monkeypatch.setenv("QEEPS_D2_NO_CACHE", "1")
    prw_expected = prw._read_annotations(prw_root, "test")
    monkeypatch.delenv("QEEPS_D2_NO_CACHE")
    _assert_same(prw._read_annotations(prw_root, "test"), prw_expected)
    monkeypatch.setattr(prw, "_read_annotation", no_loadmat)  # the frame list is not cached
    _assert_same(prw._read_annotations(prw_root, "test"), prw_expected)


@pytest.mark.parametrize("spec, value", [
    ((STRINGS, Array("int64", (None,)), Array("float64", (None, 4))),
     (["s1.jpg", "s22.jpg"], np.array([1, 2]), np.arange(8.0).reshape(2, 4))),
    ({"names": STRINGS, "empty": STRINGS, "ids": Array("int32", (None,))},
     {"names": ["ä.jpg"], "empty": [], "ids": np.zeros(0, np.int32)}),
    (ArrayList(Array("float64", (None, 5))), [np.ones((2, 5)), np.zeros((0, 5)), np.ones((1, 5))]),
    (ArrayList(Array("float64", (None, 5))), []),
    (None, np.array([[80, 100], [90, 120]])),  # no spec: the layout stored in the entry is used
    (None, ([np.ones((1, 5))], {"a": ["x"]})),
])
def test_round_trip_of_each_layout(tmp_path, spec, value):
    calls = []

    def compute():
        calls.append(1)
        return value

    for _ in range(2):
        _assert_same(cached(str(tmp_path), "t", "fp", compute, spec), value)
    assert len(calls) == 1


def test_value_not_matching_its_spec_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"value/1: expected a float64 array of shape \(None, 4\)"):
        cached(str(tmp_path), "t", "fp", lambda: (["a"], np.zeros(4)),
               (STRINGS, Array("float64", (None, 4))))


def test_changed_size_or_mtime_invalidates(tmp_path):
    source = tmp_path / "source.txt"
    source.write_text("abc")
    calls = []

    def load():
        def compute():
            calls.append(1)
            return [source.read_text()]

        return cached(str(tmp_path), "t", file_fingerprint([str(source)]), compute, STRINGS)

    assert load() == ["abc"] and load() == ["abc"] and len(calls) == 1
    st = os.stat(source)
    source.write_text("xyz")  # same size: only the mtime tells
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert load() == ["xyz"] and len(calls) == 2
    st = os.stat(source)
    source.write_text("xyzw")  # same mtime: only the size tells
    os.utime(source, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load() == ["xyzw"] and len(calls) == 3
    assert load() == ["xyzw"] and len(calls) == 3
    # the stale entries were replaced, not piled up
    assert [n.startswith("t-") for n in os.listdir(tmp_path / ".cache" / "qeeps_d2")] == [True]
