"""Issue 11 ablation (CPU-sized): which adapter chain should a sparsity in group 0 (0, 0.4] deploy with?

    python bench/group0_chains.py --model ../shared/models/opt-mini

Optimizes the paper's recipe once (16 x 256 calibration tokens of calib.txt, 2 epochs), then deploys every
block at s in group 0 with a forced chain -- the mask alone (-1), the chain of group 0, 1 or 2 -- and prints the
perplexity on the first 64 windows of 256 tokens of WikiText-2 test, next to the paper's deployment
(the group-0 adapter where the low-group check kept it, else the mask alone). Above group 0 it prints the
ppl at 0.5 and 0.7 with the paper's chains.

--variant changes Phase 1 for this exploration only (epts.py is untouched; functions are patched here):
  paper     the paper's recipe
  dense0    the group-0 slice of every Phase-1 step gets the dense stream X_dense as input (the stream that low
            sparsities are deployed on), the other groups X_mix as in the paper
  decouple  groups >= 1 see sg(B_0 A_0): group 0's adapter learns only from group 0's own loss
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402

PATCHED: dict = {}


def phase1_dense0(block, layers, X_mix, Y, kwargs, cfg, generator, runtime=None, block_index=0, progress=None):
    """Eager Phase 1 (as epts.phase1_train on the CPU) with slice 0 fed X_dense[batch] instead of X_mix[batch]."""
    X_dense = PATCHED["X_dense"]
    batches = epts.in_chunks(X_mix, cfg.batch_size)
    total = cfg.epochs * len(batches)
    groups, draws, _ = epts.phase1_slices(cfg, total, generator, X_mix.device)
    opt = torch.optim.Adam([p for layer in layers.values() for p in (layer.A, layer.B)], lr=cfg.lr)
    history = []
    for epoch in range(cfg.epochs):
        epoch_loss = torch.zeros(len(groups))
        for t, batch in enumerate(batches, start=epoch * len(batches)):
            opt.param_groups[0]["lr"] = epts.cosine_lr(t, total, cfg.lr)
            opt.zero_grad(set_to_none=True)
            for layer in layers.values():
                layer.route(draws[t], groups)
            x = X_mix[batch]
            inputs = torch.cat([X_dense[batch], x.repeat(len(groups) - 1, *([1] * (x.dim() - 1)))])
            loss, per_group = epts.phase1_objective(epts.call_block(block, inputs, kwargs).view(len(groups), *x.shape),
                                                    Y[batch])
            loss.backward()
            opt.step()
            epoch_loss += per_group
        history.append((epoch_loss / len(batches)).tolist())
    return history


def elastic_weight_decoupled(weight, ranks, A, B, sparsity, group):
    """Eq. 2 where slices of groups >= 1 use a detached B_0 (while gradients are on)."""
    if not torch.is_grad_enabled():
        return PATCHED["elastic_weight"](weight, ranks, A, B, sparsity, group)
    K, G = B.shape[0], len(group)
    B0 = torch.where((group <= 0).view(-1, 1, 1, 1), B[:1].unsqueeze(0), B[:1].detach().unsqueeze(0))
    Bg = torch.cat([B0.expand(G, 1, *B.shape[1:]), B[1:].unsqueeze(0).expand(G, K - 1, *B.shape[1:])], 1)
    in_chain = torch.arange(K, device=group.device).view(1, K, 1, 1) <= group.view(-1, 1, 1, 1)
    delta = (Bg * in_chain).permute(0, 2, 1, 3).reshape(G, B.shape[1], -1) @ A.reshape(-1, A.shape[-1])
    return (weight.unsqueeze(0) + delta) * epts.mask_from_ranks(ranks, sparsity)


def patch(variant: str) -> None:
    """Swap in the variant's Phase-1 pieces (nothing for "paper")."""
    if variant == "dense0":
        real = epts.dense_targets_and_norms

        def targets_and_stash(block, names, X, kwargs, chunk):
            PATCHED["X_dense"] = X  # optimize_block computes the dense targets from X_dense first
            return real(block, names, X, kwargs, chunk)

        epts.dense_targets_and_norms, epts.phase1_train = targets_and_stash, phase1_dense0
    elif variant == "decouple":
        PATCHED["elastic_weight"], epts.elastic_weight = epts.elastic_weight, elastic_weight_decoupled


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
    p.add_argument("--variant", default="paper", choices=["paper", "dense0", "decouple"])
    a = p.parse_args()
    patch(a.variant)
    model, tok = epts.load_model(a.model, "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, a.calib, 16, 256, 0)
    tokens = epts.eval_tokens(tok, a.eval, 256)[: 64 * 256]
    dense = epts.snapshot_linears(model)
    state = epts.optimize(model, windows, epts.EPTSConfig(epochs=2), "cpu", a.model, verbose=False)
    if a.variant == "decouple":
        epts.elastic_weight = PATCHED["elastic_weight"]  # deploy with the plain Eq. 2
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
    for s in (0.5, 0.7):  # above group 0: the paper's chain of the group of s
        deploy_chain(model, state, dense, s, [epts.group_of(s)] * n)
        print(f"{s:>5} {epts.perplexity(model, tokens, 256):>9.2f}  (chain of group {epts.group_of(s)})", flush=True)
    epts.restore_dense(model, dense)


if __name__ == "__main__":
    main()
