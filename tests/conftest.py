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
