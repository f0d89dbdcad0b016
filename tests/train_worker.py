"""Runs ``projects/QEEPS/train_net.py`` (same arguments) with one extra hook, for the resume and
fault tests: every iteration's losses are appended to ``$QEEPS_TEST_LOSSES`` (one JSON line per
iteration, flushed), and with ``$QEEPS_TEST_KILL_AT=k`` the process SIGKILLs itself when
iteration ``k`` is about to start (no clean-up of any kind runs).

    python tests/train_worker.py --config-file C [--resume] [KEY VALUE ...]
"""
import json
import os
import runpy
import signal
import sys

from detectron2.engine import HookBase

from qeeps_d2.engine import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RecordLosses(HookBase):
    def __init__(self, path, kill_at):
        self.path, self.kill_at = path, kill_at

    def before_step(self):
        if self.trainer.iter == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self):
        latest = self.trainer.storage.latest()
        losses = {k: v for k, (v, it) in latest.items()
                  if it == self.trainer.iter and (k.startswith("loss") or k == "total_loss")}
        with open(self.path, "a") as f:
            f.write(json.dumps({"iter": self.trainer.iter, **losses}) + "\n")


def _build_hooks(build_hooks):
    def build(self):
        kill_at = int(os.environ.get("QEEPS_TEST_KILL_AT", "-1"))
        return build_hooks(self) + [RecordLosses(os.environ["QEEPS_TEST_LOSSES"], kill_at)]
    return build


if __name__ == "__main__":
    Trainer.build_hooks = _build_hooks(Trainer.build_hooks)
    sys.argv[0] = os.path.join(REPO, "projects", "QEEPS", "train_net.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
