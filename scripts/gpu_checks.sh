#!/usr/bin/env bash
# Device checks for a lent GPU machine (see README "Benchmarks"): the CUDA speed benchmark, the CUDA tests, a profile,
# the dispatched-operation counts.
#   bash scripts/gpu_checks.sh OUTDIR [D H W]
# Expects nnunetv2 and its dependencies importable (on this workplace's GPU machine: wheels carried in .whl/,
# installed to /tmp/site when present). Writes OUTDIR/speed/speed_cuda.{json,md}, OUTDIR/gpu_tests.log,
# OUTDIR/profile_{train,infer}.txt (self CUDA time per op of the universal training step and inference) and
# OUTDIR/ops_cpu.json (scripts/count_ops.py: ATen operations per training step and per sliding-window tile,
# universal / stock, keys step_ops_ratio and tile_ops_ratio; counted on the CPU, where they do not depend on the
# machine, on benchmark_speed's network at the sources' shape; last, and cut at 240 s so the call stays < 10 min).
set -uo pipefail
out=${1:?usage: gpu_checks.sh OUTDIR [D H W]}; shift
shape=${*:-128 128 128}
export PYTHONUNBUFFERED=1 nnUNet_compile=f
if [ -d .whl ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
mkdir -p "$out/speed"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, nnunetv2, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__)" || exit 1
time python3 scripts/benchmark_speed.py --device cuda --threads 8 --shape $shape --cases 2 --steps 6 --warmup 3 \
  --infer-repeats 2 --rounds 1 --work /tmp/speed_work --out "$out/speed"
cat "$out/speed/speed_cuda.md"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log" | tail -15
# where the universal training step and inference spend their GPU time (self CUDA time per op)
for what in train infer; do
  python3 scripts/benchmark_speed.py --worker $what --arm UniversalTrainer --work /tmp/speed_work --device cuda \
    --threads 8 --steps 3 --warmup 2 --worker-out /tmp/worker.json --profile-to "$out/profile.txt" >/dev/null
  head -30 "$out/profile_$what.txt"
done
# operations dispatched per training step and per tile (the host-overhead proxy; CPU, 8 threads, own small dataset)
timeout 240 python3 scripts/count_ops.py --work /tmp/ops_work --cases 2 --threads 8 --json "$out/ops_cpu.json" \
  | grep -v "^Please cite\|^Isensee\|^####" | tail -12
