"""Issue 11 ablation (CPU-sized): which adapter chain should a sparsity in group 0 (0, 0.4] deploy with?

    python bench/group0_chains.py --model ../shared/models/opt-mini

Optimizes the paper's recipe once (16 x 256 calibration tokens of calib.txt, 2 epochs), then deploys every
block at s in group 0 with a forced chain -- the mask alone (-1), the chain of group 0, 1 or 2 -- and prints the
perplexity on the first 64 windows of 256 tokens of WikiText-2 test, next to the paper's deployment
(the group-0 adapter where the low-group check kept it, else the mask alone).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402


@torch.no_grad()
def deploy_chain(model, state, dense, s: float, chain: list[int]) -> None:
    """Eq. 2 at sparsity s in every block, with block i's chain forced to chain[i] (NO_ADAPTER: mask only)."""
    for key, lin in epts.pruned_linears(model).items():
        W, (A, B) = dense[key].float(), state.adapters[key]
        ranks = epts.row_ranks(epts.wanda_scores(W, state.act_norms[key]))
        lin.weight.copy_(epts.elastic_weight(W, ranks, A, B, torch.tensor([s], dtype=torch.float64),
                                             torch.tensor([chain[epts.block_of(key)]]))[0])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="../shared/models/opt-mini")
    p.add_argument("--calib", default="../shared/data/calib.txt")
    p.add_argument("--eval", default="../shared/data/wikitext2/test.txt")
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.35, 0.4])
    a = p.parse_args()
    model, tok = epts.load_model(a.model, "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, a.calib, 16, 256, 0)
    tokens = epts.eval_tokens(tok, a.eval, 256)[: 64 * 256]
    dense = epts.snapshot_linears(model)
    state = epts.optimize(model, windows, epts.EPTSConfig(epochs=2), "cpu", a.model, verbose=False)
    n = len(epts.decoder_blocks(model))
    paper = [0 if kept else epts.NO_ADAPTER for kept in state.low_group_enabled]
    print(f"group-0 adapter kept by the low-group check in {sum(state.low_group_enabled)} of {n} blocks")
    print(f"{'s':>5} {'paper':>8} " + " ".join(f"{'chain ' + str(c):>9}" for c in (-1, 0, 1, 2)))
    for s in a.sparsities:
        ppl = []
        for chain in [paper] + [[c] * n for c in (epts.NO_ADAPTER, 0, 1, 2)]:
            deploy_chain(model, state, dense, s, chain)
            ppl.append(epts.perplexity(model, tokens, 256))
        epts.restore_dense(model, dense)
        print(f"{s:>5} " + " ".join(f"{v:>9.2f}" for v in ppl), flush=True)


if __name__ == "__main__":
    main()
