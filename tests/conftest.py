"""Test-suite hygiene: each test leaves the logging configuration as it found it.

Code under test configures logging in-process (Detectron2's ``default_setup`` adds handlers to
the ``detectron2`` / ``fvcore`` loggers bound to the current, pytest-captured, stdout and turns
their propagation off; the demo and CLIs call ``logging.basicConfig``). Left in place, those
handlers write into closed capture streams of later tests ("--- Logging error ---" in their
stderr) and ``caplog`` stops seeing the records of non-propagating loggers, so results would
depend on test order.
"""
import logging

import pytest


def _snapshot():
    loggers = [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    return {lg: (list(lg.handlers), lg.propagate, lg.level, lg.disabled) for lg in loggers}


@pytest.fixture(autouse=True)
def _restore_logging():
    before = _snapshot()
    yield
    for logger in [logging.getLogger()] + [
        lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]:
        handlers, propagate, level, disabled = before.get(logger, ([], True, logging.NOTSET, False))
        logger.handlers[:] = handlers
        logger.propagate, logger.level, logger.disabled = propagate, level, disabled


@pytest.fixture(scope="module")
def cuhk_prw_root(tmp_path_factory):
    """A ``$DETECTRON2_DATASETS`` folder with the small CUHK-SYSU and PRW fixtures (official
    layouts, tests/dataset_fixtures.py), built once per test module."""
    import dataset_fixtures

    root = tmp_path_factory.mktemp("datasets")
    dataset_fixtures.make_cuhk_sysu_fixture(str(root / "CUHK-SYSU"))
    dataset_fixtures.make_prw_fixture(str(root / "PRW"))
    return root


@pytest.fixture
def cuhk_prw_env(cuhk_prw_root, monkeypatch):
    """``$DETECTRON2_DATASETS`` pointing at :func:`cuhk_prw_root` for one test."""
    monkeypatch.setenv("DETECTRON2_DATASETS", str(cuhk_prw_root))
    return cuhk_prw_root
