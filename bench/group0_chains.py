"""CPU-sized study: which adapter chain should a sparsity in group 0 (0, 0.4] deploy with?

    # about 4 minutes, 2 cores
    python bench/group0_chains.py --model ../shared/models/opt-mini --variant paper
    # a seconds-long smoke run
    python bench/group0_chains.py --nsamples 2 --epochs 1 --eval-windows 2

Optimizes once (16 x 256 calibration tokens of calib.txt, 2 epochs; epts_scale.optimize, as the
command line), then deploys every block at each s of group 0 with a forced chain -- the mask
alone (-1), the chain of group 0, 1 or 2 -- and prints the perplexity on the first 64 windows of
256 tokens of WikiText-2 test, next to the paper's deployment (the group-0 adapter where the
low-group check kept it, else the mask alone). Above group 0 it prints the ppl at 0.5 and 0.7 with
the paper's chains.

--variant picks Phase 1 through epts.TunedRecipe's switches (two of the tuned recipe's, each alone,
the other three off; nothing is patched):
  paper     the paper's recipe
  dense0    group0_dense_input: group 0's Phase-1 slice gets X_dense (the stream low sparsities
            are deployed on)
  decouple  stop_chain_grad: groups >= 1 see sg(B_0 A_0), so B_0 learns from group 0's own loss
            only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402

OFF = epts.TunedRecipe(group0_dense_input=False, stop_chain_grad=False, group0_ramp=False,
                       fit_gain=False)  # every switch off: the paper's recipe
VARIANTS = {"paper": None, "dense0": dataclasses.replace(OFF, group0_dense_input=True),
            "decouple": dataclasses.replace(OFF, stop_chain_grad=True)}  # -> EPTSConfig.tuned
NO_ADAPTER = -1  # a chain of -1: no adapter, the mask alone


@torch.no_grad()
def deploy_chain(model, state, dense, s: float, chain: list[int]) -> None:
    """Eq. 2 at sparsity s in every block, block i with its chain forced to chain[i]:
    W = (W + sum_{j <= chain[i]} B_j A_j) * M(s); chain -1 (NO_ADAPTER) is the mask alone."""
    for key, lin in epts.pruned_linears(model).items():
        W, (A, B) = dense[key].float(), state.adapters[key]
        k = chain[epts.block_of(key)]
        delta = sum((B[j] @ A[j] for j in range(k + 1)), torch.zeros_like(W))
        mask = epts.mask_from_ranks(epts.row_ranks(epts.wanda_scores(W, state.act_norms[key])), s)
        lin.weight.copy_((W + delta) * mask)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/opt-mini")
    p.add_argument("--calib", default="../shared/data/calib.txt")
    p.add_argument("--eval", default="../shared/data/wikitext2/test.txt")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-windows", type=int, default=64, help="windows of 256 tokens evaluated")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.35, 0.4])
    p.add_argument("--variant", default="paper", choices=list(VARIANTS))
    a = p.parse_args()
    model, tok = epts.load_model(a.model, "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, a.calib, a.nsamples, 256, 0)
    tokens = epts.eval_tokens(tok, a.eval, 256)[: a.eval_windows * 256]
    dense = epts.snapshot_linears(model)
    cfg = epts.EPTSConfig(epochs=a.epochs, tuned=VARIANTS[a.variant])
    options = epts_scale.Options(base_model=a.model)
    state = epts_scale.optimize(model, windows, cfg, "cpu", options)  # the CLI's fast paths
    n = len(epts.decoder_blocks(model))
    kept = [r.group0_gain > 0 for r in state.reports]  # by the low-group check
    paper = [0 if k else NO_ADAPTER for k in kept]
    print(f"variant {a.variant}: group-0 adapter kept by the low-group check in {sum(kept)} of "
          f"{n} blocks")
    print(f"{'s':>5} {'paper':>9} " + " ".join(f"{'chain ' + str(c):>9}" for c in (-1, 0, 1, 2)))
    for s in a.sparsities:
        ppl = []
        for chain in [paper] + [[c] * n for c in (NO_ADAPTER, 0, 1, 2)]:
            deploy_chain(model, state, dense, s, chain)
            ppl.append(epts.perplexity(model, tokens, 256))
        epts.restore_dense(model, dense)
        print(f"{s:>5} " + " ".join(f"{v:>9.2f}" for v in ppl), flush=True)
    for s in (0.5, 0.7):  # above group 0: the paper's chain of the group of s
        deploy_chain(model, state, dense, s, [epts.group_of(s)] * n)
        print(f"{s:>5} {epts.perplexity(model, tokens, 256):>9.2f}  (chain of group "
              f"{epts.group_of(s)})", flush=True)
    epts.restore_dense(model, dense)


if __name__ == "__main__":
    main()
