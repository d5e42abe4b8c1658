"""A CPU-sized version of the benchmark (minutes, 2 cores): opt-mini, 8 x 256 calibration tokens,
1 epoch.

    python bench/cpu_check.py --model ../shared/models/opt-mini --calib ../shared/data/calib.txt \
        --eval ../shared/data/wikitext2/test.txt

Evaluates on the first 64 windows of 256 tokens and asserts the ordering dense < EPTS <= Wanda at
0.6 (exit status 1 if it does not hold). Wanda is run as in its paper (sequential, one pruning per
sparsity).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/opt-mini")
    p.add_argument("--calib", default="../shared/data/calib.txt")
    p.add_argument("--eval", default="../shared/data/wikitext2/test.txt")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.6])
    a = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model, tok = epts.load_model(a.model, "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, a.calib, a.nsamples, a.seqlen, 0)
    tokens = epts.eval_tokens(tok, a.eval, a.seqlen)[: 64 * a.seqlen]
    dense = epts.snapshot_linears(model)
    evaluate = lambda s: {"wikitext2": epts.perplexity(model, tokens, a.seqlen)}  # noqa: E731
    ppl = {"dense": evaluate(0.0)["wikitext2"]}
    # as the command line optimizes
    state = epts_scale.optimize(model, windows, epts.EPTSConfig(epochs=a.epochs), "cpu")
    for method in ("epts", "wanda"):  # the elastic model deployed; Wanda pruned once per sparsity
        for row in epts.sweep(model, method, a.sparsities, dense, evaluate, state=state,
                              windows=windows):
            ppl[f"{method} {row['sparsity']}"] = row["ppl"]["wikitext2"]
    for k, v in ppl.items():
        print(f"{k:>10}: ppl {v:.2f}")
    ok = ppl["dense"] < ppl["epts 0.6"] <= ppl["wanda 0.6"]
    print(f"dense < EPTS <= Wanda at 0.6: {'holds' if ok else 'DOES NOT HOLD'} "
          f"({time.perf_counter() - t0:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
