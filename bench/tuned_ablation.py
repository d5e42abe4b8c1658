"""The tuned recipe's ablation: every switch alone and together, on the stand-ins.

    python bench/tuned_ablation.py --models .cache/models/opt-mini .cache/models/llama-mini \
        --calib .cache/data/calib.txt --eval .cache/data/wikitext2/test.txt \
        --out bench/tuned_ablation.json

One elastic run per variant (bench settings: 128 x 1024 calibration tokens, 10 epochs, seed 0;
epts_scale.optimize, as the command line), each deployed at the points of --sparsities;
`mask-only` is the paper run's masks without adapters. Prints one row per variant.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402
from run_bench import config_with, mask_only  # noqa: E402

# name -> the tuned recipe's switches (epts.TunedRecipe's fields; the others off) and EPTSConfig
# fields, on top of the paper's recipe (run_bench.config_with, which also reads the switches' old
# names: group0_input="dense", low_gain="fit")
VARIANTS = {
    "paper": {},
    "dense0": dict(group0_dense_input=True),
    "stop0": dict(stop_chain_grad=True),
    # Not quite the variant of the first runs (tuned_ablation.json): with fit_gain off, the
    # low-group check now compares group 0's adapter ramped, as deploy uses it (s / hi_0 at
    # s = 0.3); before epts.TunedRecipe it compared it unramped.
    "ramp": dict(group0_ramp=True),
    "fit": dict(fit_gain=True),
    "tuned": dict(group0_dense_input=True, stop_chain_grad=True, group0_ramp=True,
                  fit_gain=True),  # at rank 8
}  # the committed recipe, epts.recipe_config("tuned"), is "tuned" at rank 32 (RESULTS.md: --extra)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS))
    p.add_argument("--extra", default="{}", help="JSON: name -> fields, more variants (as in "
                   "VARIANTS)")
    p.add_argument("--sparsities", type=float, nargs="+",
                   default=[0.05, 0.1, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7])
    p.add_argument("--out", default="bench/tuned_ablation.json")
    a = p.parse_args()
    variants = {**VARIANTS, **json.loads(a.extra)}
    names = a.variants + [n for n in json.loads(a.extra) if n not in a.variants]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = json.load(open(a.out)) if os.path.isfile(a.out) else {}
    for path in a.models:
        model, tok = epts.load_model(path, "float32", device, verbose=False)
        model.to(device)
        windows = epts.calibration_windows(tok, a.calib, a.nsamples, a.seqlen, 0)
        tokens = epts.eval_tokens(tok, a.eval, a.seqlen)
        dense = epts.snapshot_linears(model)
        res = results.setdefault(os.path.basename(path), {})
        for name in names:
            cfg = config_with(epts.EPTSConfig(epochs=a.epochs), variants[name])
            lap = epts.stopwatch(device)
            state = epts_scale.optimize(model, windows, cfg, device,
                                        epts_scale.Options(base_model=path))
            seconds = lap()
            runs = [(name, state)] + ([("mask-only", mask_only(state))] if name == "paper" else [])
            for label, st in runs:
                rows = epts.sweep(model, "epts", a.sparsities, dense,
                                  lambda s: epts.perplexity(model, tokens, a.seqlen, device, 8),
                                  state=st, device=device)
                ppl = {f"{row['sparsity']:g}": row["ppl"] for row in rows}
                # "low_gain": this file's name for each block's group0_gain (0: the mask alone)
                res[label] = {"ppl": ppl, "seconds": seconds, "config": variants.get(label, {}),
                              "low_gain": [r.group0_gain for r in st.reports]}
                print(f"{os.path.basename(path):>10} {label:>10} {seconds:6.1f}s " +
                      " ".join(f"{k}:{v:.2f}" for k, v in ppl.items()) +
                      f"  gains {[round(g, 2) for g in res[label]['low_gain']]}", flush=True)
            json.dump(results, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
