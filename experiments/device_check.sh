#!/usr/bin/env bash
# The accelerator check: ONE script a session lent a GPU runs as it is (<= 8 min).
#
#   bash experiments/device_wheels.sh            # here: wheels the image lacks
#   device tool: run(command="bash experiments/device_check.sh", carry=[".whl"],
#                    timeout_s=560)
#   bash experiments/device_check.sh --dry-run   # on a CPU: small shapes, ~5 min
#
# Writes under $OUT (default experiments/out/device_check), at most 8 files:
#   env.json           devices, versions, nvidia-smi
#   step_float32.json  benchmark_step.py: tiny, LargeFOV, ResNet-101 steps/s
#   step_bfloat16.json the same in bfloat16 compute
#   vs_torch.json      benchmark_vs_torch.py with torch on the GPU, if it sees one
#   main_job.json      results.json of configs/supervised.py (the time unit)
#   crf.json           benchmark_crf.py --quick: the JAX DenseCRF on the device
#                      against pydensecrf and the host pool (same images)
#   sections.jsonl     one line per section: rc, seconds, or why it was skipped
#   log.txt            every section's output
# A section that fails or runs out of its time is recorded and the next runs.
set -u -o pipefail
DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: $0 [--dry-run]" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=${OUT:-$REPO/experiments/out/device_check}
mkdir -p "$OUT"
: > "$OUT/sections.jsonl"
: > "$OUT/log.txt"
export PYTHONUNBUFFERED=1
export WSSS_JAX_DATA_DIR=${WSSS_JAX_DATA_DIR:-$(mktemp -d)}
export WSSS_JAX_XLA_CACHE=            # cold compilation: what a first run pays
PYTHON=${PYTHON:-python3}

if (( ! DRY )) && [[ -d .whl ]] && ls .whl/* >/dev/null 2>&1; then
  # The lent machine has no network: install what its image lacks from the
  # carried wheels (and two source archives, built without isolation).  A dry
  # run uses the local environment as it is.
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --no-build-isolation --target /tmp/site .whl/* >> "$OUT/log.txt" 2>&1 \
    || echo '{"section": "wheels", "rc": 1}' >> "$OUT/sections.jsonl"
  export PYTHONPATH=/tmp/site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

section() {  # name limit_seconds command...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit ${limit} s): $*" >> "$OUT/log.txt"
  timeout "$limit" "$@" >> "$OUT/log.txt" 2>&1
  rc=$?
  printf '{"section": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' \
      "$name" "$rc" "$(( $(date +%s) - start ))" \
      "$([[ $rc == 124 ]] && echo true || echo false)" >> "$OUT/sections.jsonl"
}
skipped() {  # name reason
  printf '{"section": "%s", "skipped": "%s"}\n' "$1" "$2" >> "$OUT/sections.jsonl"
}

section env 60 $PYTHON - "$OUT/env.json" <<'EOF'
import json, platform, subprocess, sys
import jax
info = {'python': sys.version, 'platform': platform.platform(),
        'jax': jax.__version__, 'backend': jax.default_backend(),
        'devices': [str(d) for d in jax.devices()]}
try:
  info['nvidia_smi'] = subprocess.run(
      ['nvidia-smi', '--query-gpu=name,memory.total,driver_version',
       '--format=csv,noheader'], capture_output=True, text=True,
      timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as error:
  info['nvidia_smi'] = f'unavailable: {error}'
try:
  import torch
  info['torch'] = torch.__version__
  info['torch_cuda'] = torch.cuda.is_available()
except ImportError:
  info['torch'] = None
json.dump(info, open(sys.argv[1], 'w'), indent=2)
print(json.dumps(info))
EOF

if (( DRY )); then
  STEP_ARGS=(--models=tiny,largefov --crop=65 --steps=1)
  STEP_LIMIT=150
else
  STEP_ARGS=(--models=tiny,largefov,resnet101 --steps=20)
  STEP_LIMIT=110
fi
section step_float32 "$STEP_LIMIT" $PYTHON experiments/benchmark_step.py \
    "${STEP_ARGS[@]}" --dtype=float32 --out="$OUT/step_float32.json"
section step_bfloat16 "$STEP_LIMIT" $PYTHON experiments/benchmark_step.py \
    "${STEP_ARGS[@]}" --dtype=bfloat16 --out="$OUT/step_bfloat16.json"

if ! $PYTHON -c 'import torch' 2>/dev/null; then
  skipped vs_torch 'torch is not installed (the [torch] extra)'
elif (( DRY )); then
  section vs_torch 120 $PYTHON experiments/benchmark_vs_torch.py --smoke \
      --models=tiny --torch_device=cpu --out="$OUT/vs_torch.json"
elif $PYTHON -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' \
    2>/dev/null; then
  section vs_torch 100 $PYTHON experiments/benchmark_vs_torch.py \
      --models=tiny,largefov,resnet101 --steps=10 --torch_device=cuda \
      --out="$OUT/vs_torch.json"
else
  skipped vs_torch 'torch does not see a GPU'
fi

if (( DRY )); then CRF_ARGS=(--smoke); else CRF_ARGS=(--quick); fi
section jax_crf 150 $PYTHON experiments/benchmark_crf.py "${CRF_ARGS[@]}" \
    --out="$OUT/crf.json"

WORKDIR=$(mktemp -d)
if (( DRY )); then CONFIG=configs/supervised.py:tiny; else CONFIG=configs/supervised.py; fi
section main_job 170 $PYTHON -m wsss_jax.main --config="$CONFIG" --workdir="$WORKDIR"
[[ -f "$WORKDIR/results.json" ]] && cp "$WORKDIR/results.json" "$OUT/main_job.json"

cat "$OUT/sections.jsonl"
