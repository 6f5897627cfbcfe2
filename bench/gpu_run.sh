#!/usr/bin/env bash
# One device call (10 min): install, the GPU tests of what changed since the last GPU run first,
# then the rest, then our rows of the bench. Run from the repo root with .whl (fla wheels) carried;
# logs under $OUT, a short summary on stdout. PHASE=tests|bench|all (default all).
set -o pipefail
OUT=${OUT:-/tmp/tilemix-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
# OMP_NUM_THREADS: each xdist worker's torch would start a thread per core, and 8 workers x 16
# threads on 16 cores slowed the tests several-fold (bench/NOTES.md, "Benchmark method")
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 TILEMIX_CACHE=${TILEMIX_CACHE:-/tmp/tmcache} OMP_NUM_THREADS=2
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
summary() { grep -a -oE "(PASSED|FAILED|ERROR|XFAIL|SKIPPED) tests/[a-z_]+\.py" "$1" | sort | uniq -c; grep -a -E "^(FAILED|ERROR)" "$1" | head -20; }
if [ "${PHASE:-all}" != bench ]; then
  # xdist is on the image; -v so a run cut by its timeout still says what passed
  timeout "${FIRST_TIMEOUT:-200}" python3 -m pytest -m gpu -n 8 -v -p no:cacheprovider -rfE \
    tests/test_ssd_backward.py tests/test_layers.py tests/test_torch_ops.py tests/test_cli.py \
    tests/test_user_mixers.py "tests/test_hopper.py::test_gpu_unaligned_and_strided_inputs" \
    "tests/test_generic.py::test_gpu_absorbed_matmul_matches_interpreter" tests/test_readme.py \
    >"$OUT/pytest-first.log" 2>&1
  echo "first tests rc=$?"; summary "$OUT/pytest-first.log"
  timeout "${REST_TIMEOUT:-240}" python3 -m pytest -m gpu -n 8 -v -p no:cacheprovider -rfE tests \
    --deselect tests/test_ssd_backward.py --deselect tests/test_layers.py --deselect tests/test_torch_ops.py \
    --deselect tests/test_cli.py --deselect tests/test_user_mixers.py --deselect tests/test_readme.py \
    >"$OUT/pytest-rest.log" 2>&1
  echo "other tests rc=$?"; summary "$OUT/pytest-rest.log"
fi
if [ "${PHASE:-all}" != tests ]; then
  timeout "${BENCH_TIMEOUT:-120}" tilemix bench ssd ssd-bwd linear_attention linear_attention-bwd --no-peers \
    --json "$OUT/bench.json" >"$OUT/bench.log" 2>&1
  echo "bench rc=$?"; grep -a " | " "$OUT/bench.log"
  # the SSD backward with two heads (its P blocks) per CTA forced, at one stage and at two with shared
  # staging (the default takes two heads per CTA only where B·H fills the GPU)
  heads="consumers=2,consumer_axis=heads"
  for variant in "stages=1" "stages=2,share_staging=true"; do
    TILEMIX_SCHEDULE="ssd_bwd_dc:$heads,$variant;ssd_bwd_dx:$heads,$variant" timeout 90 \
      tilemix bench ssd-bwd --no-peers >"$OUT/bench-heads.log" 2>&1
    echo "heads $variant rc=$?"; grep -a "^ssd-bwd | " "$OUT/bench-heads.log"
  done
fi
