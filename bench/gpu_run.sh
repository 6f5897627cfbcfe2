#!/usr/bin/env bash
# One device call: install, GPU tests, benchmark. Run from the repo root on the H100 with
# .whl (fla wheels) carried; logs under $OUT.
set -o pipefail
OUT=${OUT:-/tmp/tilemix-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, cupy, cuda.bindings; print('torch', torch.__version__, 'cupy', cupy.__version__)"
export PYTHONUNBUFFERED=1
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest tests -m gpu -x -q -p no:cacheprovider ${PYTEST_ARGS:-} 2>&1 \
  | tee "$OUT/pytest.log" | tail -40 || { echo "GPU tests failed: no benchmark"; exit 1; }
timeout "${BENCH_TIMEOUT:-240}" tilemix bench --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
