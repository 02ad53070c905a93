"""The import boundary of `enat/`: pure PyTorch, nothing of the distributed stack."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ["ray", "deepspeed", "mlflow", "fsspec", "s3fs", "webdataset", "pyarrow", "boto3", "torchvision"]


def test_import_enat_with_distributed_stack_blocked():
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] in {BLOCKED!r}:
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        import enat, enat.model, enat.sampler, enat.objective, enat.checkpoint
        import pkgutil, importlib
        for m in pkgutil.iter_modules(enat.__path__):
            importlib.import_module("enat." + m.name)
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"


def test_no_forbidden_imports_in_source():
    for path in (ROOT / "enat").rglob("*.py"):
        text = path.read_text()
        for name in BLOCKED:
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path}: imports {name}"


# ---------------------------------------------------------------------------------------------------
# The layers: jobs -> pipeline job packages -> pipeline shared modules -> enat; files stay readable

import ast  # noqa: E402

JOB_PACKAGES = {"tokenize", "train", "sample"}
MAX_LINES = 450


def _imports(path: Path) -> set[str]:
    """Absolute module names a file imports (relative imports resolved against its package)."""
    rel = path.relative_to(ROOT).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def _layer(module: str) -> tuple[str, str]:
    """(layer, package) of one of our modules: ("jobs"|"job"|"shared"|"enat", name)."""
    parts = module.split(".")
    if parts[0] == "pipeline" and len(parts) > 1 and parts[1] in JOB_PACKAGES:
        return "job", parts[1]
    return {"jobs": "jobs", "pipeline": "shared", "enat": "enat"}.get(parts[0], "other"), parts[0]


RANK = {"enat": 0, "shared": 1, "job": 2, "jobs": 3}


def test_imports_point_down():
    """jobs → pipeline job packages → pipeline shared modules → enat; job packages never import each other."""
    wrong = []
    for top in ("enat", "pipeline", "jobs"):
        for path in (ROOT / top).rglob("*.py"):
            me = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            my_layer, my_pkg = _layer(me)
            for name in _imports(path):
                layer, pkg = _layer(name)
                if layer == "other":
                    continue
                if RANK[layer] > RANK[my_layer] or (layer == my_layer == "job" and pkg != my_pkg):
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "imports pointing up or across:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_sees_a_wrong_import(tmp_path):
    """The check above can fail: a shared module importing a job package is caught."""
    assert _layer("pipeline.sample.job") == ("job", "sample") and _layer("pipeline.storage") == ("shared", "pipeline")
    assert RANK[_layer("pipeline.train.loop")[0]] > RANK[_layer("pipeline.models")[0]]


def test_no_module_over_450_lines():
    long = {str(p.relative_to(ROOT)): n for top in ("enat", "pipeline") for p in (ROOT / top).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_only_tracking_imports_mlflow():
    users = [str(p.relative_to(ROOT)) for p in (ROOT / "pipeline").rglob("*.py")
             if any(n.split(".")[0] == "mlflow" for n in _imports(p))]
    assert users == ["pipeline/tracking.py"], users
