#!/usr/bin/env bash
# Every GPU figure the README claims, on one CUDA machine, in a few minutes; run it from the repository root
# of a checkout whose Python has pfl's dependencies (PY, default .venv/bin/python, else python3):
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# 1. pfl's rounds against a plain PyTorch loop on the GPU, client data and states resident on the device
#    and not (benchmarks/overhead.py, paired per-round ratios);
# 2. the same at bf16-mixed;
# 3. `pfl compare --jobs 4 --gpus-per-run 0.25` against `--jobs 1` (benchmarks/parallel.py: wall time ratio,
#    largest accuracy difference);
# 4. a Flower simulation with `flower.client_gpus=0.25` (four clients per GPU) against the local engine on the
#    GPU: seconds per round from each run's metrics.csv.
# Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else synthetic data of the same shape.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/pfl-gpu-bench}
mkdir -p "$OUT"
PY=${PY:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FLWR_TELEMETRY_ENABLED=0
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

DATA=()
if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  echo "(no Fashion-MNIST here: synthetic 28x28 data of the same size)"
  DATA=(--set dataset=synthetic --set synthetic.num_samples=70000 --set 'synthetic.image_shape=[1,28,28]')
fi

echo; echo "== 1. pfl vs plain PyTorch loop on the GPU (fmnist, 10 clients, 3 timed rounds): resident on, then off"
"$PY" benchmarks/overhead.py --recipe fmnist --rounds 3 --accelerator gpu --resident on "${DATA[@]}"
"$PY" benchmarks/overhead.py --recipe fmnist --rounds 3 --accelerator gpu --resident off "${DATA[@]}"

echo; echo "== 2. bf16-mixed (pfl) against the float32 plain loop, resident on"
"$PY" benchmarks/overhead.py --recipe fmnist --rounds 3 --accelerator gpu --resident on --precision bf16-mixed "${DATA[@]}"

echo; echo "== 3. pfl compare --jobs 4 --gpus-per-run 0.25 against --jobs 1 (fmnist-dir, 4 methods, 3 rounds)"
"$PY" benchmarks/parallel.py --jobs 4 --out "$OUT/parallel" \
  --extra-parallel "--gpus-per-run 0.25 --accelerator gpu" --extra-sequential "--accelerator gpu" -- \
  --recipe fmnist-dir --methods pfedlora,standalone,fedproto,lg_fedavg --seeds 1 --set rounds=3 "${DATA[@]}"

echo; echo "== 4. Flower simulation, flower.client_gpus=0.25, against the local engine on the GPU (fmnist, 3 rounds)"
for engine in local flower; do
  rm -rf "$OUT/engine-$engine"
  extra=()
  [ "$engine" = flower ] && extra=(--set flower.client_gpus=0.25 --set flower.client_cpus=1)
  start=$(date +%s.%N)
  "$PY" -m cli.main train --recipe fmnist --engine "$engine" --accelerator gpu --set rounds=3 \
    --out "$OUT/engine-$engine" "${DATA[@]}" "${extra[@]}" >"$OUT/engine-$engine.log" 2>&1 \
    || { tail -20 "$OUT/engine-$engine.log"; exit 1; }
  end=$(date +%s.%N)
  "$PY" - "$OUT/engine-$engine" "$engine" "$start" "$end" <<'EOF'
import csv, statistics, sys
rows = list(csv.DictReader(open(f"{sys.argv[1]}/metrics.csv")))
per_round = [float(r["train_seconds"]) + float(r["eval_seconds"]) for r in rows]
print(f"{sys.argv[2]}: {statistics.median(per_round[1:]):.2f} s/round (rounds 2..3), "
      f"{float(sys.argv[4]) - float(sys.argv[3]):.1f} s in all, final mean accuracy {float(rows[-1]['acc_mean']):.4f}")
EOF
done
