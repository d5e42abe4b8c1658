#!/usr/bin/env bash
# Every GPU measurement of bench/, in one job (more than one device call's 10 minutes): bash bench/gpu_all.sh OUTDIR
# OUTDIR must lie outside the repository when the device tool runs it (each call re-syncs the working tree
# and removes untracked files there; start it detached and poll, then copy OUTDIR/* to $OUT).
set -x
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/epts-bench}
export PYTHONUNBUFFERED=1
M=.cache/models; D=.cache/data
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 bench/phase1_speed.py --model $M/llama-mini --calib $D/calib.txt --epochs 2 --check-graph > "$OUT/speed_llama.txt" 2>&1
python3 bench/phase1_speed.py --model $M/opt-mini --calib $D/calib.txt --epochs 2 > "$OUT/speed_opt.txt" 2>&1
python3 bench/run_bench.py --models $M/opt-mini $M/llama-mini --calib $D/calib.txt \
    --eval $D/wikitext2/test.txt $D/heldout.txt --grid --out "$OUT" > "$OUT/run_bench.txt" 2>&1
python3 bench/tuned_ablation.py --models $M/opt-mini $M/llama-mini --calib $D/calib.txt \
    --eval $D/wikitext2/test.txt --out "$OUT/tuned_ablation.json" > "$OUT/tuned_ablation.txt" 2>&1
python3 bench/scale.py --out "$OUT/scale.json" > "$OUT/scale.txt" 2>&1   # default and --low-memory, both shapes
python3 bench/e2e.py --shape llama-7b --workdir /tmp/e2e --nsamples 16 --low-memory \
    --out "$OUT/e2e_llama7b.json" > "$OUT/e2e.txt" 2>&1
echo done > "$OUT/DONE"
