#!/usr/bin/env bash
# Everything the GPU benchmark records, in one detached job (see bench/README.md). Logs go to bench/logs/.
set -x
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
M=.cache/models; D=.cache/data
mkdir -p bench/logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > bench/logs/gpu.txt
python3 bench/phase1_speed.py --model $M/llama-mini --calib $D/calib.txt --epochs 2 --check-graph > bench/logs/speed_llama.txt 2>&1
python3 bench/phase1_speed.py --model $M/opt-mini --calib $D/calib.txt --epochs 2 > bench/logs/speed_opt.txt 2>&1
python3 bench/run_bench.py --models $M/opt-mini $M/llama-mini --calib $D/calib.txt \
    --eval $D/wikitext2/test.txt $D/heldout.txt > bench/logs/run_bench.txt 2>&1
for m in opt-mini llama-mini; do
  /usr/bin/time -v python3 epts.py --model $M/$m --calib $D/calib.txt --eval $D/wikitext2/test.txt $D/heldout.txt \
      --device cuda --quiet --save bench/logs/$m.elastic.safetensors --json-out bench/cli_$m.json > bench/logs/cli_$m.txt 2>&1
done
echo done > bench/logs/DONE
