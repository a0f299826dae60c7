#!/bin/bash
# The quality study on one GPU: SHARDS study processes in parallel (each run's compile is
# CPU-bound; the small models leave the GPU mostly idle), then the report.
# Usage: bash benchmarks/quality/gpu_study.sh OUT SECONDS_PER_SHARD [python -m ldm_jax.study args]
# Finished runs are kept when a shard hits its time limit; rerunning resumes.
set -u
out=$1; limit=$2; shift 2
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
n=${SHARDS:-8}
mkdir -p "$out"
for i in $(seq 0 $((n - 1))); do
  timeout "$limit" "$py" -m ldm_jax.study --out "$out" --shard "$i/$n" "$@" \
    > "$out/shard$i.log" 2>&1 &
done
wait
"$py" -m ldm_jax.study --out "$out" --report "$@"
