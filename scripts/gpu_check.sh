#!/usr/bin/env bash
# What a lent GPU machine runs, in priority order, each step capped so later ones still run:
# the extension build, the CUDA-marked tests, `lohan hw` on the GPU, `lohan demo` on the GPU,
# bench/e2e.py on the GPU. Logs go to $OUT (default /tmp/lohan_gpu).
#     bash scripts/gpu_check.sh    # T_TESTS=... T_DEMO=... T_E2E=... change the caps; SKIP="hw demo" skips steps
set -u
OUT=${OUT:-/tmp/lohan_gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16}
PY=${PY:-python3}
step() { local name=$1 cap=$2; shift 2; case " ${SKIP:-} " in *" $name "*) echo "=== $name skipped"; return;; esac; echo "=== $name (cap ${cap}s) $(date +%T)"; local t0=$SECONDS
  timeout "$cap" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  tail -n "${TAIL:-40}" "$OUT/$name.log"; echo "=== $name rc=$rc in $((SECONDS - t0))s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
$PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1 || { echo "editable install failed:"; tail -5 "$OUT/install.log"; }
step build 240 $PY -c "from lohan_compile import ext; ext.load(); print('extension loaded')"
step pin 60 $PY -c "
import torch
from lohan_compile.runtime.hosttier import HostTier
t = HostTier('256MiB', arena_bytes='64MiB', pin=True)
h = t.empty((1024, 1024))
print('tier.pinned', t.pinned, 'is_pinned()', h.is_pinned(), 'torch cuda initialised', torch.cuda.is_initialized())
t.close()"
step cuda_tests "${T_TESTS:-200}" $PY -m pytest -q -m cuda -p no:cacheprovider -p no:logging -s -rfEs tests/
step hw "${T_HW:-60}" $PY -m lohan_compile.cli hw --device cuda
step demo "${T_DEMO:-150}" $PY -m lohan_compile.cli demo --steps 20
step e2e "${T_E2E:-240}" $PY bench/e2e.py --device cuda --hidden 1024 --layers 4 --batch 8 --seq 1024 \
    --vocab 8192 --budget 0.7 --rounds 3 --steps 2 --json "$OUT/e2e_cuda.json"
