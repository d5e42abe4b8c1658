"""CPU tests of bench/pruners.py (RIA, DSnoT): python3 -m pytest -q bench/test_pruners.py"""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import epts  # noqa: E402
import pruners  # noqa: E402

ATTN = "self_attn.q_proj"  # a name DSnoT updates by default (the MLP linears keep Wanda's mask)


def layer(out: int = 32, inp: int = 256, tokens: int = 256, seed: int = 0):
    """A random linear and its calibration statistics; inputs with non-zero, unequal means."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inp, generator=g)
    X = torch.randn(tokens, inp, generator=g) * (0.5 + torch.rand(inp, generator=g))
    X += torch.randn(inp, generator=g)
    return W, pruners.sum_and_squares(X), tokens


def expected_error(W: torch.Tensor, pruned_W: torch.Tensor, sums: torch.Tensor, n: int):
    """e_i = sum_j (W_ij - W'_ij) E[x_j], per row."""
    return ((W - pruned_W).double() * (sums[0].double() / n)).sum(1)


def zeros_per_group(W: torch.Tensor, m: int) -> torch.Tensor:
    return (W == 0).view(W.shape[0], -1, m).sum(-1)


# RIA ----------------------------------------------------------------------------------------------

def test_ria_matches_a_hand_computed_3x4_example():
    W = torch.tensor([[3., -2., 3., 3.], [-4., 3., 4., -4.], [1., 1., -3., 4.]])
    sum_sq = torch.tensor([1., 16., 81., 256.])  # ||X_j|| = 1, 4, 9, 16; ||X_j||^0.5 = 1, 2, 3, 4
    # row sums of |W|: 11, 15, 9; column sums: 8, 6, 10, 11
    expected = torch.tensor([
        [(3 / 8 + 3 / 11) * 1, (2 / 6 + 2 / 11) * 2, (3 / 10 + 3 / 11) * 3, (3 / 11 + 3 / 11) * 4],
        [(4 / 8 + 4 / 15) * 1, (3 / 6 + 3 / 15) * 2, (4 / 10 + 4 / 15) * 3, (4 / 11 + 4 / 15) * 4],
        [(1 / 8 + 1 / 9) * 1, (1 / 6 + 1 / 9) * 2, (3 / 10 + 3 / 9) * 3, (4 / 11 + 4 / 9) * 4]])
    # = [[0.648, 1.030, 1.718, 2.182], [0.767, 1.400, 2.000, 2.521], [0.236, 0.556, 1.900, 3.232]]
    assert torch.allclose(pruners.ria_scores(W, sum_sq.sqrt()), expected, rtol=1e-6)
    # per matrix (default), s = 0.25: the 3 lowest of all 12: (2,0) 0.236, (2,1) 0.556, (0,0) 0.648
    gone = pruners.ria_prune(W, sum_sq, 1, 0.25) == 0
    assert gone.nonzero().tolist() == [[0, 0], [2, 0], [2, 1]]
    # per row, s = 0.25: the lowest of each row, column 0 everywhere
    gone = pruners.ria_prune(W, sum_sq, 1, 0.25, per_row=True) == 0
    assert gone.nonzero().tolist() == [[0, 0], [1, 0], [2, 0]]
    # 2:4: the 2 lowest of each group of 4 inputs: columns 0 and 1 in every row
    gone = pruners.ria_prune(W, sum_sq, 1, "2:4") == 0
    assert gone.nonzero()[:, 1].tolist() == [0, 1] * 3


@pytest.mark.parametrize("s", [0.29, 0.5, 0.7])
def test_ria_removes_exactly_the_fraction_per_matrix_or_per_row(s):
    W, sums, n = layer(out=12, inp=100)
    gone = pruners.ria_prune(W, sums[1], n, s) == 0
    assert int(gone.sum()) == epts.prune_count(s, W.numel())
    assert len(set(gone.sum(1).tolist())) > 1  # one threshold per matrix: rows lose unequal counts
    gone = pruners.ria_prune(W, sums[1], n, s, per_row=True) == 0
    assert (gone.sum(1) == epts.prune_count(s, W.shape[1])).all()


def test_ria_respects_n_m():
    W, sums, n = layer(out=12, inp=96)
    assert (zeros_per_group(pruners.ria_prune(W, sums[1], n, "2:4"), 4) == 2).all()
    assert (zeros_per_group(pruners.ria_prune(W, sums[1], n, "4:8"), 8) == 4).all()


# DSnoT --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("s", [0.3, 0.5, "2:4"])
def test_dsnot_with_zero_cycles_is_wanda(s):
    W, sums, n = layer()
    wanda = epts.wanda_prune(W, sums[1], n, s)
    assert torch.equal(pruners.dsnot_prune(W, sums, n, s, ATTN, cycles=0), wanda)
    assert torch.equal(pruners.dsnot_prune(W, sums, n, s, "mlp.down_proj"), wanda)  # MLP: kept
    assert not torch.equal(pruners.dsnot_prune(W, sums, n, s, ATTN), wanda)


@pytest.mark.parametrize("same_sign", [False, True])
@pytest.mark.parametrize("s", [0.29, 0.5, 0.7])
def test_dsnot_keeps_each_rows_count(s, same_sign):
    W, sums, n = layer(inp=100)
    gone = pruners.dsnot_prune(W, sums, n, s, ATTN, same_sign=same_sign) == 0
    assert (gone.sum(1) == epts.prune_count(s, W.shape[1])).all()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_dsnot_keeps_n_m(nm):
    n_, m = map(int, nm.split(":"))
    W, sums, n = layer(inp=128)
    wanda = epts.wanda_prune(W, sums[1], n, nm)
    for same_sign in (None, False):  # None: the check is on for N:M (its pruning has no sign rule)
        Wp = pruners.dsnot_prune(W, sums, n, nm, ATTN, same_sign=same_sign)
        assert (zeros_per_group(Wp, m) == n_).all()
        assert not torch.equal(Wp, wanda)
    Wp = pruners.dsnot_prune(W, sums, n, nm, ATTN)
    e0, e1 = expected_error(W, wanda, sums, n), expected_error(W, Wp, sums, n)
    assert e1.abs().sum() < 0.8 * e0.abs().sum() and (e1.sign() == e0.sign()).all()


def test_dsnot_never_changes_a_row_already_under_the_threshold():
    W, sums, n = layer()
    wanda = epts.wanda_prune(W, sums[1], n, 0.5)
    e0 = expected_error(W, wanda, sums, n).abs()
    threshold = float(e0.median())
    Wp = pruners.dsnot_prune(W, sums, n, 0.5, ATTN, threshold=threshold)
    changed = ((Wp == 0) != (wanda == 0)).any(1)
    assert not changed[e0 <= threshold].any()
    assert changed[e0 > threshold].all()


def test_same_sign_never_flips_a_rows_error_and_the_default_may():
    flips = {}
    for same_sign in (True, False):
        flips[same_sign] = 0
        for seed in range(3):
            W, sums, n = layer(inp=64, seed=seed)  # few inputs: single swaps are large, overshoot
            e0 = expected_error(W, epts.wanda_prune(W, sums[1], n, 0.5), sums, n)
            e1 = expected_error(W, pruners.dsnot_prune(W, sums, n, 0.5, ATTN,
                                                       same_sign=same_sign), sums, n)
            flips[same_sign] += int((e1.sign() != e0.sign()).sum())
    assert flips[True] == 0
    assert flips[False] > 0  # the code's default (no check) overshoots past zero


@pytest.mark.parametrize("same_sign", [False, True])
def test_dsnot_lowers_the_expected_error_of_wanda(same_sign):
    W, sums, n = layer(inp=256)
    wanda = expected_error(W, epts.wanda_prune(W, sums[1], n, 0.5), sums, n).abs().sum()
    dsnot = pruners.dsnot_prune(W, sums, n, 0.5, ATTN, same_sign=same_sign)
    assert expected_error(W, dsnot, sums, n).abs().sum() < 0.5 * wanda


# End to end ---------------------------------------------------------------------------------------

def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg).eval()


