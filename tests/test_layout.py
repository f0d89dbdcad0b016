"""The package's imports run one way (README Layout): engine -> evaluation -> data ->
config / utils; modeling imports only config and utils; nothing imports the apps (search, demo)
except the apps. Read from the source with ``ast`` (lazy imports inside functions included)."""
import ast
import os

from model_fixtures import REPO

PACKAGE = os.path.join(REPO, "qeeps_d2")
# a part may import the parts of a lower rank (and itself)
RANK = {"config": 0, "utils": 0, "checkpoint": 1, "modeling": 1, "data": 2, "evaluation": 3,
        "engine": 4, "export": 5, "search": 6, "viewer": 7, "demo": 8}
ALLOWED = {"modeling": {"config", "utils"}, "checkpoint": {"utils"}}


def _part(module: str) -> str:
    """``qeeps_d2.data.datasets.prw`` -> ``data``; the package's own ``__init__`` -> ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: str, module: str):
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield from ([target] if node.module else [f"{target}.{a.name}" for a in node.names])
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names)


def _edges():
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                module = rel[: -len(".__init__")] if rel.endswith(".__init__") else rel
                for target in _imports(path, module):
                    if target.startswith("qeeps_d2."):
                        yield module, target


def test_imports_run_one_way():
    wrong = []
    for module, target in _edges():
        src, dst = _part(module), _part(target)
        if src in ("", dst):  # the package's __init__ registers everything
            continue
        allowed = ALLOWED.get(src, {p for p, r in RANK.items() if r < RANK[src]})
        if dst not in allowed:
            wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_imports():
    """The walk finds the edges it judges (a check that reads nothing passes everything)."""
    edges = set(_edges())
    assert ("qeeps_d2.engine.trainer", "qeeps_d2.evaluation.build") in {
        (m, t.rsplit(".", 1)[0] if t.endswith("build_person_search_evaluator") else t)
        for m, t in edges}
    assert any(m.startswith("qeeps_d2.modeling.") and t.startswith("qeeps_d2.config")
               for m, t in edges)
