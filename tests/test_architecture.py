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
