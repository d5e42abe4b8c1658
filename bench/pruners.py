"""RIA and DSnoT: two training-free one-shot pruners, as per-layer rules for epts.prune_sequential.

Both run in the sequential loop of Wanda and SparseGPT (block by block, statistics from the pruned
stream); a rule is called rule(W, stat, n_tokens, sparsity, name), stat summed over batches.

RIA: Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large Language
Models", ICLR 2024 (Relative Importance and Activations):
    S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^a,   a = 0.5.
  * One threshold per matrix, its code's default (--per_outneuron off): exactly floor(s * numel)
    weights of lowest S go (its code prunes S <= the threshold, one more). per_row=True:
    floor(s * in) per row, Wanda's tactic. Counts use epts.prune_count (its 1e-6 guard).
  * N:M: the N lowest of every M consecutive inputs of a row (epts.nm_ranks). No channel
    permutation (reallocation, linear sum assignment): skipped, as in its code's default.
  * ||X_j||_2 from sum_t x_tj^2 (epts.sum_of_squares); its code takes a mean over samples, a
    constant factor that changes no ranking. An all-zero row or column scores 0 (not 0 / 0).

DSnoT: Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs",
ICLR 2024. Start from Wanda's mask. With c_ij = W_ij E[x_j], row i's expected error is
    e_i = sum_{j pruned} c_ij        (the dense minus the pruned expected output of the row),
and each cycle every row (all rows at once) regrows one pruned weight and prunes one kept weight:
  * regrow: if e_i > 0, the pruned weight with c_ij > 0 of largest c_ij / Var[x_j]; if e_i < 0, the
    one with c_ij < 0 of largest |c_ij| / Var[x_j] (its code's default power 1 of the variance);
  * prune: the kept weight of smallest Wanda score |W_ij| ||X_j||_2 among those with c_ij of the
    sign opposite to e_i (removing it adds c_ij to e_i: toward 0), as its unstructured branch;
  * a row stops for good when |e_i| <= threshold before a swap, after `cycles`, when no candidate
    of the needed sign is left (its code then walks into kept or wrong-sign entries), or, with
    same_sign, at the first swap that would flip the sign of e_i (rejected; its code stops too).
  Defaults as its code: 50 cycles; only attention linears ("self_attn.*") change, the MLP ones keep
  Wanda's mask (--skip_layer mlp); no same-sign check on unstructured masks, so e_i may overshoot.
  * Units: e_i uses the per-token mean E[x_j]. Its code's e_i is a per-window sum over 2048 tokens,
    so its threshold 0.1 is 0.1 / 2048 per token: our default, whatever our window length.
  * E[x_j], Var[x_j] = E[x_j^2] - E[x_j]^2 over all calibration tokens (stat sum_and_squares); its
    code averages per-sample variances (no spread between samples). Var is floored at 1e-12.
  * Weights with c_ij = 0 are never candidates: swapping them cannot move e_i.
  * N:M, as its code's N:M branch: regrow as above; prune the lowest-Wanda weight among the
    originally kept, not yet pruned, weights of the regrown weight's group of M (no sign rule), so
    each group keeps N of M pruned. same_sign is on by default there (always on in its code):
    without it e_i may grow.
Each accepted swap regrows one and prunes one weight of a row: every row keeps Wanda's count.
Checked step by step against a public port of its code (regrow and prune orders, the stopping
rule, the units of the threshold); on SmolLM2-135M and both stand-ins it is worse than Wanda at
unstructured 0.5-0.7 with these defaults (bench/RESULTS.md).
"""
from __future__ import annotations

import math
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402

METHODS = ("ria", "dsnot")
THRESHOLD = 0.1 / 2048  # DSnoT code's update_threshold 0.1, on errors summed over 2048 tokens


# RIA ----------------------------------------------------------------------------------------------