WINDOWS = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
EVAL = torch.randint(0, 64, (128,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("s", [0.5, "2:4"])
def test_prune_end_to_end_on_a_tiny_llama(s, monkeypatch):
    frac, m = epts.pattern(s)
    model = pruners.prune(tiny_llama(), "ria", WINDOWS, s)
    for lin in epts.pruned_linears(model).values():
        gone = lin.weight == 0
        if m is None:
            assert int(gone.sum()) == epts.prune_count(frac, lin.weight.numel())  # per matrix
        else:
            assert (zeros_per_group(lin.weight, m) == m * frac).all()
    assert math.isfinite(epts.perplexity(model, EVAL, 32))

    calls, original = [], pruners.dsnot_prune

    def recording(W, sums, n_tokens, sparsity, name=""):  # DSnoT beside Wanda on the same stats
        out = original(W, sums, n_tokens, sparsity, name)
        calls.append((name, torch.equal(out, epts.wanda_prune(W, sums[1], n_tokens, sparsity))))
        return out

    monkeypatch.setattr(pruners, "dsnot_prune", recording)
    model = pruners.prune(tiny_llama(), "dsnot", WINDOWS, s)
    assert len(calls) == 14
    assert all(same for name, same in calls if name.startswith("mlp."))
    assert not all(same for name, same in calls if name.startswith("self_attn."))
    wanda = epts.prune_sequential(tiny_llama(), WINDOWS, s, epts.wanda_prune, verbose=False)
    for key, lin in epts.pruned_linears(model).items():
        gone = lin.weight == 0
        if m is None:
            assert (gone.sum(1) == epts.prune_count(frac, lin.in_features)).all()  # per row
        else:
            assert (zeros_per_group(lin.weight, m) == m * frac).all()
        if key.startswith("0.mlp."):  # block 0 sees the same stream as Wanda's run: the same mask
            assert torch.equal(gone, epts.pruned_linears(wanda)[key].weight == 0)
    assert math.isfinite(epts.perplexity(model, EVAL, 32))


def test_prune_refuses_an_unknown_method():
    with pytest.raises(epts.EPTSError, match="unknown method 'owl'"):
        pruners.prune(tiny_llama(), "owl", WINDOWS, 0.5)
