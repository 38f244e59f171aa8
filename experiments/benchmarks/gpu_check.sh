#!/usr/bin/env bash
# One call on a lent GPU machine: the Pallas kernels' tests compiled by Triton for the GPU (on the
# CPU they run interpreted), then the kernel benchmarks, each case in its own process and time limit
# so that one failure leaves the others' numbers. Everything lands in $OUT (env.txt, tests.log,
# bench.log, one kernels_<case>.json per case).
#
#   OUT=/tmp/gpu bash experiments/benchmarks/gpu_check.sh [TEST_SECONDS] [CASES] [BENCH_SECONDS] [REPEATS]
#
# Runs with the machine's own python3 and packages (no install): the repository is on PYTHONPATH.
set -u
OUT=${OUT:-/tmp/gpu_check}
TEST_SECONDS=${1:-150}
CASES=${2:-ffn,gmm,ssd,e2e}
BENCH_SECONDS=${3:-90}
REPEATS=${4:-10}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# several test workers and the benchmark share one GPU: none may take most of its memory up front
export XLA_PYTHON_CLIENT_PREALLOCATE=false

{
  date -u +%FT%TZ
  nvidia-smi -L
  python3 -c "import jax, flax, optax, orbax.checkpoint, triton; print('jax', jax.__version__, 'flax', flax.__version__, 'triton', triton.__version__, jax.devices())"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$TEST_SECONDS" -gt 0 ]; then
  # -v: each outcome is logged as it lands, so a run cut by its time limit still names what passed.
  # the tests hold XLA's fp32 matmuls to fp32 tolerances: no TF32 there (the benchmarks keep the default)
  JAX_DEFAULT_MATMUL_PRECISION=highest timeout "$TEST_SECONDS" python3 -m pytest -v -p no:cacheprovider -p no:benchmark -o addopts="" -n 4 --dist loadfile \
    tests/ops/test_ssd_pallas.py tests/ops/test_moe_gmm_pallas.py tests/ops/test_ffn_pallas.py \
    "tests/nn/test_model.py::test_kernels_switched_on_everywhere_match_the_xla_model" >"$OUT/tests.log" 2>&1
  echo "kernel tests: exit $?"
  tail -n 25 "$OUT/tests.log"
fi

for case in ${CASES//,/ }; do
  timeout "$BENCH_SECONDS" python3 experiments/benchmarks/kernels.py --only "$case" --repeats "$REPEATS" \
    --out "$OUT/kernels_$case.json" >"$OUT/bench_$case.log" 2>&1
  echo "bench $case: exit $?" | tee -a "$OUT/bench.log"
  cat "$OUT/bench_$case.log" >>"$OUT/bench.log" && rm "$OUT/bench_$case.log"
  tail -n 12 "$OUT/bench.log"
done
