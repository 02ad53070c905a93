#!/usr/bin/env bash
# One prepared run for a lent GPU machine (one GPU, Python with torch, no Ray / DeepSpeed / MLflow, no
# network), within 8 minutes: the `gpu` tests, then the speed benchmarks, each stage under a hard timeout.
# Writes $OUT/gpu_figures.md (or runs/gpu_figures.md): a markdown block to paste into docs/benchmarks.md.
#
#     bash benchmarks/gpu_wheels.sh          # here, with network: the wheels to carry (benchmarks/.wheels)
#     bash benchmarks/gpu_check.sh           # there: installs the carried wheels, runs every stage
#     bash benchmarks/gpu_check.sh --smoke   # on the CPU with tiny sizes (CI dry-runs this script)
#     bash benchmarks/gpu_check.sh --official DIR   # a LeapLabTHU/ENAT checkout (default: .official if present)
#
# A stage that fails or times out is recorded as such and the next one runs; the exit status is 1 if any
# stage failed. Which path ran (DeepSpeed carried or not, official code present or not) is written down.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=0
OFFICIAL=""
[[ -d "$ROOT/.official/libs" ]] && OFFICIAL="$ROOT/.official"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --smoke) SMOKE=1; shift ;;
    --official) OFFICIAL="$(cd "$2" && pwd)"; shift 2 ;;
    -h|--help) sed -n '2,13p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
DEST="${OUT:-$ROOT/runs}"          # runs/ is git-ignored
mkdir -p "$DEST"
FIG="$DEST/gpu_figures.md"
LOGS="$(mktemp -d /tmp/enat-gpu-check.XXXXXX)"
PY="${PYTHON:-python3}"
[[ -x "$ROOT/.venv/bin/python" && -z "${PYTHON:-}" ]] && PY="$ROOT/.venv/bin/python"
export PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
FAILED=0
T_START=$(date +%s)

