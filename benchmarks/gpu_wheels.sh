#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu_check.sh installs on a GPU machine that has Python 3.12 and torch
# but no DeepSpeed, MLflow or webdataset, and no network. Run it here (with network), then carry the folder:
#
#     bash benchmarks/gpu_wheels.sh                 # -> benchmarks/.wheels/*.whl, prints the total size
#     bash benchmarks/gpu_wheels.sh --python 3.12   # the target's Python (default 3.12)
#
# Only what the GPU script imports, with the versions of this checkout's .venv (the ones the test suite
# runs): DeepSpeed (built here as a pure-Python wheel: DS_BUILD_OPS=0, its ops are never compiled — the
# GPU path uses torch's own AdamW, no fused/JIT op), the MLflow client (mlflow-skinny + the sqlite store)
# and webdataset, each with the dependencies that machine's image lacks (see the device notes' package
# list). Not Ray: the GPU script runs training through the torchrun launcher and the sample job's unit
# runner directly. The folder ignores itself (a .gitignore holding "*"), so nothing here is committed.
# CI never runs this script (it needs a package index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/benchmarks/.wheels"
PYV=3.12
LIMIT_MIB=60          # the device tool carries 64 MiB in all (working tree included)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYV="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu_wheels.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || { echo "gpu_wheels.sh: $PY missing; run infra/setup.sh first" >&2; exit 1; }

# name (as pip knows it) of every wheel to carry; versions are taken from .venv
PACKAGES=(
  deepspeed hjson pydantic pydantic-core annotated-types typing-inspection          # DeepSpeed
  webdataset braceexpand                                                            # token shards reader
  mlflow-skinny sqlalchemy alembic mako greenlet sqlparse python-dotenv             # MLflow client + sqlite
  opentelemetry-api opentelemetry-sdk opentelemetry-proto opentelemetry-semantic-conventions
  importlib-metadata gitpython gitdb smmap databricks-sdk google-auth pyasn1 pyasn1-modules rsa
  fastapi starlette uvicorn
)

mkdir -p "$OUT"
printf '*\n' > "$OUT/.gitignore"
rm -f "$OUT"/*.whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_34_x86_64
      --platform manylinux_2_24_x86_64 --platform manylinux_2_5_x86_64)

version_of() { "$PY" -m pip show "$1" 2>/dev/null | sed -n "s/^Version: //p" || true; }

for name in "${PACKAGES[@]}"; do
  v="$(version_of "$name")"
  spec="$name${v:+==$v}"
  if [[ "$name" == deepspeed ]]; then
    # DeepSpeed publishes an sdist only: build a pure-Python wheel with this venv's torch, no ops
    DS_BUILD_OPS=0 DS_BUILD_AIO=0 DS_BUILD_GDS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation \
      -w "$OUT" "$spec"
  else
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
      "${plat[@]}" -d "$OUT" "$spec"
  fi
done

total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
ls -l "$OUT"/*.whl | awk '{printf "%10d  %s\n", $5, $NF}'
mib=$(( (total + 1048575) / 1048576 ))
echo "total: $total bytes (~${mib} MiB) in $(ls "$OUT"/*.whl | wc -l) wheels at $OUT"
if (( mib > LIMIT_MIB )); then
  echo "gpu_wheels.sh: ${mib} MiB exceeds the ${LIMIT_MIB} MiB that can be carried with the working tree" >&2
  exit 1
fi
echo "carry it: run(command='bash benchmarks/gpu_check.sh', carry=['benchmarks/.wheels', '.official'])"
