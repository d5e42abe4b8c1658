"""The distillation stage (epts.distill, not in the paper) measured on the CPU: one tuned
block-wise pass, then each variant (epochs:lr) distills a copy of that state; perplexity on the
first 64 windows of the eval text at 0.1, 0.3, 0.5, 0.6 and 0.7 (--nm-train N:M: also at N:M,
beside a dedicated N:M run; --owl: also at 0.5, 0.6 and 0.7 with OWL's per-block sparsities, as
`--schedule owl` deploys them).

    python bench/distill_cpu.py --model ../shared/models/llama-mini --nsamples 32 --seqlen 256 \
        --epochs 2 --variants 1:1e-4 1:3e-4 4:1e-4 4:3e-5 8:1e-4 --out bench/distill_cpu.json

Results go into --out under the model's folder name, with the command (other entries are kept).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402

SPARSITIES = [0.1, 0.3, 0.5, 0.6, 0.7]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/llama-mini")
    p.add_argument("--calib", default="../shared/data/calib.txt")
    p.add_argument("--eval", default="../shared/data/wikitext2/test.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2, help="Phase-1 epochs of the block-wise pass")
    p.add_argument("--variants", nargs="+", default=["4:1e-4"], help="distill epochs:lr")
    p.add_argument("--nm-train", help="N:M: train the tuned recipe with --nm-train, evaluate N:M "
                   "too, and run a dedicated N:M run beside it")
    p.add_argument("--owl", action="store_true", help="also deploy 0.5, 0.6, 0.7 with OWL")
    p.add_argument("--rank", type=int, default=32, help="the tuned recipe's rank")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "distill_cpu.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    model, tok = epts.load_model(a.model, "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, a.calib, a.nsamples, a.seqlen, 0)
    tokens = epts.eval_tokens(tok, a.eval, a.seqlen)[: 64 * a.seqlen]
    dense = epts.snapshot_linears(model)

    targets = SPARSITIES + ([a.nm_train] if a.nm_train else [])

    def evaluate(state: epts.ElasticState, at: list = targets) -> dict[str, float]:
        ppl = {}
        for s in at:
            epts.deploy(model, state, s, dense)
            ppl[str(s)] = epts.perplexity(model, tokens, a.seqlen)
        top = state.groups[-1][1]  # OWL's per-block sparsities stay in the trained range
        for s in [0.5, 0.6, 0.7] if a.owl and at is targets else []:
            epts.deploy(model, state, epts.owl_sparsities(dense, state.act_norms, s,
                                                          limits=(0.0, top)), dense)
            ppl[f"owl {s}"] = epts.perplexity(model, tokens, a.seqlen)
        epts.restore_dense(model, dense)
        return ppl

    res = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
           "dense": epts.perplexity(model, tokens, a.seqlen)}
    cfg = epts.recipe_config("tuned", epochs=a.epochs, nm_train=a.nm_train, rank=a.rank)
    if a.nm_train:  # the reference: one run trained on N:M masks alone
        t0 = time.perf_counter()
        dedicated = epts_scale.optimize(model, windows, epts.dedicated_config(cfg, a.nm_train),
                                        "cpu", epts_scale.Options(verbose=False))
        res["dedicated"] = {"seconds": time.perf_counter() - t0,
                            "ppl": evaluate(dedicated, [a.nm_train])}
        print("dedicated", res["dedicated"], flush=True)
    t0 = time.perf_counter()
    state = epts_scale.optimize(model, windows, cfg, "cpu", epts_scale.Options(verbose=False))
    res["tuned"] = {"seconds": time.perf_counter() - t0, "ppl": evaluate(state)}
    print("tuned", res["tuned"], flush=True)
    for variant in a.variants:
        epochs, lr = variant.split(":")
        recipe = dataclasses.replace(cfg.tuned, distill_epochs=int(epochs), distill_lr=float(lr))
        distilled = copy.deepcopy(state)
        t0 = time.perf_counter()
        losses = epts.distill(model, distilled, windows, dataclasses.replace(cfg, tuned=recipe))
        res[f"distill {variant}"] = {"seconds": time.perf_counter() - t0, "losses": losses,
                                     "ppl": evaluate(distilled)}
        print(f"distill {variant}", res[f"distill {variant}"], flush=True)
    everything = json.load(open(a.out)) if os.path.exists(a.out) else {}
    name = os.path.basename(a.model.rstrip("/"))
    everything[name + (f" --nm-train {a.nm_train}" if a.nm_train else "")
               + (f" --rank {a.rank}" if a.rank != 32 else "") + (" --owl" if a.owl else "")] = res
    with open(a.out, "w") as f:
        json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
