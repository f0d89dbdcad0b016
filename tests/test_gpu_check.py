"""benchmarks/gpu_check.sh (the one-shot GPU check) is valid bash, names existing configs, and every
config key it overrides exists in them (a renamed key would only fail on the GPU machine)."""
import os
import re
import subprocess

from qeeps_d2.engine import setup_cfg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.sh")


def _script() -> str:
    with open(SCRIPT) as f:
        return f.read()


def _code(text: str) -> str:
    """The script without its comments."""
    return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def test_gpu_check_is_valid_bash():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_gpu_check_configs_and_override_keys_exist():
    code = _code(_script())
    configs = sorted(set(re.findall(r"configs/[\w\-/]+\.yaml", code)))
    assert configs == ["configs/CUHK-SYSU/oim_R_50_C4.yaml", "configs/CUHK-SYSU/qeeps_R_50_C4.yaml"]
    keys = sorted(set(re.findall(r"\b(?:DATASETS|MODEL|SOLVER|INPUT|TEST|DATALOADER)(?:\.\w+)+",
                                 code)))
    assert "MODEL.QEEPS.OIM.NUM_PIDS" in keys and "TEST.PERSON_SEARCH.CASCADE_TOPK" in keys
    for config in configs:
        cfg = setup_cfg(os.path.join(REPO, config), resolve_schedule=False)
        for key in keys:
            node = cfg
            for part in key.split("."):
                assert part in node, f"{config}: no key {key}"
                node = node[part]