# --- wheels: install what was carried (never from an index: the GPU machine has no network) ---------------
WHEELS="$ROOT/benchmarks/.wheels"
if [[ $SMOKE == 0 ]] && compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/enat-site "$WHEELS"/*.whl \
    > "$LOGS/pip.log" 2>&1 || echo "gpu_check.sh: installing the carried wheels failed (see below)"
  tail -3 "$LOGS/pip.log"
  export PYTHONPATH="$PYTHONPATH:/tmp/enat-site"     # only packages the image lacks are carried: none shadows torch
fi

importable() { "$PY" -c "import $1" > /dev/null 2>&1; }
HAVE=""
for m in torch deepspeed mlflow webdataset ray pyarrow fsspec yaml; do
  if importable "$m"; then HAVE+="$m ok; "; else HAVE+="$m MISSING; "; fi
done
if [[ $SMOKE == 1 ]]; then
  DEVICE=cpu
else
  DEVICE=$("$PY" -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
fi
DEVICE_NAME=$("$PY" -c "
import torch, platform
print(torch.cuda.get_device_name(0) + ', CUDA ' + str(torch.version.cuda) if '$DEVICE' == 'cuda'
      else platform.processor() or platform.machine())")
TORCH=$("$PY" -c "import torch; print(torch.__version__)")
DS_ARGS=()
DS_NOTE="DeepSpeed importable: the training benchmark includes the engine (ZeRO-1)"
if ! importable deepspeed; then
  DS_ARGS=(--no-deepspeed)
  DS_NOTE="DeepSpeed NOT importable (carry benchmarks/.wheels): the training benchmark ran without the engine"
fi
OFF_ARGS=()
OFF_NOTE="no official checkout (pass --official DIR or carry .official): ours only, no ratios"
if [[ -n "$OFFICIAL" ]]; then
  OFF_ARGS=(--official "$OFFICIAL")
  rev="a copy without git history"
  [[ -e "$OFFICIAL/.git" ]] && rev="commit $(git -C "$OFFICIAL" rev-parse --short HEAD)"
  OFF_NOTE="official code from $OFFICIAL ($rev)"
fi

{
  echo "### GPU figures: $DEVICE_NAME ($(date -u +%Y-%m-%d))"
  echo
  echo "Measured with \`bash benchmarks/gpu_check.sh$([[ $SMOKE == 1 ]] && echo ' --smoke')\` on $(date -u '+%Y-%m-%d %H:%M UTC'):"
  echo "device $DEVICE ($DEVICE_NAME), torch $TORCH, Python $("$PY" -c 'import platform; print(platform.python_version())'), $(nproc) CPUs."
  [[ $SMOKE == 1 ]] && echo "**Smoke run on the CPU with tiny sizes: these figures mean nothing; it checks the script.**"
  echo
  echo "- imports: $HAVE"
  echo "- $DS_NOTE"
  echo "- $OFF_NOTE"
  echo "- ratios are ours / official, side by side in one process on the same inputs and random weights"
} > "$FIG"

# stage NAME TIMEOUT_S CMD...: run under a hard timeout, append its figures (stdout) to the markdown
stage() {
  local name="$1" limit="$2"; shift 2
  local log="$LOGS/${name// /_}.log" t0 rc status
  # on a CPU (--smoke) a limit only guards against a hang: a slow or busy machine is not a failure
  [[ $SMOKE == 1 ]] && limit=1200
  echo "== $name (timeout ${limit}s): $*"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMED OUT after ${limit} s"; FAILED=1 ;;
    *) status="FAILED (exit $rc)"; FAILED=1 ;;
  esac
  echo "   -> $status in $(( $(date +%s) - t0 )) s"
  {
    echo
    echo "#### $name: $status, $(( $(date +%s) - t0 )) s"
    echo
    echo '```'
    echo "\$ ${*#"$PY" }"
    # figures only: drop DeepSpeed / torch log noise, keep the last lines (tests: the summary)
    grep -v -E '^\[(20|rank)|Warning|warn\(|^ +warnings\.|^\s*$' "$log" | tail -n 40
    echo '```'
  } >> "$FIG"
  [[ $rc == 0 ]] || tail -n 30 "$log"
}

if [[ $SMOKE == 1 ]]; then
  # ENAT_TEST_DEVICE=cpu: the suite's conftest runs the `gpu` tests on the CPU instead of skipping them
  ENAT_TEST_DEVICE=cpu stage "gpu tests" 120 "$PY" -m pytest -q -o addopts= -p no:cacheprovider -m gpu \
    tests/test_gpu.py -k vqgan
  stage "sampling vs official" 60 "$PY" benchmarks/vs_official.py --tiny "${OFF_ARGS[@]}"
  stage "VQGAN" 60 "$PY" benchmarks/vqgan_speed.py --tiny --repeats 1 "${OFF_ARGS[@]}"
  stage "FID Inception" 60 "$PY" benchmarks/fid_speed.py --batch 1 --iters 1 --res 64 --n 1000 --dim 64
  # the job's DeepSpeed engine too: tests/test_benchmarks.py runs this smoke as the benchmarks' check
  stage "training step" 60 "$PY" benchmarks/train_throughput.py --tiny --repeat 1 "${OFF_ARGS[@]}"
  stage "sample job rates + FID-50K time model" 90 bash -c "'$PY' benchmarks/sample_throughput.py --tiny \
    --json '$DEST/rates.json' && '$PY' benchmarks/fid50k_time.py '$DEST/rates.json' --official-h100 --workers 1 8"
else
  # budget (8 min in all): 150 + 100 + 40 + 50 + 90 + 75 = 505 s at most, plus installs and start-up
  stage "gpu tests" 150 "$PY" -m pytest -q -o addopts= -p no:cacheprovider -m gpu tests/test_gpu.py
  stage "sampling vs official" 100 "$PY" benchmarks/vs_official.py --device "$DEVICE" --preset enat-l \
    --batch 250 --repeat 3 "${OFF_ARGS[@]}"
  stage "VQGAN" 40 "$PY" benchmarks/vqgan_speed.py --device "$DEVICE" --batch 125 --repeats 3 \
    --decode-dtype bfloat16 "${OFF_ARGS[@]}"
  stage "FID Inception" 50 "$PY" benchmarks/fid_speed.py --device "$DEVICE" --batch 250 --iters 5
  stage "training step" 90 "$PY" benchmarks/train_throughput.py --device "$DEVICE" --preset enat-l --batch 128 \
    --repeat 5 --precision bf16 "${DS_ARGS[@]}" "${OFF_ARGS[@]}"
  # one worker's per-stage rates through the job's unit runner, then the FID-50K time model on them
  stage "sample job rates + FID-50K time model" 75 bash -c "'$PY' benchmarks/sample_throughput.py --device '$DEVICE' \
    --preset enat-l --batch 125 --samples 250 --precision bf16 --decode-precision bf16 --inception-precision bf16 \
    --json '$DEST/rates-gpu.json' && '$PY' benchmarks/fid50k_time.py '$DEST/rates-gpu.json' --official-h100"
fi

echo >> "$FIG"
echo "Total $(( $(date +%s) - T_START )) s; every stage's full log was in $LOGS on the machine that ran it." >> "$FIG"
echo "figures: $FIG"
exit $FAILED
