#!/usr/bin/env bash
# Set up a virtual environment with everything the project needs, from scratch, on a CPU machine.
#   bash infra/setup.sh            # creates .venv in the repository root
#   VENV=/opt/enat bash infra/setup.sh
# On a GPU machine install the CUDA torch build you want first, then run this with TORCH_SPEC="".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"
# torch 2.13.0 resolves to a CPU build here; an unpinned torch pulls a multi-GB CUDA build.
TORCH_SPEC="${TORCH_SPEC-torch==2.13.0}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
if [ -n "$TORCH_SPEC" ]; then "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"; fi
"$VENV/bin/python" -m pip install -q -e ".[pipeline,demo,test]"
# DeepSpeed compiles its ops against the installed torch: no build isolation (g++ needed for CPU ops).
"$VENV/bin/python" -m pip install -q --no-build-isolation "deepspeed>=0.16,<0.20"
# On a CPU-only machine DeepSpeed's gloo path uses its shared-memory comm op, compiled on first use into
# ~/.cache/torch_extensions (a minute or more): build it now, not inside the first training job.
# With the venv's bin first on PATH: its ninja (DeepSpeed's dependency), which the tests use too; a system
# ninja of another version in the same build folder makes the next build with the other one start over.
PATH="$(cd "$VENV/bin" && pwd):$PATH" "$VENV/bin/python" - <<'PY'
import os, torch
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.comm.torch import build_shm_op
    build_shm_op()
PY
echo "environment ready: $VENV"
