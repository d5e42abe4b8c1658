#!/usr/bin/env bash
# The real-model benchmark (SmolLM2-135M from its GGUF) on one GPU: bench/run_bench.py partial runs.
# The paper and tuned optimizations run alone (their seconds are the recipe's times); the rest then
# share the GPU, three at a time (their seconds are not comparable). Writes OUT/<part>/results.json
# and OUT/<part>.log; merge them with
#   python bench/run_bench.py --from bench/results.json --out bench --merge OUT/*/results.json
# Usage: bash bench/smollm2.sh GGUF_FILE DATA_DIR OUT [PART ...]
# PARTs (default: all): paper tuned baselines pruners dedicated nm calib
set -u
GGUF=$1; D=$2; OUT=$3; M=/tmp/models/smollm2-135m
shift 3
PARTS=" ${*:-paper tuned baselines pruners dedicated nm calib} "
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
[ -f $M/config.json ] || python3 -c "import sys, torch, epts; m, t = epts.load_model(sys.argv[1], \
'float32', torch.device('cpu'), verbose=False); m.save_pretrained(sys.argv[2]); \
t.save_pretrained(sys.argv[2])" "$GGUF" $M
part() {  # part NAME METHODS...: one partial run, if NAME is among the PARTs asked for
  name=$1; shift
  case "$PARTS" in *" $name "*) ;; *) return 0 ;; esac
  python3 bench/run_bench.py --models $M --calib $D/calib.txt --eval $D/wikitext2/test.txt \
    --seqlen 2048 --grid --dedicated 0.5 0.7 2:4 --out "$OUT/$name" --methods "$@" \
    > "$OUT/$name.log" 2>&1
  echo "$name exit $? at $(date +%T)" >> "$OUT/parts.txt"
}
part paper epts mask-only epts-owl save-bf16
part tuned epts-tuned save-bf16
(part baselines magnitude wanda sparsegpt wanda-owl; part pruners ria dsnot) &
part dedicated dedicated &
(part nm epts-nm; part calib calib-sizes) &
wait
echo done >> "$OUT/parts.txt"