def ria_scores(W: torch.Tensor, act_norm: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """S_ij = (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) * ||X_j||_2^a (relative importance
    within column j and row i, times the activation norm to the power a)."""
    A = W.detach().abs().float()
    tiny = torch.finfo(A.dtype).tiny  # an all-zero row or column: 0 / tiny = 0, not NaN
    column, row = A.sum(0, keepdim=True), A.sum(1, keepdim=True)
    relative = A / column.clamp_min(tiny) + A / row.clamp_min(tiny)
    return relative * act_norm.float().pow(a).view(1, -1)


def ria_prune(W: torch.Tensor, sum_sq: torch.Tensor, n_tokens: int, sparsity: float | str,
              name: str = "", *, a: float = 0.5, per_row: bool = False) -> torch.Tensor:
    """RIA for one layer: W * M(s), M dropping the lowest S_ij: floor(s * numel) per matrix (its
    code's default), floor(s * in) per row with per_row, or N of every M (n_tokens, name unused)."""
    s, m = epts.pattern(sparsity)
    S = ria_scores(W, sum_sq.sqrt(), a)
    if m is not None:
        ranks = epts.nm_ranks(S, m)
    else:
        ranks = epts.row_ranks(S if per_row else S.view(1, -1))
    return W * epts.mask_from_ranks(ranks, s).view_as(W)


# DSnoT --------------------------------------------------------------------------------------------

def sum_and_squares(x: torch.Tensor) -> torch.Tensor:
    """[sum_t x_tj, sum_t x_tj^2] per input feature j over a batch's tokens: E[x_j] and Var[x_j]
    follow with n_tokens; row 1 is epts.sum_of_squares bit for bit (so Wanda's mask is too)."""
    return torch.stack([x.sum(0), x.pow(2).sum(0)])


class _Queue:
    """Per row, the candidates of one kind, best (lowest key) first; head: the next untried one."""

    def __init__(self, key: torch.Tensor, valid: torch.Tensor):
        self.order = torch.argsort(key.masked_fill(~valid, math.inf), dim=1, stable=True)
        self.count = valid.sum(1)
        self.head = torch.zeros_like(self.count)

    def peek(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(column of each row's next candidate, whether the row has one left)."""
        at = self.head.clamp(max=self.order.shape[1] - 1).unsqueeze(1)
        return self.order.gather(1, at).squeeze(1), self.head < self.count


def _pick(queues: dict[bool, _Queue], positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's candidate from queues[True] where its error is > 0, else from queues[False]."""
    (c1, ok1), (c0, ok0) = queues[True].peek(), queues[False].peek()
    return torch.where(positive, c1, c0), torch.where(positive, ok1, ok0)


def _in_group(importance: torch.Tensor, prunable: torch.Tensor, col: torch.Tensor, m: int):
    """N:M: the prunable weight of lowest importance in the group of M holding `col`, per row."""
    cols = (col - col % m).unsqueeze(1) + torch.arange(m, device=col.device)
    low, at = importance.gather(1, cols).masked_fill(~prunable.gather(1, cols), math.inf).min(1)
    return cols.gather(1, at.unsqueeze(1)).squeeze(1), torch.isfinite(low)


def dsnot_mask(c: torch.Tensor, ratio: torch.Tensor, importance: torch.Tensor, keep: torch.Tensor,
               m: int | None, cycles: int, threshold: float, same_sign: bool) -> torch.Tensor:
    """DSnoT's swaps on the kept-weight mask `keep` [out, in] (see the module docstring), all rows
    at once. c_ij = W_ij E[x_j]; e_i = sum_{j pruned} c_ij; a swap (regrow g, prune p) makes it
    e_i - c_ig + c_ip. ratio_ij = c_ij / Var[x_j] ranks regrowing, importance (Wanda) pruning."""
    keep, pruned, rows = keep.clone(), ~keep, torch.arange(len(c), device=c.device)
    err = (c * pruned).sum(1)
    sign0 = err.sign()
    regrow = {True: _Queue(-ratio, pruned & (c > 0)), False: _Queue(ratio, pruned & (c < 0))}
    prune = {True: _Queue(importance, keep & (c < 0)), False: _Queue(importance, keep & (c > 0))}
    prunable = keep.clone()  # N:M: originally kept and not yet pruned
    active = torch.ones_like(err, dtype=torch.bool)  # rows still swapping
    for _ in range(cycles):
        if not bool(active.any()):
            break
        positive = err > 0
        g, g_ok = _pick(regrow, positive)
        p, p_ok = _pick(prune, positive) if m is None else _in_group(importance, prunable, g, m)
        after = err - c[rows, g] + c[rows, p]
        active &= (err.abs() > threshold) & g_ok & p_ok
        if same_sign:
            active &= after.sign() == sign0
        keep[rows, g] |= active
        keep[rows, p] &= ~active
        prunable[rows, p] &= ~active
        err = torch.where(active, after, err)
        for sign in (True, False):
            taken = (active & (positive == sign)).long()
            regrow[sign].head += taken
            prune[sign].head += taken
    return keep


def dsnot_prune(W: torch.Tensor, sums: torch.Tensor, n_tokens: int, sparsity: float | str,
                name: str = "", *, cycles: int = 50, threshold: float = THRESHOLD,
                same_sign: bool | None = None, attention_only: bool = True) -> torch.Tensor:
    """DSnoT for one layer: Wanda's mask (Eq. 1 of epts), then dsnot_mask's swaps that drive each
    row's expected error sum_{j pruned} W_ij E[x_j] toward 0. sums = [sum_t x_tj, sum_t x_tj^2]
    (sum_and_squares). same_sign None: off for unstructured, on for N:M (its code's defaults).
    attention_only: a named linear outside "self_attn." (an MLP one) keeps Wanda's mask; a call
    without a name swaps (a direct call on one matrix means to run DSnoT on it)."""
    s, m = epts.pattern(sparsity)
    importance = epts.wanda_scores(W, sums[1].sqrt())
    keep = epts.mask_from_ranks(epts.ranks_for(importance, sparsity), s)
    mlp = bool(name) and not name.startswith("self_attn")
    if cycles > 0 and not (attention_only and mlp):
        mean = sums[0].double() / n_tokens
        var = (sums[1].double() / n_tokens - mean ** 2).clamp_min(1e-12)
        c = W.detach().double() * mean
        same = (m is not None) if same_sign is None else same_sign
        keep = dsnot_mask(c, c / var, importance, keep, m, cycles, threshold, same)
    return W * keep


# The sequential loop ------------------------------------------------------------------------------

def prune(model: nn.Module, method: str, windows: torch.Tensor, sparsity: float | str | list,
          device: str | torch.device = "cpu", verbose: bool = False) -> nn.Module:
    """Prune `model` in place with RIA or DSnoT (defaults above) in epts.prune_sequential, the loop
    of Wanda and SparseGPT; sparsity: one number, "N:M", or one per block. Start from dense weights
    (epts.restore_dense) between calls: the rules prune what they are given."""
    if method == "ria":
        rule, stat = ria_prune, epts.sum_of_squares
    elif method == "dsnot":
        rule, stat = dsnot_prune, sum_and_squares
    else:
        raise epts.EPTSError(f"unknown method '{method}'; one of {', '.join(METHODS)}")
    return epts.prune_sequential(model, windows, sparsity, rule, stat, device, desc=method,
                                 verbose=verbose)
