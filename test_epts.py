"""Tests for epts.py on tiny random OPT and LLaMA models (CPU, seconds). Each test states one property of EPTS.

Run:  python -m pytest -q test_epts.py
"""
from __future__ import annotations

import copy
import json
import math
import random
import re
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

import epts

HERE = Path(__file__).resolve().parent
WORDS = ("the a model weight sparse dense block layer group mask rank adapter token loss mix feature "
         "prune train deploy elastic low high row column score norm input output text data batch step").split()


# ---------------------------------------------------------------------------------------------- fixtures

def tiny_model(arch: str, n_layers: int = 2, seed: int = 0) -> torch.nn.Module:
    """A tiny random model; init std 0.2 so that pruning visibly changes the outputs."""
    torch.manual_seed(seed)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, ffn_dim=64, num_attention_heads=4,
                        max_position_embeddings=64, word_embed_proj_dim=32, init_std=0.2, dropout=0.0)
        model = OPTForCausalLM(cfg)
    else:  # LLaMA with grouped-query attention: 4 query heads share 2 key/value heads
        cfg = LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=n_layers, intermediate_size=64,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    return model.eval()


def synthetic_text(n_words: int, seed: int = 0) -> str:
    """Text with structure (each word prefers a few successors) so that a model has something to learn."""
    rng = random.Random(seed)
    succ = {w: rng.sample(WORDS, 3) for w in WORDS}
    w, out = WORDS[0], []
    for _ in range(n_words):
        out.append(w)
        w = rng.choice(succ[w]) if rng.random() < 0.9 else rng.choice(WORDS)
    return " ".join(out)


def save_tiny(arch: str, path: Path) -> Path:
    """A tiny model + a word-level tokenizer saved in HF format, loadable by from_pretrained without network."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>")
    fast.save_pretrained(path)
    tiny_model(arch).save_pretrained(path)
    return path


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
    layers = epts.attach_hilora(block, names, norms, cfg, torch.Generator().manual_seed(seed))
    return block, layers, cfg


def unwrap(block, layers):
    """The original linears back in the block, as optimize_block leaves it."""
    for n, layer in layers.items():
        epts.swap_module(block, n, layer.base)


# ---------------------------------------------------------------------------------------------- groups

def test_group_of_boundaries():
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


def test_groups_must_be_contiguous_and_increasing():
    epts.validate_config(epts.EPTSConfig(groups=epts.GROUPS))
    for bad, why in [([(0.0, 0.4), (0.45, 0.5)], "group 0 ends at 0.4 but group 1 starts at 0.45"),  # gap
                     ([(0.0, 0.4), (0.3, 0.5)], "group 0 ends at 0.4 but group 1 starts at 0.3"),    # overlap
                     ([(0.0, 0.5), (0.5, 0.45)], "group 1 = (0.5, 0.45] is empty"),                   # decreasing
                     ([(0.1, 0.4)], "the first group must start at 0")]:
        with pytest.raises(epts.EPTSError, match=re.escape(why)):
            epts.validate_config(epts.EPTSConfig(groups=bad, mixer=(1 / len(bad),) * len(bad)))
    assert len(epts.GROUPS) == len(epts.MIXER_WEIGHTS) == 7 and math.isclose(sum(epts.MIXER_WEIGHTS), 1.0)


def test_stratified_draws_visit_every_subinterval_of_every_group():
    steps = 50
    draws = epts.draw_sparsities(epts.EPTSConfig(), steps, torch.Generator().manual_seed(0))
    assert draws.shape == (steps, 7)
    for k, (lo, hi) in enumerate(epts.GROUPS):
        col = draws[:, k]
        assert bool(((col > lo) & (col <= hi)).all())
        slots = torch.ceil((hi - col) / (hi - lo) * steps) - 1  # which sub-interval each step landed in
        assert sorted(slots.long().tolist()) == list(range(steps))
        assert slots.long().tolist() != list(range(steps))      # ... in shuffled order
    lo, hi = torch.tensor(epts.GROUPS, dtype=torch.float64).T       # one step (Phase 2): one uniform draw per group
    u = torch.rand(7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.equal(epts.draw_sparsities(epts.EPTSConfig(), 1, torch.Generator().manual_seed(3))[0], hi - u * (hi - lo))


# ---------------------------------------------------------------------------------------------- masks (Eq. 1)

def test_masks_have_exact_per_row_sparsity_and_are_nested():
    W, norm = torch.randn(16, 40), torch.rand(40)
    ranks = epts.row_ranks(epts.wanda_scores(W, norm))
    previous = torch.ones_like(W, dtype=torch.bool)
    for s in (0.1, 0.29, 0.3, 0.5, 0.55, 0.7):
        keep = epts.mask_from_ranks(ranks, s)
        assert ((~keep).sum(1) == math.floor(s * 40 + 1e-6)).all()
        assert not (keep & ~previous).any()                  # M(s2) subset of M(s1) for s2 > s1
        previous = keep
    # the pruned weights are the lowest-scoring ones of each row
    keep = epts.mask_from_ranks(ranks, 0.5)
    scores = epts.wanda_scores(W, norm)
    assert (scores.masked_fill(keep, -float("inf")).max(1).values <= scores.masked_fill(~keep, float("inf")).min(1).values).all()


def test_prune_count_is_robust_to_float_error():
    assert epts.prune_count(0.29, 100) == 29                   # 0.29 * 100 = 28.999999999999996
    assert epts.prune_count(0.7, 256) == 179
    assert int(epts.prune_count(torch.tensor([0.29]), 100)) == 29


# ---------------------------------------------------------------------------------------------- MS-HiLoRA (Eq. 2)

def test_elastic_weight_uses_the_inheritance_chain_and_keeps_the_mask_zeros():
    K, r, out_f, in_f = 7, 2, 6, 10
    W, A, B = torch.randn(out_f, in_f), torch.randn(K, r, in_f), torch.randn(K, out_f, r)
    ranks = epts.row_ranks(epts.wanda_scores(W, torch.rand(in_f)))
    s = torch.tensor([0.3, 0.52, 0.68, 0.5], dtype=torch.float64)
    g = torch.tensor([0, 3, 6, -1])
    Ws = epts.elastic_weight(W, ranks, A, B, s, epts.slices_of(s, g, K).chain)
    for i in range(len(g)):
        keep = epts.mask_from_ranks(ranks, float(s[i]))
        chain = sum((B[j] @ A[j] for j in range(int(g[i]) + 1)), torch.zeros(out_f, in_f))
        torch.testing.assert_close(Ws[i], (W + chain) * keep)
        assert torch.equal(Ws[i] == 0, ~keep)                 # exactly the mask's zeros


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_adapters_at_init_change_nothing(arch, windows):
    model = tiny_model(arch)
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    with torch.no_grad():
        s = torch.tensor([0.0, 0.5, 0.5], dtype=torch.float64)
        out = epts.forward_groups(block, layers, X, kwargs, epts.slices_of(s, torch.tensor([6, 3, -1]), 7))
    torch.testing.assert_close(out[0], Y)                    # s = 0 and B = 0: the dense block
    torch.testing.assert_close(out[1], out[2])               # B = 0: adapters add nothing to the mask
    assert (out[1] - Y).abs().max() > 1e-3                   # ... while the mask itself does change the output


@pytest.mark.parametrize("k", [0, 3, 6])
def test_group_k_trains_exactly_adapters_0_to_k(k, windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    for layer in layers.values():  # non-zero B so that A gets gradients too
        layer.B.data.normal_(0, 0.01)
    s = torch.tensor([epts.GROUPS[k][1]], dtype=torch.float64)
    out = epts.forward_groups(block, layers, X, kwargs, epts.slices_of(s, torch.tensor([k]), 7))
    epts.recon_loss(out, Y.unsqueeze(0)).sum().backward()
    for layer in layers.values():
        for p in (layer.A, layer.B):
            norms = p.grad.flatten(1).norm(dim=1)
            assert (norms[: k + 1] > 0).all() and (norms[k + 1:] == 0).all()


# ---------------------------------------------------------------------------------------------- objective (Eq. 3), mixer (Eq. 4)

def test_recon_loss_is_sum_over_tokens_mean_over_the_rest():
    P, T = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    assert torch.isclose(epts.recon_loss(P, T), ((P - T) ** 2).sum(1).mean())


def test_phase1_objective_guides_higher_groups_by_a_detached_low_group_output():
    O = torch.randn(3, 1, 4, 2, requires_grad=True)
    Y = torch.randn(1, 4, 2)
    loss, per_group = epts.phase1_objective(O, Y)
    l = epts.recon_loss
    expected = [l(O[0], Y), 0.5 * l(O[1], O[0]) + 0.5 * l(O[1], Y), 0.5 * l(O[2], O[0]) + 0.5 * l(O[2], Y)]
    torch.testing.assert_close(per_group, torch.stack(expected).detach())
    loss.backward()
    # stop-gradient: O_0 receives only the gradient of L_0 = l(O_0, Y)
    torch.testing.assert_close(O.grad[0], 2 * (O[0] - Y).detach() / 2)


def test_mixer_is_the_weighted_sum():
    outputs = torch.randn(7, 2, 3, 4)
    expected = sum(w * outputs[k] for k, w in enumerate(epts.MIXER_WEIGHTS))
    torch.testing.assert_close(epts.mix_features(outputs, epts.MIXER_WEIGHTS), expected)


# ---------------------------------------------------------------------------------------------- calling blocks

@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_captured_block_kwargs_reproduce_the_models_own_forward(arch, windows):
    model = tiny_model(arch)
    X, kwargs = epts.capture_block_inputs(model, windows[:2])
    with torch.no_grad():
        hidden = model(windows[:2], output_hidden_states=True).hidden_states
        x = X
        for i, block in enumerate(epts.decoder_blocks(model)[:-1]):  # the last entry is after the final norm
            x = epts.call_block(block, x, kwargs)
            torch.testing.assert_close(x, hidden[i + 1], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- the loop: Phase 1, the low-group check, Phase 2, block by block

@pytest.fixture(scope="module")
def optimized():
    """A 2-block LLaMA optimized with EPTS (small settings, the harness's Runtime as the CLI runs it: it also
    records the base model's fingerprint) -> (model, state, windows)."""
    model = tiny_model("llama")
    windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    cfg = epts.EPTSConfig(rank=4, epochs=12, lr=5e-3, batch_size=2)
    state = epts.optimize(model, windows, cfg, runtime=epts.Runtime())
    return model, state, windows


def test_phase1_loss_falls(optimized):
    _, state, _ = optimized
    for report in state.reports:
        first, last = report.loss_history[0], report.loss_history[-1]
        assert len(first) == 7
        assert sum(last) < 0.8 * sum(first)
        # every group above 0 improves; group 0's adapter is shared by all groups through the chain, so its
        # own loss may rise -- that is what the low-group check is for
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
        if k == 0 and not state.low_group_enabled[0]:   # the check switched the adapter off: mask only
            assert errors[0] == errors[1]
        else:
            assert errors[0] < errors[1], f"group {k}: with adapters {errors[0]:.4g} >= mask only {errors[1]:.4g}"
    epts.restore_dense(model, dense)


def test_low_group_check_drops_an_adapter_that_hurts_and_keeps_one_that_helps(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    for layer in layers.values():  # a large random group-0 adapter: it can only make the block worse
        layer.B.data[0].normal_(0, 1.0)
    keep, losses = epts.low_group_check(block, layers, X, Y, kwargs, cfg)
    assert not keep and losses["with_adapter"] > losses["mask_only"]
    # a group-0 adapter trained on the dense stream at low sparsity lowers the loss at 0.3: it is kept
    only_low = epts.EPTSConfig(groups=((0.0, 0.4),), mixer=(1.0,), rank=4, epochs=30, lr=5e-3, batch_size=2)
    unwrap(block, layers)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=only_low)
    epts.phase1_train(block, layers, X, Y, kwargs, only_low, torch.Generator().manual_seed(0))
    keep, losses = epts.low_group_check(block, layers, X, Y, kwargs, only_low)
    assert keep and losses["with_adapter"] < losses["mask_only"]


@pytest.mark.parametrize("keep_low", [True, False])
def test_optimize_block_hands_two_streams_to_the_next_block(keep_low, windows, monkeypatch):
    """next X_dense = f(X_dense; W); next X_mix = sum_k w_k f(X_mix; W_{s_k}), group 0 with the mask only when
    the low-group check switched its adapter off (as deploy will use it)."""
    model = tiny_model("opt")
    X_dense, kwargs, Y = block0_io(model, windows)
    X_mix = X_dense + 0.1 * torch.randn(X_dense.shape, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(epts, "low_group_check", lambda *a, **k: (keep_low, {}))
    block, names = epts.decoder_blocks(model)[0], epts.arch_of(model)[1]
    cfg = epts.EPTSConfig(rank=2, epochs=2, lr=5e-3, batch_size=2)
    adapters, norms, report, next_dense, next_mix = epts.optimize_block(block, names, X_dense, X_mix, kwargs,
                                                                        cfg, 0)
    torch.testing.assert_close(next_dense, Y)
    expected = torch.zeros_like(X_mix)
    for k, (s, w) in enumerate(zip(report.mix_sparsities, cfg.mixer)):
        pruned = copy.deepcopy(block)
        for n in names:
            lin = pruned.get_submodule(n)
            ranks = epts.row_ranks(epts.wanda_scores(lin.weight, norms[n]))
            g = epts.NO_ADAPTER if k == 0 and not keep_low else k
            with torch.no_grad():
                one = epts.slices_of(torch.tensor([s], dtype=torch.float64), torch.tensor([g]), 7)
                lin.weight.copy_(epts.elastic_weight(lin.weight, ranks, *adapters[n], one.sparsity, one.chain)[0])
        with torch.no_grad():
            expected += w * epts.call_block(pruned, X_mix, kwargs)
    torch.testing.assert_close(next_mix, expected, rtol=1e-4, atol=1e-5)
    assert any(B.abs().max() > 0 for _, B in adapters.values())


# ---------------------------------------------------------------------------------------------- the tuned recipe

def test_tuned_recipe_is_named_switches_on_top_of_the_paper_defaults():
    paper, tuned = epts.recipe_config("paper"), epts.recipe_config("tuned", epochs=3)
    assert paper == epts.EPTSConfig()                                  # the default stays the paper's recipe
    assert (tuned.group0_input, tuned.stop_chain_grad, tuned.group0_ramp, tuned.low_gain, tuned.rank, tuned.epochs,
            tuned.recipe) == ("dense", True, True, "fit", 32, 3, "tuned")
    assert epts.dedicated_config(tuned, 0.5).group0_ramp is False      # a dedicated run stays the plain baseline
    cfg, _ = epts.configs_from_args(epts.parse_args(["--model", "m", "--recipe", "tuned"]))
    assert cfg == epts.recipe_config("tuned")
    assert epts.configs_from_args(epts.parse_args(["--model", "m", "--recipe", "tuned", "--rank", "4"]))[0].rank == 4


def test_group0_gain_ramps_with_s_inside_group_0_only():
    """g(s) = gamma * s / hi_0 scales B_0 A_0 in slices of group 0, 1 in every other group; the paper's recipe
    leaves the chain as it is."""
    s = torch.tensor([0.1, 0.4, 0.45, 0.7], dtype=torch.float64)
    paper = epts.slices_of(s, torch.tensor([0, 0, 1, 6]), 7)
    for ramp, gain in ((True, [0.125, 0.5, 1.0, 1.0]), (False, [0.5, 0.5, 1.0, 1.0])):
        chain = epts.tuned_slices(paper, 0.4, ramp, 0.5).chain
        torch.testing.assert_close(chain[:, 0], torch.tensor(gain))
        assert torch.equal(chain[:, 1:], paper.chain[:, 1:])
    assert epts.tuned_slices(paper, 0.4, False) is paper
    # in Eq. 2 the gain scales B_0 A_0 only: group 1 at gain 0 for its slice-0 neighbour is the plain chain
    W, ranks = torch.randn(6, 8), epts.row_ranks(torch.rand(6, 8))
    A, B = torch.randn(2, 2, 8), torch.randn(2, 6, 2)
    sp, grp = torch.tensor([0.2, 0.5], dtype=torch.float64), torch.tensor([0, 1])
    tuned = epts.tuned_slices(epts.slices_of(sp, grp, 2), 0.4, gamma=0.0)
    got = epts.elastic_weight(W, ranks, A, B, tuned.sparsity, tuned.chain)
    torch.testing.assert_close(got[0], W * epts.mask_from_ranks(ranks, 0.2))           # gain 0: the mask alone
    torch.testing.assert_close(got[1], epts.elastic_weight(W, ranks, A, B, sp, epts.slices_of(sp, grp, 2).chain)[1])


def test_stop_chain_grad_lets_b0_learn_from_group_0_only(windows):
    """With stop_chain_grad a loss of groups >= 1 sends no gradient to B_0 (and group 0's loss still does)."""
    W, ranks = torch.randn(6, 8), epts.row_ranks(torch.rand(6, 8))
    A, B = torch.randn(3, 2, 8), torch.randn(3, 6, 2, requires_grad=True)
    sp = torch.tensor([0.2, 0.42, 0.48], dtype=torch.float64)
    def grad_of_b0(sp, group, stop):
        B.grad = None
        sl = epts.tuned_slices(epts.slices_of(sp, group, 3), 0.4, stop_chain_grad=stop)
        epts.elastic_weight(W, ranks, A, B, sl.sparsity, sl.chain, sl.frozen).sum().backward()
        assert B.grad[group.max()].abs().sum() > 0
        return bool(B.grad[0].abs().sum() > 0)
    assert not grad_of_b0(sp[1:], torch.tensor([1, 2]), True) and grad_of_b0(sp[1:], torch.tensor([1, 2]), False)
    assert grad_of_b0(sp[:1], torch.tensor([0]), True)


def test_group_0_on_the_dense_stream_feeds_slice_0_its_own_input(windows):
    model = tiny_model("opt")
    X, kwargs, _ = block0_io(model, windows)
    block, layers, _ = hilora_block(model, X, kwargs)
    X_mix = X + 0.3 * torch.randn(X.shape, generator=torch.Generator().manual_seed(2))
    s, g = torch.tensor([0.3, 0.5, 0.6], dtype=torch.float64), torch.tensor([0, 2, 4])
    sl = epts.tuned_slices(epts.slices_of(s, g, 7), 0.4, group0_dense=True)
    with torch.no_grad():
        both = epts.forward_groups(block, layers, X_mix, kwargs, sl, X)
        torch.testing.assert_close(both[0], epts.forward_groups(block, layers, X, kwargs, epts.slices_of(s[:1], g[:1], 7))[0])
        torch.testing.assert_close(both[1:], epts.forward_groups(block, layers, X_mix, kwargs, epts.slices_of(s[1:], g[1:], 7)))
        fast = epts.Runtime().forward_groups(block, layers, X_mix, kwargs, sl, X)   # the batched fast path
        torch.testing.assert_close(fast, both, rtol=1e-5, atol=1e-5)


def test_fitted_gain_is_0_for_an_adapter_that_only_hurts_and_deploys_the_mask_alone(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, layers, _ = hilora_block(model, X, kwargs)
    cfg = epts.recipe_config("tuned", rank=4)
    for layer in layers.values():  # a large random group-0 adapter: it can only make the block worse
        layer.B.data[0].normal_(0, 1.0)
    gamma, info = epts.fit_low_gain(block, layers, X, Y, kwargs, cfg)
    assert gamma == 0.0 and min(info["relative_loss"]) == info["relative_loss"][0] == pytest.approx(4.0)
    # deploy then writes exactly the mask-only weights W * M(s) everywhere in group 0
    names = epts.arch_of(model)[1]
    adapters = {n: (l.A.detach().clone(), l.B.detach().clone()) for n, l in layers.items()}
    unwrap(block, layers)
    _, norms = epts.dense_targets_and_norms(block, names, X, kwargs, chunk=2)
    state = epts.ElasticState(groups=list(cfg.groups), mixer=list(cfg.mixer), rank=4, group0_ramp=True,
                              group0_gains=[gamma] * 2)
    for i in range(2):  # block 1 reuses block 0's adapters and norms: only the shapes matter to deploy
        state.adapters.update({f"{i}.{n}": a for n, a in adapters.items()})
        state.act_norms.update({f"{i}.{n}": v for n, v in norms.items()})
    dense = epts.snapshot_linears(model)
    for s in (0.05, 0.2, 0.4):
        epts.deploy(model, state, s, dense)
        for key, lin in epts.pruned_linears(model).items():
            ranks = epts.row_ranks(epts.wanda_scores(dense[key], state.act_norms[key]))
            assert torch.equal(lin.weight, dense[key] * epts.mask_from_ranks(ranks, s))
    epts.restore_dense(model, dense)


def test_fitted_gain_keeps_an_adapter_trained_for_group_0(windows):
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    only_low = epts.recipe_config("tuned", groups=((0.0, 0.4),), mixer=(1.0,), rank=4, epochs=30, lr=5e-3,
                                  batch_size=2)
    block, layers, _ = hilora_block(model, X, kwargs, cfg=only_low)
    epts.phase1_train(block, layers, X, Y, kwargs, only_low, torch.Generator().manual_seed(0), X_dense=X)
    gamma, info = epts.fit_low_gain(block, layers, X, Y, kwargs, only_low)
    assert gamma > 0 and min(info["relative_loss"]) < info["relative_loss"][0]


def test_tuned_recipe_end_to_end_saves_loads_and_deploys_the_same_weights(tmp_path):
    model = tiny_model("llama")
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
    state = epts.optimize(model, windows, epts.recipe_config("tuned", rank=2, epochs=2, batch_size=2))
    assert state.group0_ramp and all(0.0 <= r.low_gain <= 1.0 for r in state.reports)
    epts.save_elastic(state, str(tmp_path / "t.safetensors"))
    loaded = epts.load_elastic(str(tmp_path / "t.safetensors"))
    assert loaded.group0_ramp and loaded.group0_gains == state.group0_gains
    dense = epts.snapshot_linears(model)
    for s in (0.1, 0.35, 0.6):
        epts.deploy(model, state, s, dense)
        a = {k: v.weight.clone() for k, v in epts.pruned_linears(model).items()}
        epts.deploy(model, loaded, s, dense)
        assert all(torch.equal(a[k], v.weight) for k, v in epts.pruned_linears(model).items())
        assert epts.measured_sparsity(model) > 0
    epts.restore_dense(model, dense)


# ---------------------------------------------------------------------------------------------- deploy and the artifact

def test_deploy_gives_exact_sparsity_and_finite_ppl(optimized):
    model, state, windows = optimized
    dense = epts.snapshot_linears(model)
    tokens = windows.flatten()
    for s in (0.0, 0.3, 0.45, 0.6, 0.7):
        epts.deploy(model, state, s, dense)
        for key, lin in epts.pruned_linears(model).items():
            zeros_per_row = (lin.weight == 0).sum(1)
            assert (zeros_per_row == math.floor(s * lin.in_features + 1e-6)).all(), key
        assert math.isfinite(epts.perplexity(model, tokens, 32))
    # non-uniform: one sparsity per block
    epts.deploy(model, state, [0.35, 0.65], dense)
    lins = epts.pruned_linears(model)
    assert ((lins["0.mlp.up_proj"].weight == 0).sum(1) == math.floor(0.35 * 32)).all()
    assert ((lins["1.mlp.up_proj"].weight == 0).sum(1) == math.floor(0.65 * 32)).all()
    with pytest.raises(epts.EPTSError):
        epts.deploy(model, state, [0.3], dense)
    epts.deploy(model, state, 0.0, dense)
    for key, lin in epts.pruned_linears(model).items():
        assert torch.equal(lin.weight, dense[key])           # s = 0 is the dense model


def test_save_load_deploy_equals_deploy_in_memory(optimized, tmp_path):
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    epts.save_elastic(state, str(tmp_path / "elastic.safetensors"))
    loaded = epts.load_elastic(str(tmp_path / "elastic.safetensors"))
    assert loaded.low_group_enabled == state.low_group_enabled and loaded.groups == state.groups
    for s in (0.35, [0.5, 0.7]):
        epts.deploy(model, state, s, dense)
        a = {k: v.weight.clone() for k, v in epts.pruned_linears(model).items()}
        epts.deploy(model, loaded, s, dense)
        for k, v in epts.pruned_linears(model).items():
            assert torch.equal(a[k], v.weight)
    epts.restore_dense(model, dense)
    epts.check_fingerprint(loaded, model, "tiny")
    with pytest.raises(epts.EPTSError, match="made for base model"):
        epts.check_fingerprint(loaded, tiny_model("llama", seed=1), "other")


# ---------------------------------------------------------------------------------------------- N:M patterns

def test_nm_masks_prune_n_lowest_of_every_m_and_are_nested():
    W, norm = torch.randn(6, 16), torch.rand(16)
    scores = epts.wanda_scores(W, norm)
    ranks = epts.nm_ranks(scores, 4)
    previous = torch.ones_like(W, dtype=torch.bool)
    for n in (1, 2, 3):
        keep = epts.mask_from_ranks(ranks, n / 4).view(6, 4, 4)
        assert ((~keep).sum(-1) == n).all()                                  # exactly N zeros in every group of 4
        g = scores.view(6, 4, 4)
        assert (g.masked_fill(keep, -1).max(-1).values <= g.masked_fill(~keep, float("inf")).min(-1).values).all()
        assert not (keep.view(6, 16) & ~previous).any()                      # 1:4 within 2:4 within 3:4
        previous = keep.view(6, 16)
    assert epts.pattern("2:4") == (0.5, 4) and epts.pattern(0.3) == (0.3, None)
    for bad in ("4:2", "0:4", "2-4", "a:b"):
        with pytest.raises(epts.EPTSError):
            epts.pattern(bad)


def test_sparsegpt_nm_chooses_n_of_every_m_adaptively():
    g = torch.Generator().manual_seed(0)
    X, W = torch.randn(512, 64, generator=g), torch.randn(16, 64, generator=g)
    Wp = epts.sparsegpt_prune(W, epts.gram(X), 512, "2:4")
    assert ((Wp.view(16, 16, 4) == 0).sum(-1) == 2).all()
    W_wanda = epts.wanda_prune(W, epts.sum_of_squares(X), 512, "2:4")
    err = lambda Wq: float(((X @ (Wq - W).T) ** 2).mean())
    assert err(Wp) < err(W_wanda)                                            # the OBS update pays at N:M too


def test_elastic_model_deploys_at_nm_with_the_adapters_of_the_group_of_n_over_m(optimized):
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    epts.deploy(model, state, "2:4", dense)
    for key, lin in epts.pruned_linears(model).items():
        ranks = epts.nm_ranks(epts.wanda_scores(dense[key], state.act_norms[key]), 4)
        one = epts.slices_of(torch.tensor([0.5], dtype=torch.float64), torch.tensor([epts.group_of(0.5)]), 7)
        expected = epts.elastic_weight(dense[key], ranks, *state.adapters[key], one.sparsity, one.chain)[0]
        torch.testing.assert_close(lin.weight, expected)
        assert ((lin.weight.view(lin.out_features, -1, 4) == 0).sum(-1) == 2).all()
    epts.restore_dense(model, dense)


@pytest.mark.parametrize("arch, nm", [("opt", "2:4"), ("llama", "4:8")])
def test_every_method_exports_an_exact_nm_model(arch, nm, tiny_dir, tmp_path):
    from safetensors.torch import load_file
    n, m = map(int, nm.split(":"))
    for method in epts.METHODS:
        out = tmp_path / method
        code, _, err = run_cli(*cli(tiny_dir, arch, "--method", method, "--epochs", "1", "--rank", "2", "--pattern",
                                    nm, "--export-sparsity", nm, "--export-dir", out, "--eval", "none"))
        assert code == 0, err
        weights = load_file(str(out / "model.safetensors"))
        linears = [v for k, v in weights.items() if v.dim() == 2 and ("proj" in k or "fc" in k)]
        assert len(linears) == len(epts.pruned_linears(tiny_model(arch)))
        for v in linears:                                                    # at least N zeros in every group of M
            assert ((v.view(v.shape[0], -1, m) == 0).sum(-1) >= n).all(), method


def test_pattern_rows_are_labelled_nm(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--method", "wanda", "--pattern", "2:4", "--json-out", out))
    row = json.loads(out.read_text())["results"][0]
    assert code == 0 and row["sparsity"] == "2:4" and row["achieved_sparsity"] == 0.5 and "     2:4" in printed


def test_nm_training_adds_one_slice_that_trains_the_group_of_n_over_m_on_nm_masks(windows):
    cfg = epts.EPTSConfig(nm_train="2:4")
    groups, draws, nm = epts.phase1_groups(cfg, 5, torch.Generator().manual_seed(0), torch.device("cpu"))
    plain = epts.phase1_groups(epts.EPTSConfig(), 5, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert groups.tolist() == list(range(7)) + [2] and plain[2] is None
    assert torch.equal(draws[:, :7], plain[1]) and (draws[:, 7] == 0.5).all()   # the paper's draws unchanged
    assert nm.tolist() == [False] * 7 + [True]
    model = tiny_model("llama")
    X, kwargs, Y = block0_io(model, windows)
    block, names = epts.decoder_blocks(model)[0], epts.arch_of(model)[1]
    _, norms = epts.dense_targets_and_norms(block, names, X, kwargs, chunk=2)
    ref = copy.deepcopy(model)
    layers = epts.attach_hilora(block, names, norms, epts.EPTSConfig(rank=2, nm_train="2:4"),
                                torch.Generator().manual_seed(0))
    s = torch.tensor([0.5, 0.5], dtype=torch.float64)
    with torch.no_grad():
        slices = epts.slices_of(s, torch.tensor([2, 2]), 7, nm=torch.tensor([False, True]))
        out = epts.forward_groups(block, layers, X[:2], kwargs, slices)
        for n in names:                                                      # B = 0: plain W * M_{2:4}
            lin = epts.decoder_blocks(ref)[0].get_submodule(n)
            lin.weight.mul_(epts.mask_from_ranks(layers[n].nm_ranks, 0.5))
        expected = epts.call_block(epts.decoder_blocks(ref)[0], X[:2], kwargs)
    torch.testing.assert_close(out[1], expected)
    assert not torch.allclose(out[0], out[1])                                # slice 0: the unstructured mask


# ---------------------------------------------------------------------------------------------- the method on its own, and the reading order

def method_source() -> str:
    """epts.py above the harness banner: sections 0-8, the method."""
    text = (HERE / "epts.py").read_text()
    return text[:text.index("# ===== harness: nothing below changes the math =====")]


def test_the_method_above_the_banner_runs_on_its_own_with_both_recipes():
    """Copy sections 0-8 into a fresh module: optimize and deploy run on a tiny OPT and a tiny LLaMA, with both
    recipes, and give the model that epts.py (the plain runtime) gives."""
    import types
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
                    state = lib.optimize(model, windows, lib.recipe_config(recipe, rank=2, epochs=2, batch_size=2))
                    lib.deploy(model, state, 0.5, dense)
                    with torch.no_grad():
                        outs.append(model(windows).logits)
                assert torch.equal(*outs), (arch, recipe)
    finally:
        del sys.modules["epts_copied"]


def test_every_name_the_method_uses_is_defined_above_the_banner():
    """No name from below the banner (the harness, tqdm, ...) is used by sections 0-8: each is defined or
    imported above it, a builtin, or a local of the function that uses it."""
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
            assert isinstance(node, ast.Import) or node.module in ("__future__", "dataclasses", "typing") or \
                node.module.split(".")[0] in ("torch", "transformers"), node.module
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert used <= defined, used - defined


def test_epts_py_reads_method_first_then_harness():
    """The method (sections 0-8) fits above one banner; no function is long enough to hide a second idea."""
    import ast
    lines = (HERE / "epts.py").read_text().splitlines()
    banner = lines.index("# ===== harness: nothing below changes the math =====")
    assert banner <= 760 and len(lines) <= 2400
    assert next(i for i, l in enumerate(lines) if l.startswith("def wanda_scores")) < 199
    tree = ast.parse("\n".join(lines))
    length = {n.name: n.end_lineno - n.lineno + 1 + len(n.decorator_list) for n in ast.walk(tree)
              if isinstance(n, ast.FunctionDef)}
    assert max(length.values()) <= 60, max(length.items(), key=lambda kv: kv[1])
    assert length["phase1_train"] <= 30  # the paper's loop: draws, Adam, cosine, one named step per Phase-1 step
    method = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.lineno < banner}
    assert {"wanda_scores", "elastic_weight", "phase1_objective", "mix_features", "phase1_train", "PlainRuntime",
            "low_group_check", "phase2_mix", "optimize_block", "optimize", "deploy", "tuned_slices"} <= method
    assert not {"maybe_cuda_graph", "Runtime", "fused_merge", "prune_sequential", "save_elastic", "perplexity",
                "main"} & method


# ============================================================================================== the harness

# ---------------------------------------------------------------------------------------------- fast paths, each equal to its plain path (harness)

@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_batched_group_forward_equals_one_forward_per_group(arch, windows):
    model = tiny_model(arch)
    X, kwargs, _ = block0_io(model, windows)
    block, layers, cfg = hilora_block(model, X, kwargs)
    for layer in layers.values():
        layer.B.data.normal_(0, 0.05)
    s = epts.draw_sparsities(epts.EPTSConfig(), 1, torch.Generator().manual_seed(1))[0]
    g = torch.arange(7)
    with torch.no_grad():
        fast = epts.Runtime().forward_groups(block, layers, X[:2], kwargs, epts.slices_of(s, g, 7))
        ref = epts.forward_groups(block, layers, X[:2], kwargs, epts.slices_of(s, g, 7))
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_fast_path_equals_reference_loop_with_an_uneven_last_batch(monkeypatch):
    """Batching the 7 group forwards is an implementation detail: same adapters after training (fp32, CPU).
    5 samples in batches of 2: the last batch holds one sample, and every sample is trained on every epoch."""
    seen, real = [], epts.Runtime.forward_groups
    monkeypatch.setattr(epts.Runtime, "forward_groups", lambda self, block, layers, x, *a, **k: seen.append(len(x)) or
                        real(self, block, layers, x, *a, **k))
    states = []
    for reference in (False, True):
        seen.clear()
        model = tiny_model("opt", n_layers=1)
        windows = torch.randint(0, 64, (5, 32), generator=torch.Generator().manual_seed(2))
        cfg = epts.EPTSConfig(rank=4, epochs=2, lr=1e-3, batch_size=2)
        states.append(epts.optimize(model, windows, cfg,
                                    runtime=epts.Runtime(reference_loop=reference)))
        assert seen[:6] == [2, 2, 1] * 2                           # Phase 1: 2 epochs of batches 2, 2, 1
    for key, (A, B) in states[0].adapters.items():
        torch.testing.assert_close(A, states[1].adapters[key][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(B, states[1].adapters[key][1], rtol=1e-4, atol=1e-6)
    assert any(B.abs().max() > 0 for _, B in states[0].adapters.values())


@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_low_memory_mode_gives_the_same_adapters_and_streams(recipe):
    """Runtime.low_memory (streams in host memory, Phase 1 one group at a time) sums the same gradient of Eq. 3."""
    model = tiny_model("opt")
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    cfg = epts.recipe_config(recipe, rank=2, epochs=2, batch_size=2, lr=5e-3)
    plain = epts.optimize(model, windows, cfg)
    low = epts.optimize(model, windows, cfg, runtime=epts.Runtime(low_memory=True))
    for key, (A, B) in plain.adapters.items():
        torch.testing.assert_close(low.adapters[key][0], A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(low.adapters[key][1], B, rtol=1e-4, atol=1e-6)
    assert [r.low_group_enabled for r in low.reports] == [r.low_group_enabled for r in plain.reports]
    for a, b in zip(low.reports, plain.reports):
        assert sum(a.loss_history, []) == pytest.approx(sum(b.loss_history, []), rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_step_equals_the_eager_step():
    """The CUDA graph only replays the same step: adapters after training match eager steps (bf16 tolerance)."""
    states = []
    for graph in (False, True):
        model = tiny_model("llama", n_layers=1)
        windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(4))
        states.append(epts.optimize(model, windows, epts.EPTSConfig(rank=4, epochs=3, lr=5e-3, batch_size=2),
                                    "cuda", runtime=epts.Runtime(cuda_graph=graph)))
    for key, (A, B) in states[0].adapters.items():
        torch.testing.assert_close(states[1].adapters[key][0], A, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(states[1].adapters[key][1], B, rtol=2e-2, atol=1e-3)
    assert any(B.abs().max() > 0 for _, B in states[0].adapters.values())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_fused_merge_trains_the_same_adapters_as_the_plain_merge(recipe, monkeypatch):
    """The compiled merge of Phase 1 (CUDA autocast) is a speed trick: adapters and losses match the plain merge's
    within bf16 noise (its gradient's memory layout may change the next matmul's rounding; at the LLaMA-7B shape
    the adapters agree to 2e-8)."""
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(epts, "fused_merge", lambda: epts.plain_merge)
        model = tiny_model("llama", n_layers=1)
        windows = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(4))
        runs.append(epts.optimize(model, windows, epts.recipe_config(recipe, rank=4, epochs=3, lr=5e-3), "cuda",
                                  runtime=epts.Runtime()))
    for key, (A, B) in runs[0].adapters.items():
        torch.testing.assert_close(runs[1].adapters[key][0], A, rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(runs[1].adapters[key][1], B, rtol=2e-2, atol=1e-3)
    assert sum(runs[0].reports[0].loss_history, []) == pytest.approx(sum(runs[1].reports[0].loss_history, []),
                                                                     rel=1e-3)


# ---------------------------------------------------------------------------------------------- many processes (torchrun)

def rank_main(r: int, world: int, port: int, args: list, interrupt_at: int | None) -> None:
    """One rank of run_ranks: the environment torchrun gives rank r, one thread, epts.main(args)."""
    import os
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    real = epts.optimize_block
    if interrupt_at is not None:
        epts.optimize_block = lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt) if a[6] == interrupt_at \
            else real(*a, **k)
    sys.exit(epts.main([str(a) for a in args]))


def run_ranks(world: int, args, interrupt_at: int | None = None) -> list[int]:
    """epts.main(args) in `world` processes started from this one, each as torchrun starts a rank, with one thread
    (gloo on the CPU); returns their exit codes. interrupt_at: every rank gets Ctrl-C there. Forked (fast) unless
    this process has initialized CUDA, which a forked child cannot use: then spawned."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, interrupt_at)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        if p.exitcode is None:
            p.kill()
    return [p.exitcode for p in procs]


def one_thread_cli(*args) -> tuple[int, str, str]:
    """run_cli with one thread, as each rank of run_ranks."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_cli(*args)
    finally:
        torch.set_num_threads(threads)


def max_state_difference(a: epts.ElasticState, b: epts.ElasticState) -> float:
    """max |a - b| over every adapter, activation norm and group-0 gain; the flags must be equal."""
    assert set(a.adapters) == set(b.adapters) and a.low_group_enabled == b.low_group_enabled
    diffs = [(x - y).abs().max().item() for k in a.adapters for x, y in zip((*a.adapters[k], a.act_norms[k]),
                                                                           (*b.adapters[k], b.act_norms[k]))]
    return max(diffs + [abs(x - y) for x, y in zip(a.group0_gains, b.group0_gains)])


@pytest.mark.parametrize("arch,recipe,nsamples", [("opt", "paper", "12"),   # targets in chunks of 8: 8 + 4 samples
                                                  ("llama", "tuned", "4")])  # one chunk: rank 1 sends none
def test_two_ranks_write_the_artifact_of_one_process(arch, recipe, nsamples, tiny_dir, tmp_path):
    """torchrun with 2 ranks (gloo): rank r runs the group slices r, r+2, .. and the dense targets' chunks r, r+2, ..;
    the adapters, flags and gains are one process's up to float reassociation (the --low-memory test's bound), the
    activation norms exactly; only rank 0 writes."""
    run = cli(tiny_dir, arch, "--epochs", "2", "--recipe", recipe, "--eval", "none", "--save-dtype", "float32",
              "--nsamples", nsamples)
    assert one_thread_cli(*run, "--save", tmp_path / "one.safetensors")[0] == 0
    two = tmp_path / "two"
    assert run_ranks(2, [*run, "--save", two / "s.safetensors", "--json-out", two / "r.json"]) == [0, 0]
    one, both = epts.load_elastic(str(tmp_path / "one.safetensors")), epts.load_elastic(str(two / "s.safetensors"))
    assert max_state_difference(one, both) <= 1e-4
    assert all(torch.equal(one.act_norms[k], both.act_norms[k]) for k in one.act_norms)  # Wanda's, bit for bit
    assert any(B.abs().max() > 0 for _, B in both.adapters.values())
    res = json.loads((two / "r.json").read_text())
    assert res["world_size"] == 2 and res["groups_by_rank"] == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(p.name for p in two.iterdir()) == ["r.json", "s.safetensors"]  # no checkpoint left


def test_a_resumed_two_rank_run_equals_a_straight_one(tiny_dir, tmp_path):
    """Ctrl-C in block 1 of a 2-rank run leaves rank 0's checkpoint of block 0; --resume under 2 ranks (one slice
    at a time: --low-memory) finishes it with the straight run's result."""
    run = cli(tiny_dir, "llama", "--epochs", "2", "--eval", "none", "--save-dtype", "float32", "--low-memory",
              "--nsamples", "8")  # targets in chunks of 2: 2 per rank, added in one process's order
    assert one_thread_cli(*run, "--save", tmp_path / "straight.safetensors")[0] == 0
    cut = [*run, "--save", tmp_path / "cut.safetensors"]
    assert run_ranks(2, cut, interrupt_at=1) == [130, 130]
    assert epts._read(str(tmp_path / "cut.safetensors.checkpoint"))[1]["next_block"] == 1
    assert run_ranks(2, [*cut, "--resume"]) == [0, 0]
    assert not (tmp_path / "cut.safetensors.checkpoint").exists()
    straight, resumed = (epts.load_elastic(str(tmp_path / f"{n}.safetensors")) for n in ("straight", "cut"))
    assert max_state_difference(straight, resumed) <= 1e-4
    assert all(torch.equal(straight.act_norms[k], resumed.act_norms[k]) for k in straight.act_norms)


def test_ranks_give_each_block_back_the_tensors_it_was_loaded_as(tiny_dir):
    """DistributedRuntime hands every finished block back the very tensors it was loaded as (with the checkpoint's
    dtype transformers maps the safetensors files: the ranks share one copy of the model through the page cache),
    where blocks_on copies each block back (bf16 here: the blocks optimize in fp32, so a copy is visible on the CPU
    too); the adapters are the same (a process group of one rank, gloo)."""
    model, _ = epts.load_model(str(tiny_dir / "opt"), "bfloat16", torch.device("cpu"), verbose=False)
    loaded = [p.untyped_storage().data_ptr() for p in model.parameters()]
    windows = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = epts.EPTSConfig(rank=2, epochs=1)
    torch.distributed.init_process_group("gloo", rank=0, world_size=1, store=torch.distributed.HashStore())
    try:
        ranks = epts.optimize(model, windows, cfg, runtime=epts.DistributedRuntime())
    finally:
        torch.distributed.destroy_process_group()
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == loaded
    assert max_state_difference(ranks, epts.optimize(model, windows, cfg, runtime=epts.Runtime())) <= 1e-6
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] != loaded  # one process: copied back


def test_a_bad_world_size_is_one_line_on_rank_0_and_silence_elsewhere(tiny_dir, monkeypatch, capfd):
    """More ranks than group slices, more ranks than GPUs, or a method torchrun does not split: one line and exit 2
    before any work and without a process group; ranks > 0 print nothing."""
    no_work(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    one_line_error(*run_cli(*cli(tiny_dir, "opt"))[::2], "torchrun started 8 ranks, but Phase 1 has 7 group slices")
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--method", "wanda"))[::2], "--method wanda runs in one process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = cli(tiny_dir, "opt")
    args[args.index("--device") + 1] = "cuda"
    one_line_error(*run_cli(*args)[::2], "torchrun started 2 ranks on this machine, but it has 1 GPU(s)")
    assert not torch.distributed.is_initialized()
    capfd.readouterr()
    assert run_ranks(8, cli(tiny_dir, "opt")) == [2] * 8  # 8 real ranks: the one line comes from rank 0 alone
    out, err = capfd.readouterr()
    assert out == "" and [l for l in err.splitlines() if l] == [
        "error: torchrun started 8 ranks, but Phase 1 has 7 group slices to split: use --nproc-per-node 7 or fewer"]


# ---------------------------------------------------------------------------------------------- evaluation

def test_perplexity_matches_a_hand_computation():
    model = tiny_model("opt", n_layers=1)
    tokens = torch.arange(21) % 64                           # 2 windows of 10 tokens, one token dropped
    with torch.no_grad():
        nll = []
        for w in tokens[:20].view(2, 10):
            logp = torch.log_softmax(model(w.view(1, -1)).logits[0].float(), -1)
            nll += [-logp[t, w[t + 1]] for t in range(9)]
    assert math.isclose(epts.perplexity(model, tokens, 10, batch_size=1), math.exp(sum(nll) / len(nll)),
                        rel_tol=1e-5)


def test_wanda_prunes_each_row_and_magnitude_each_matrix(windows):
    model = tiny_model("opt")
    epts.prune_sequential(model, windows, 0.5, epts.wanda_prune)
    for lin in epts.pruned_linears(model).values():
        assert ((lin.weight == 0).sum(1) == lin.in_features // 2).all()
    model = tiny_model("opt")
    dense = epts.snapshot_linears(model)
    epts.prune_magnitude(model, 0.3)                        # one threshold per matrix, as Wanda's/SparseGPT's repos
    for key, lin in epts.pruned_linears(model).items():
        pruned, W = lin.weight == 0, dense[key].abs()
        assert int(pruned.sum()) == math.floor(0.3 * W.numel() + 1e-6)
        assert W[pruned].max() <= W[~pruned].min()           # the smallest |W| of the whole matrix
        assert len(set(pruned.sum(1).tolist())) > 1          # ... so rows lose different numbers of weights


# ---------------------------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    (root / "calib.txt").write_text(synthetic_text(3000, seed=0))
    (root / "eval.txt").write_text(synthetic_text(1000, seed=1))
    for arch in ("opt", "llama"):
        save_tiny(arch, root / arch)
    return root


@pytest.fixture(scope="module")
def saved_state(tiny_dir, tmp_path_factory) -> Path:
    """An elastic state of the tiny OPT saved by the CLI, optimized on windows of 16 tokens (the default is 64)."""
    art = tmp_path_factory.mktemp("state") / "s.safetensors"
    args = cli(tiny_dir, "opt", "--epochs", "1", "--rank", "2", "--eval", "none", "--save", art)
    args[args.index("--seqlen") + 1] = "16"
    assert run_cli(*args)[0] == 0
    return art


def cli(tiny_dir, arch, *extra):
    return ["--model", str(tiny_dir / arch), "--calib", str(tiny_dir / "calib.txt"), "--eval",
            str(tiny_dir / "eval.txt"), "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--quiet", *extra]


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_cli_end_to_end(arch, tiny_dir, tmp_path, capsys):
    out = tmp_path / "r.json"
    art = tmp_path / "elastic.safetensors"
    assert epts.main(cli(tiny_dir, arch, "--epochs", "1", "--sparsities", "0.5", "0.7", "--json-out", str(out),
                         "--save", str(art))) == 0
    res = json.loads(out.read_text())
    assert set(res) >= {"model", "method", "config", "dense", "results", "optimize_seconds"}
    assert [r["sparsity"] for r in res["results"]] == [0.5, 0.7]
    lins = epts.pruned_linears(tiny_model(arch)).values()
    for r in res["results"]:
        assert set(r) == {"sparsity", "achieved_sparsity", "ppl", "seconds"}
        zeros = sum(l.out_features * math.floor(r["sparsity"] * l.in_features + 1e-6) for l in lins)
        assert r["achieved_sparsity"] == zeros / sum(l.weight.numel() for l in lins)
        assert math.isfinite(r["ppl"][str(tiny_dir / "eval.txt")])
    assert "achieved" in capsys.readouterr().out
    # --load skips optimization and reproduces the same numbers; --export writes a plain transformers model
    out2, export = tmp_path / "r2.json", tmp_path / "export"
    assert epts.main(cli(tiny_dir, arch, "--sparsities", "0.5", "0.7", "--load", str(art), "--json-out", str(out2),
                         "--export-sparsity", "0.7", "--export-dir", str(export))) == 0
    res2 = json.loads(out2.read_text())
    assert res2["optimize_seconds"] == 0.0
    assert [r["ppl"] for r in res2["results"]] == [r["ppl"] for r in res["results"]]
    code = ("import sys, math; from transformers import AutoModelForCausalLM as M; m = M.from_pretrained(sys.argv[1]);"
            "assert 'epts' not in sys.modules; ws = [p for n, p in m.named_parameters() if p.dim() == 2 and ('proj' in n or 'fc' in n)];"
            "print(all(((w == 0).sum(1) == math.floor(0.7 * w.shape[1] + 1e-6)).all() for w in ws), len(ws))")
    printed = subprocess.run([sys.executable, "-c", code, str(export)], capture_output=True, text=True, check=True)
    assert printed.stdout.split() == ["True", str(len(lins))]     # exactly floor(0.7 * in) zeros in every row


def test_cli_wanda_and_magnitude(tiny_dir, tmp_path):
    for method in ("wanda", "magnitude"):
        out = tmp_path / f"{method}.json"
        assert epts.main(cli(tiny_dir, "opt", "--method", method, "--sparsities", "0.5", "--json-out", str(out))) == 0
        res = json.loads(out.read_text())
        assert res["method"] == method and res["results"][0]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("extra, message", [
    (["--sparsities", "1.0"], "outside [0, 1)"),
    (["--sparsities", "-0.1"], "outside [0, 1)"),
    (["--method", "dedicated", "--sparsities", "0.8"], "outside the trained range"),
    (["--rank", "0"], "--rank must be positive"),
    (["--nsamples", "0"], "--nsamples must be at least 1"),
    (["--nsamples", "400"], "fewer than nsamples x seqlen"),
    (["--seqlen", "128"], "above the model's max_position_embeddings"),
])
def test_cli_bad_input_gives_one_line_error(tiny_dir, capsys, extra, message):
    assert epts.main(cli(tiny_dir, "opt", "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1


def test_cli_rejects_an_artifact_of_another_model(tiny_dir, tmp_path, capsys):
    art = tmp_path / "opt.safetensors"
    assert epts.main(cli(tiny_dir, "opt", "--epochs", "1", "--sparsities", "0.5", "--save", str(art))) == 0
    capsys.readouterr()
    assert epts.main(cli(tiny_dir, "llama", "--load", str(art))) == 2
    err = capsys.readouterr().err
    assert str(tiny_dir / "opt") in err and str(tiny_dir / "llama") in err


def test_cli_loads_a_state_the_plain_paths_optimized_with_a_warning(tiny_dir, tmp_path):
    model, tok = epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"), verbose=False)
    windows = epts.calibration_windows(tok, str(tiny_dir / "calib.txt"), 4, 32, 0)
    epts.save_elastic(epts.optimize(model, windows, epts.EPTSConfig(epochs=1, rank=2)), str(tmp_path / "p.st"))
    code, out, err = run_cli(*cli(tiny_dir, "opt", "--load", tmp_path / "p.st", "--sparsities", "0.5"))
    assert code == 0 and "records no fingerprint" in err and "0.50" in out


def test_cli_error_has_no_traceback_in_a_real_process(tiny_dir):
    proc = subprocess.run([sys.executable, str(HERE / "epts.py"), *cli(tiny_dir, "opt", "--sparsities", "1.5")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "outside [0, 1)" in proc.stderr


# ---------------------------------------------------------------------------------------------- baselines

def test_sparsegpt_beats_wanda_mask_on_correlated_inputs_with_exact_sparsity():
    g = torch.Generator().manual_seed(0)
    n_tok, d_in, d_out = 2048, 256, 64
    mix = torch.randn(d_in, d_in, generator=g) / d_in ** 0.5 + torch.eye(d_in)   # correlated input features
    # feature scales from 0.2 to 3 scattered over the columns (as LLM outlier features are): SparseGPT prunes
    # the same share of every 128-column block, so sorted scales would favour Wanda's row-wide choice
    scale = torch.linspace(0.2, 3, d_in)[torch.randperm(d_in, generator=g)]
    X = torch.randn(n_tok, d_in, generator=g) @ mix * scale
    W = torch.randn(d_out, d_in, generator=g)
    for s in (0.5, 0.7):
        W_sgpt = epts.sparsegpt_prune(W, epts.gram(X), n_tok, s)
        W_wanda = epts.wanda_prune(W, epts.sum_of_squares(X), n_tok, s)
        err = lambda Wp: float(((X @ (Wp - W).T) ** 2).mean())
        assert (W_sgpt == 0).sum() == epts.prune_count(s, W.numel())            # exact: blocks of 128 x 64
        assert (W_wanda == 0).sum() == d_out * epts.prune_count(s, d_in)
        assert err(W_sgpt) < 0.9 * err(W_wanda), (s, err(W_sgpt), err(W_wanda))


def test_dedicated_config_is_one_group_at_a_fixed_sparsity_with_the_chain_rank():
    cfg = epts.dedicated_config(epts.EPTSConfig(), 0.6)   # 0.6 is in group 4 -> rank 8 * 5
    assert cfg.groups == ((0.0, 0.6),) and cfg.mixer == (1.0,) and cfg.rank == 40 and cfg.fixed_sparsity == 0.6
    model = tiny_model("opt", n_layers=1)
    windows = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0))
    state = epts.optimize(model, windows, epts.dedicated_config(epts.EPTSConfig(rank=2, epochs=2), 0.6))
    A, B = state.adapters["0.fc1"]
    assert A.shape == (1, 10, 32) and B.shape == (1, 64, 10)
    dense = epts.snapshot_linears(model)
    epts.deploy(model, state, 0.6, dense)
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
    assert epts.owl_sparsities(dense, norms, 0.7, limits=(0.0, 0.7)) == pytest.approx([0.7] * 4)  # no room to move
    per_block = epts.owl_sparsities(dense, norms, 0.5)
    epts.prune_sequential(model, windows, per_block, epts.wanda_prune)
    lins = epts.pruned_linears(model)
    expected = sum(lin.out_features * epts.prune_count(per_block[epts.block_of(k)], lin.in_features) for k, lin in lins.items())
    assert epts.measured_sparsity(model) == expected / sum(lin.weight.numel() for lin in lins.values())


# ---------------------------------------------------------------------------------------------- artifact, resume

def test_kill_and_resume_gives_the_same_result_as_a_straight_run(tmp_path, monkeypatch):
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    cfg = epts.EPTSConfig(rank=2, epochs=2)
    straight = epts.optimize(tiny_model("llama", n_layers=3), windows, cfg)

    ckpt = str(tmp_path / "ckpt.safetensors")
    real = epts.optimize_block

    def crash_at_block_2(*args, **kwargs):
        if args[6] == 2:  # block_index: the process "dies" after blocks 0 and 1 were checkpointed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(epts, "optimize_block", crash_at_block_2)
    with pytest.raises(KeyboardInterrupt):
        epts.optimize(tiny_model("llama", n_layers=3), windows, cfg, runtime=epts.Runtime(checkpoint=ckpt))
    monkeypatch.setattr(epts, "optimize_block", real)
    assert epts._read(ckpt)[1]["next_block"] == 2
    started = []
    monkeypatch.setattr(epts, "optimize_block", lambda *a, **k: started.append(a[6]) or real(*a, **k))
    resumed = epts.optimize(tiny_model("llama", n_layers=3), windows, cfg,  # runtime options may differ
                            runtime=epts.Runtime(checkpoint=ckpt, resume=True, infer_chunk=3))
    assert started == [2]                                      # only the missing block ran
    assert set(resumed.adapters) == set(straight.adapters)
    for key, (A, B) in straight.adapters.items():
        torch.testing.assert_close(resumed.adapters[key][0], A, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(resumed.adapters[key][1], B, rtol=1e-5, atol=1e-7)
    assert resumed.low_group_enabled == straight.low_group_enabled
    with pytest.raises(epts.EPTSError, match=r"other settings: rank 2 \(now 3\); remove it") as refused:
        epts.optimize(tiny_model("llama", n_layers=3), windows, epts.EPTSConfig(rank=3, epochs=2),
                      runtime=epts.Runtime(checkpoint=ckpt, resume=True))  # other settings are refused, named
    assert "epochs" not in str(refused.value) and "mixer" not in str(refused.value)


def test_artifact_holds_adapters_norms_and_a_small_header_only(optimized, tmp_path):
    model, state, _ = optimized
    path = tmp_path / "a.safetensors"
    epts.save_elastic(state, str(path))
    adapter_bytes = sum(4 * (A.numel() + B.numel()) for A, B in state.adapters.values())
    norm_bytes = sum(4 * v.numel() for v in state.act_norms.values())
    assert adapter_bytes + norm_bytes < path.stat().st_size < adapter_bytes + norm_bytes + 64 * 1024
    epts.save_elastic(state, str(tmp_path / "b.safetensors"), torch.bfloat16)
    assert (tmp_path / "b.safetensors").stat().st_size < 0.7 * path.stat().st_size
    tensors, header = epts._read(str(path))
    assert not any("weight" in k or "mask" in k for k in tensors)
    assert {"groups", "mixer", "rank", "base_model", "fingerprint", "reports", "version"} <= set(header)


def test_a_newer_artifact_version_is_refused(optimized, tmp_path):
    _, state, _ = optimized
    path = str(tmp_path / "new.safetensors")
    epts._write(path, epts._state_tensors(state), {**epts._state_header(state), "version": epts.FORMAT_VERSION + 1})
    with pytest.raises(epts.EPTSError, match="newer than this epts.py"):
        epts.load_elastic(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(epts.EPTSError, match="not an EPTS elastic state"):
        epts.load_elastic(str(tmp_path / "junk.safetensors"))


def test_export_from_an_artifact_needs_no_calibration_data(tiny_dir, tmp_path):
    art = tmp_path / "e.safetensors"
    assert epts.main(cli(tiny_dir, "opt", "--epochs", "1", "--sparsities", "0.5", "--save", str(art))) == 0
    assert not (tmp_path / "e.safetensors.checkpoint").exists()          # removed once the artifact is written
    args = cli(tiny_dir, "opt", "--load", str(art), "--export-sparsity", "0.6", "--export-dir", str(tmp_path / "x"),
               "--eval", "none")
    args[args.index("--calib") + 1] = str(tmp_path / "does-not-exist.txt")
    assert epts.main(args) == 0
    assert (tmp_path / "x" / "config.json").exists()


def test_cli_owl_schedule_and_schedule_file(tiny_dir, tmp_path):
    out = tmp_path / "owl.json"
    assert epts.main(cli(tiny_dir, "llama", "--epochs", "1", "--sparsities", "0.5", "--schedule", "owl",
                         "--json-out", str(out))) == 0
    row = json.loads(out.read_text())["results"][0]
    assert len(row["per_block"]) == 2 and abs(sum(row["per_block"]) / 2 - 0.5) < 1e-6
    sched = tmp_path / "s.json"
    sched.write_text("[0.45, 0.65]")
    out2 = tmp_path / "file.json"
    assert epts.main(cli(tiny_dir, "llama", "--method", "magnitude", "--schedule", str(sched), "--json-out",
                         str(out2))) == 0
    row = json.loads(out2.read_text())["results"][0]
    assert row["per_block"] == [0.45, 0.65] and row["sparsity"] == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------- hardening

@pytest.mark.parametrize("extra, message", [
    (["--sparsities", "abc"], "invalid sparsity 'abc': expected a number such as 0.5"),
    (["--sparsities", "3:2"], "0 < N < M"),
    (["--pattern", "0.5"], "expected unstructured or N:M"),
    (["--nm-train", "0.5"], "expected N:M"),
    (["--export-sparsity", "x"], "invalid sparsity 'x': expected a number or N:M"),
    (["--groups", "0.4", "0.3", "0.7", "--mixer", "0.3", "0.3", "0.4"], "contiguous and increasing"),
    (["--groups", "0.4", "0.7"], "mixer has 7 weights but there are 2 groups"),
    (["--mixer", "0.5", "0.5", "0.5", "0.5", "0.5", "0.5", "0.5"], "sum to 1"),
    (["--device", "cuda"], "torch sees no CUDA GPU"),
    (["--resume"], "--resume needs --save or --checkpoint-dir"),
    (["--schedule", "nope.json"], "--schedule must be uniform, owl or a JSON file"),
])
def test_cli_hardening_errors(tiny_dir, capsys, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert epts.main(cli(tiny_dir, "opt", *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("error:") and len(err.splitlines()) == 1, err


def test_nan_loss_names_block_and_group(tiny_dir, capsys):
    assert epts.main(cli(tiny_dir, "opt", "--lr", "1e30", "--epochs", "2")) == 2
    err = capsys.readouterr().err
    assert "in block 0, group" in err and "lower --lr" in err


def test_cli_unsupported_architecture(tmp_path, tiny_dir, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64)).save_pretrained(tmp_path / "gpt2")
    for f in (tiny_dir / "opt").glob("*token*"):
        (tmp_path / "gpt2" / f.name).write_bytes(f.read_bytes())
    args = cli(tiny_dir, "opt")
    args[1] = str(tmp_path / "gpt2")
    assert epts.main(args) == 2
    err = capsys.readouterr().err
    assert "unsupported architecture 'gpt2'" in err and "supported: llama, opt" in err and "ARCHS" in err


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
    epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"))
    epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"), trust_remote_code=True)
    assert seen == [False, True]


# ---------------------------------------------------------------------------------------------- GGUF files

def write_tiny_gguf(path: Path, model: LlamaForCausalLM) -> Path:
    """A LLaMA as llama.cpp writes it (F32 tensors, q/k rows in its rotary order, a byte-level BPE vocabulary
    of the 256 bytes + one end token), with the gguf package's own writer; nothing is downloaded."""
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
    shifted = {b: 256 + i for i, b in enumerate(b for b in range(256) if b not in printable)}  # GPT-2's byte map
    tokens = [chr(shifted.get(b, b)) for b in range(256)] + ["<|endoftext|>"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * len(tokens))
    w.add_token_types([1] * 256 + [3])
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)

    def rotary_order(t: np.ndarray, heads: int) -> np.ndarray:  # llama.cpp's permutation of q and k rows
        return t.reshape(heads, 2, t.shape[0] // heads // 2, t.shape[1]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj"}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", rotary_order(sd[p + "self_attn.q_proj.weight"], c.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", rotary_order(sd[p + "self_attn.k_proj.weight"], c.num_key_value_heads))
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
    cfg = LlamaConfig(vocab_size=257, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2,
                      tie_word_embeddings=False)
    source = LlamaForCausalLM(cfg).eval()
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", source), source


def test_a_gguf_file_loads_as_a_plain_model_with_the_sources_logits(tiny_gguf):
    path, source = tiny_gguf
    model, tokenizer = epts.load_model(str(path), "auto", torch.device("cpu"))
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None  # a plain model: save_pretrained works
    ids = tokenizer("the elastic block", return_tensors="pt").input_ids
    assert ids.shape[1] == len("the elastic block")  # byte-level: one token per byte
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)


def test_gguf_optimize_export_and_reload_with_plain_transformers(tiny_gguf, tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path, source = tiny_gguf
    export = tmp_path / "export"
    code, out, err = run_cli("--model", path, "--calib", tiny_dir / "calib.txt", "--eval", "none", "--nsamples", 4,
                             "--seqlen", 32, "--device", "cpu", "--quiet", "--epochs", 1,
                             "--export-sparsity", 0.5, "--export-dir", export)
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.dtype == torch.float32  # de-quantized GGUF weights are exported as they were loaded
    assert epts.measured_sparsity(model) == pytest.approx(0.5, abs=1e-6)
    ids = AutoTokenizer.from_pretrained(export)("the elastic block", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and not torch.allclose(logits, source(ids).logits)


@pytest.mark.parametrize("content, message", [(None, "no such GGUF file"), (b"PK\x03\x04 a zip", "not a GGUF file"),
                                              ("truncated", "cannot read the GGUF file")])
def test_a_missing_foreign_or_truncated_gguf_is_one_line(tiny_gguf, tmp_path, content, message):
    bad = tmp_path / "model.gguf"
    if content == "truncated":
        bad.write_bytes(tiny_gguf[0].read_bytes()[:5000])
    elif content is not None:
        bad.write_bytes(content)
    (tmp_path / "calib.txt").write_text("some calibration text")
    one_line_error(*run_cli("--model", bad, "--eval", "none", "--device", "cpu", "--calib", tmp_path / "calib.txt")
                   [::2], message)


def test_a_folder_holding_a_gguf_file_is_one_line_naming_the_file(tiny_gguf, tmp_path, monkeypatch):
    no_work(monkeypatch)
    (tmp_path / "SmolLM2.Q4_1.gguf").write_bytes(tiny_gguf[0].read_bytes())
    one_line_error(*run_cli("--model", tmp_path, "--device", "cpu")[::2], "holds SmolLM2.Q4_1.gguf: pass that file")


# ---------------------------------------------------------------------------------------------- tutorial

def test_tutorial_notebook_runs_top_to_bottom(monkeypatch):
    """tutorial.ipynb is executed as a reader would run it, every cell on a smaller setting (EPTS_TUTORIAL_QUICK:
    fewer and shorter windows, fewer block-0 epochs); any error in any cell fails the test."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("EPTS_TUTORIAL_QUICK", "1")                      # the kernel inherits the environment
    nb = nbformat.read(HERE / "tutorial.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    printed = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert images >= 3 and "calibration (4, 64)" in printed                  # it ran on the smaller setting


# ---------------------------------------------------------------------------------------------- never lose data

def run_cli(*args) -> tuple[int, str, str]:
    """main() in-process with stdout/stderr captured: (status, stdout, stderr)."""
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = epts.main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(code: int, err: str, message: str) -> None:
    lines = [l for l in err.strip().splitlines() if not l.startswith("warning:")]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], err


def no_work(monkeypatch):
    """Fail the test if any optimization or pruning starts: refusals must come before any work."""
    def boom(*a, **k):
        raise AssertionError("work started before the inputs were checked")
    for name in ("optimize", "prune_sequential", "prune_magnitude", "calibration_windows"):
        monkeypatch.setattr(epts, name, boom)


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def model_copy(tiny_dir, tmp_path) -> Path:
    """A private copy of the tiny OPT folder, for tests that try to damage it."""
    import shutil
    return Path(shutil.copytree(tiny_dir / "opt", tmp_path / "model"))


def test_outputs_that_would_destroy_the_model_are_refused_before_any_work(tiny_dir, model_copy, tmp_path,
                                                                          monkeypatch):
    before = files_of(model_copy)
    no_work(monkeypatch)
    args = cli(tiny_dir, "opt", "--epochs", "1")
    args[1] = str(model_copy)
    for extra, message in [(["--export-sparsity", "0.5", "--export-dir", model_copy], "would overwrite the model"),
                           (["--export-sparsity", "0.5", "--export-dir", model_copy / "sub"], "would overwrite"),
                           (["--save", model_copy / "model.safetensors"], "inside the model folder"),
                           (["--json-out", model_copy / "config.json", "--overwrite"], "inside the model folder"),
                           (["--checkpoint-dir", model_copy], "inside the model folder")]:
        one_line_error(*run_cli(*args, *extra)[::2], message)
    assert files_of(model_copy) == before


def test_export_dir_must_be_a_new_or_empty_folder(tiny_dir, tmp_path, monkeypatch):
    other = tmp_path / "other-model"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"precious")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    no_work(monkeypatch)
    base = cli(tiny_dir, "opt", "--method", "magnitude", "--export-sparsity", "0.5")
    one_line_error(*run_cli(*base, "--export-dir", other)[::2], "not empty")
    one_line_error(*run_cli(*base, "--export-dir", a_file)[::2], "is a file")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--export-dir", tmp_path / "new"))[::2], "go together")
    assert (other / "model.safetensors").read_bytes() == b"precious" and a_file.read_text() == "x"


def test_overwrite_replaces_an_earlier_export_entirely_and_refuses_other_files(tiny_dir, tmp_path, monkeypatch):
    """--overwrite removes every file an earlier export wrote (here a sharded LLaMA: shards, their index, configs,
    tokenizer), so the folder holds the new export only; a file no export writes is refused, by name."""
    import shutil
    target = Path(shutil.copytree(tiny_dir / "llama", tmp_path / "old-export"))
    (target / "model.safetensors").unlink()
    tiny_model("llama").save_pretrained(target, max_shard_size="40KB")
    assert (target / "model.safetensors.index.json").exists()
    base = cli(tiny_dir, "opt", "--method", "magnitude", "--export-sparsity", "0.5", "--eval", "none")
    code, out, _ = run_cli(*base, "--export-dir", target, "--overwrite")
    assert code == 0 and "exported magnitude" in out
    assert run_cli(*base, "--export-dir", tmp_path / "fresh")[0] == 0
    assert files_of(target) == files_of(tmp_path / "fresh")              # nothing of the LLaMA export is left
    (target / "notes.txt").write_text("mine")
    no_work(monkeypatch)
    before = files_of(target)
    one_line_error(*run_cli(*base, "--export-dir", target, "--overwrite")[::2], "holds notes.txt")
    assert files_of(target) == before


def test_save_and_json_out_are_checked_before_any_work(tiny_dir, tmp_path, monkeypatch):
    no_work(monkeypatch)
    same = tmp_path / "x"
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--save", same, "--json-out", same))[::2], "same file")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--save", folder))[::2], "exists as a folder")
    assert list(folder.iterdir()) == []                                  # no .tmp files left behind
    existing = tmp_path / "results.json"
    existing.write_text("{}")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--json-out", existing))[::2], "--overwrite")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a folder should be")
    for flag in ("--json-out", "--save"):
        one_line_error(*run_cli(*cli(tiny_dir, "opt", flag, blocker / "out"))[::2], "cannot write")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--checkpoint-dir", blocker / "ck"))[::2], "cannot write")


def interrupt_at_block(monkeypatch, index: int) -> None:
    """Ctrl-C when optimize reaches block `index` (blocks before it are finished and checkpointed)."""
    real = epts.optimize_block

    def interrupted(*a, **k):
        if a[6] == index:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(epts, "optimize_block", interrupted)


def test_checkpoints_are_named_after_the_output_and_never_taken_over(tiny_dir, tmp_path, monkeypatch):
    real = epts.optimize_block
    interrupt_at_block(monkeypatch, 1)
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "a.safetensors"))
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    assert code == 130 and checkpoint.exists()
    assert "1 finished block(s)" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(epts, "optimize_block", real)
    # another run in the same folder gets its own checkpoint; the same command without --resume is refused
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "b.safetensors"))[0] == 0
    assert checkpoint.exists() and not (tmp_path / "b.safetensors.checkpoint").exists()
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "a.safetensors"))[::2],
                   "pass --resume")
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "a.safetensors", "--resume"))
    assert code == 0 and not checkpoint.exists() and (tmp_path / "a.safetensors").exists()


def test_json_out_is_written_without_evaluation_too(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--eval", "none", "--json-out", out))[0] == 0
    res = json.loads(out.read_text())
    assert res["results"] == [] and res["optimize_seconds"] > 0 and len(res["low_group_enabled"]) == 2


def test_resume_with_nothing_to_resume_says_so(tiny_dir, tmp_path):
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--sparsities", "0.5", "--save",
                                tmp_path / "a.safetensors", "--resume"))
    assert code == 0 and "no checkpoint" in err and "starting from block 0" in err


def test_resume_refuses_other_calibration_data_seqlen_or_dtype(tmp_path):
    windows = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(3))
    cfg, ckpt = epts.EPTSConfig(rank=2, epochs=1), str(tmp_path / "ck")
    model = tiny_model("llama", n_layers=2)
    state = epts.optimize(model, windows, cfg, runtime=epts.Runtime())
    X = torch.zeros(4, 32, 32)
    epts.save_checkpoint(ckpt, state, cfg, 1, X, X.clone(), windows)
    other = windows.clone()
    other[0, 0] = (other[0, 0] + 1) % 64                                   # same sizes, other tokens
    for w, m, message in [(other, model, "calib sha256"), (windows[:, :16], model, "seqlen"),
                          (windows, tiny_model("llama", n_layers=2).to(torch.bfloat16), "dtype")]:
        with pytest.raises(epts.EPTSError, match=message):
            epts.load_checkpoint(ckpt, m, cfg, w)
    assert epts.load_checkpoint(ckpt, model, cfg, windows)[1] == 1


# ---------------------------------------------------------------------------------------------- fail early, in one line

@pytest.mark.parametrize("extra, message", [
    (["--seqlen", "0"], "--seqlen must be at least 2"),
    (["--seqlen", "-5"], "--seqlen must be at least 2"),
    (["--seqlen", "1"], "--seqlen must be at least 2"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1"),
    (["--eval-batch-size", "-1"], "--eval-batch-size must be at least 1"),
    (["--mixer", "nan", "0", "0", "0", "0", "0", "1"], "mixer weights must be non-negative"),
    (["--device", "mps"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--device", "gpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--groups", "0.5", "1.0", "--mixer", "0.5", "0.5", "--sparsities", "1.0"], "outside [0, 1)"),
    (["--rank", "100000000"], "the adapters need about"),
    (["--pattern", "2:4", "--schedule", "owl"], "use it with --schedule uniform"),
    (["--pattern", "3:4x"], "--pattern"),
    (["--calib", "no/such.txt"], "--calib 'no/such.txt' is neither c4, wikitext2 nor a text file"),
])
def test_more_bad_inputs_fail_in_one_line_before_any_work(tiny_dir, monkeypatch, extra, message):
    monkeypatch.setattr(epts, "optimize_block", lambda *a, **k: pytest.fail("optimization started"))
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", "1", *extra))[::2], message)


def test_bad_data_files_fail_in_one_line(tiny_dir, tmp_path, monkeypatch):
    binary = tmp_path / "binary.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    args = cli(tiny_dir, "opt", "--epochs", "1")
    args[args.index("--calib") + 1] = str(binary)
    one_line_error(*run_cli(*args)[::2], "not UTF-8 text")
    monkeypatch.setattr(epts, "optimize", lambda *a, **k: pytest.fail("optimization started"))
    args = cli(tiny_dir, "opt", "--epochs", "1")
    args[args.index("--eval") + 1] = str(binary)                        # a bad --eval fails before optimizing
    one_line_error(*run_cli(*args)[::2], "not UTF-8 text")


def test_hub_data_offline_is_one_line_naming_the_local_alternative(tiny_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(epts, "optimize", lambda *a, **k: pytest.fail("optimization started"))
    args = cli(tiny_dir, "opt", "--epochs", "1")
    args[args.index("--calib") + 1] = "c4"
    one_line_error(*run_cli(*args)[::2], "local text file")
    args = cli(tiny_dir, "opt", "--epochs", "1")
    args[args.index("--eval") + 1] = "wikitext2"                        # --eval is resolved before optimizing
    one_line_error(*run_cli(*args)[::2], "cannot load the hub dataset 'Salesforce/wikitext'")


def test_a_model_folder_without_tokenizer_files_is_named(tiny_dir, tmp_path):
    tiny_model("opt").save_pretrained(tmp_path / "no-tokenizer")
    args = cli(tiny_dir, "opt")
    args[1] = str(tmp_path / "no-tokenizer")
    one_line_error(*run_cli(*args)[::2], "tokenizer")


def test_library_refuses_windows_longer_than_the_model_positions():
    model = tiny_model("opt", n_layers=1)                               # max_position_embeddings 64
    with pytest.raises(epts.EPTSError, match="max_position_embeddings"):
        epts.optimize(model, torch.zeros(2, 80, dtype=torch.long), epts.EPTSConfig(epochs=1), runtime=epts.Runtime())


# ---------------------------------------------------------------------------------------------- trust nothing loaded

def test_a_damaged_artifact_is_refused_and_nan_perplexity_is_an_error(optimized, tmp_path):
    model, state, windows = optimized
    path = str(tmp_path / "flipped.safetensors")
    tensors, header = epts._state_tensors(state), epts._state_header(state)
    key = next(k for k in tensors if k.endswith(".B"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0, 0] = float("nan")
    epts._write(path, tensors, header)
    with pytest.raises(epts.EPTSError, match="damaged"):
        epts.load_elastic(path)
    broken = tiny_model("opt", n_layers=1)
    with torch.no_grad():
        broken.model.decoder.layers[0].fc1.weight[0, 0] = float("nan")
    with pytest.raises(epts.EPTSError, match="not finite"):
        epts.perplexity(broken, windows.flatten(), 32)


def test_load_records_the_artifacts_settings_and_warns_on_another_dtype(tiny_dir, tmp_path):
    art = tmp_path / "a.safetensors"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--rank", "2", "--sparsities", "0.5", "--save", art))[0] == 0
    assert epts.load_elastic(str(art)).base_dtype == "torch.float32"
    out = tmp_path / "r.json"
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--load", art, "--rank", "5", "--groups", "0.5", "0.7", "--mixer",
                                "0.5", "0.5", "--sparsities", "0.5", "--json-out", out, "--dtype", "bfloat16"))
    config = json.loads(out.read_text())["config"]
    assert code == 0 and config["rank"] == 2 and config["groups"] == [hi for _, hi in epts.GROUPS]
    assert "optimized on torch.float32 weights" in err and "--dtype float32" in err


# ---------------------------------------------------------------------------------------------- protocol as published

def test_baselines_accept_any_sparsity_below_one_and_epts_above_its_range_deploys_the_mask(optimized, tiny_dir,
                                                                                           tmp_path, saved_state):
    out = tmp_path / "w.json"
    assert run_cli(*cli(tiny_dir, "opt", "--method", "wanda", "--sparsities", "0.8", "--json-out", out))[0] == 0
    assert json.loads(out.read_text())["results"][0]["achieved_sparsity"] == pytest.approx(0.8, abs=0.02)
    model, state, _ = optimized
    dense = epts.snapshot_linears(model)
    epts.deploy(model, state, 0.85, dense)
    for key, lin in epts.pruned_linears(model).items():
        keep = epts.mask_from_ranks(epts.row_ranks(epts.wanda_scores(dense[key], state.act_norms[key])), 0.85)
        assert torch.equal(lin.weight, dense[key] * keep)               # no adapter above the trained 0.7
    epts.restore_dense(model, dense)
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--sparsities", "0.8", "--eval", "none"))
    assert code == 0 and err.count("above the trained range") == 1
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--load", saved_state, "--sparsities", "0.8", "--eval", "none"))
    assert code == 0 and err.count("above the trained range") == 1      # once, also when --load brings the groups


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt", "dedicated"])
def test_every_method_exports_a_plain_model_in_the_checkpoints_dtype(method, tiny_dir, tmp_path):
    import shutil
    fp16 = tmp_path / "fp16-model"
    shutil.copytree(tiny_dir / "opt", fp16)
    tiny_model("opt").half().save_pretrained(fp16)                      # a half-precision checkpoint
    args = cli(tiny_dir, "opt", "--method", method, "--epochs", "1", "--export-sparsity", "0.5",
               "--export-dir", tmp_path / "out", "--eval", "none")
    args[1] = str(fp16)
    code, out, _ = run_cli(*args)
    assert code == 0 and f"exported {method}" in out and "float16" in out
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    linears = {k: v for k, v in weights.items() if k.endswith("weight") and v.dim() == 2 and ("proj" in k or "fc" in k)}
    assert linears and all(v.dtype == torch.float16 for v in weights.values())
    for k, v in linears.items():
        if method in ("magnitude", "sparsegpt"):                        # one count per matrix / per 128 columns
            assert int((v == 0).sum()) == v.numel() // 2, k
        else:                                                           # Wanda's row-wise mask, also under adapters
            assert ((v == 0).sum(1) == v.shape[1] // 2).all(), k


def test_wikitext2_calibration_is_wandas_loader_token_for_token(tiny_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    lines = [synthetic_text(60, seed=i) for i in range(40)]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: {"text": lines})
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_dir / "opt")
    got = epts.calibration_windows(tok, "wikitext2", 5, 16, seed=7)
    ids = torch.tensor(tok(" ".join(lines))["input_ids"])              # Wanda's get_wikitext2, re-typed
    random.seed(7)
    expected = []
    for _ in range(5):
        i = random.randint(0, ids.numel() - 16 - 1)
        expected.append(ids[i:i + 16])
    assert torch.equal(got, torch.stack(expected))


def test_a_corpus_is_tokenized_whole_without_the_tokenizers_length_warning(tiny_dir, monkeypatch, caplog):
    import logging
    from transformers import AutoTokenizer
    monkeypatch.setattr(logging.getLogger("transformers"), "propagate", True)  # its warnings reach caplog
    tok = AutoTokenizer.from_pretrained(tiny_dir / "opt")
    tok.model_max_length = 8                                           # a corpus is longer than any model's window
    ids = epts._tokenize(tok, synthetic_text(200, seed=0))
    assert len(ids) > 8 and "sequence length is longer" not in caplog.text
    assert torch.equal(ids, torch.tensor(tok(synthetic_text(200, seed=0))["input_ids"]))  # the same ids, loudly
    assert "sequence length is longer" in caplog.text


def test_low_group_check_sparsity_stays_in_group_0_when_groups_change():
    cfg, _ = epts.configs_from_args(epts.parse_args(["--model", "m", "--groups", "0.2", "0.7", "--mixer", "0.5", "0.5"]))
    assert cfg.low_check_sparsity == pytest.approx(0.15)               # 3/4 of group 0, as 0.3 is of (0, 0.4]
    assert epts.configs_from_args(epts.parse_args(["--model", "m"]))[0].low_check_sparsity == 0.3
    with pytest.raises(epts.EPTSError, match="must lie in group 0"):
        epts.validate_config(epts.EPTSConfig(low_check_sparsity=0.5))


# ---------------------------------------------------------------------------------------------- the newcomer's path

def test_eval_tokens_caps_the_evaluation_and_rows_print_as_they_come(tiny_dir, tmp_path):
    out = tmp_path / "r.json"
    code, printed, _ = run_cli(*cli(tiny_dir, "opt", "--method", "magnitude", "--sparsities", "0.3", "0.5",
                                    "--eval-tokens", "64", "--json-out", out))
    res = json.loads(out.read_text())
    from transformers import AutoTokenizer
    tokens = epts.eval_tokens(AutoTokenizer.from_pretrained(tiny_dir / "opt"), str(tiny_dir / "eval.txt"), 32)
    model = epts.load_model(str(tiny_dir / "opt"), "float32", torch.device("cpu"))[0]
    assert code == 0 and res["dense"][str(tiny_dir / "eval.txt")] == epts.perplexity(model, tokens[:64], 32)
    assert [l.split()[0] for l in printed.splitlines() if l[:8].strip().replace(".", "").isdigit()] == \
        ["0.00", "0.30", "0.50"]
    head = next(l for l in printed.splitlines() if l.split()[:1] == ["sparsity"])
    assert head.endswith(" deploy s")                                   # the time column is the deploy time


def test_help_shows_every_default():
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert epts.main(["--help"]) == 0
    text = " ".join(buf.getvalue().split())
    for default in ("(default: 128)", "(default: 10)", "(default: 0.001)", "(default: c4)", "(default: epts)"):
        assert default in text
    assert "perplexity depends on it" in text and "(default: None)" not in text
    assert "any sparsity in [0, 1) (trained for (0, 0.7]" in text                # as the README says


def test_readme_library_snippet_runs(tiny_dir):
    """The README's Python snippet, run as written but for the model, data and sizes (tiny, CPU)."""
    readme = (HERE / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    for hub, local in [('"facebook/opt-125m"', repr(str(tiny_dir / "opt"))), ('"c4"', repr(str(tiny_dir / "calib.txt"))),
                       ("nsamples=128, seqlen=2048", "nsamples=4, seqlen=32"),
                       ("epts.EPTSConfig()", "epts.EPTSConfig(epochs=1, rank=2)")]:
        assert hub in code
        code = code.replace(hub, local)
    scope: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                      # "no GPU found": expected here
        exec(compile(code, "README.md", "exec"), scope)
    assert 0.55 < epts.measured_sparsity(scope["model"]) <= 0.6


# ---------------------------------------------------------------------------------------------- say what happens

def stop_before_the_model(monkeypatch) -> None:
    """End the run with a one-line error where the model would load: what comes before it is the test's subject."""
    def stop(*a, **k):
        raise epts.EPTSError("stopped where the model loads")
    monkeypatch.setattr(epts, "load_model", stop)


def test_loading_the_checkpoint_of_an_unfinished_run_names_resume(tiny_dir, tmp_path, monkeypatch):
    interrupt_at_block(monkeypatch, 1)
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "a.safetensors"))[0] == 130
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    stop_before_the_model(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--load", checkpoint))[::2],
                   "is a checkpoint of an unfinished run, not an elastic state; continue it with --resume")
    with pytest.raises(epts.EPTSError, match="checkpoint of an unfinished run"):      # the library says the same
        epts.load_elastic(str(checkpoint))


@pytest.mark.parametrize("extra, message", [
    (["--method", "wanda"], "--method wanda has none"),
    (["--method", "magnitude", "--eval", "none"], "--method magnitude has none"),
    (["--load", "elastic.safetensors"], "with --load nothing is optimized"),
])
def test_save_is_refused_where_nothing_is_optimized(tiny_dir, tmp_path, monkeypatch, extra, message):
    no_work(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--save", tmp_path / "w.safetensors", *extra))[::2], message)


def test_exporting_a_saved_state_evaluates_nothing_unless_asked(tiny_dir, saved_state, tmp_path, monkeypatch):
    monkeypatch.setattr(epts, "eval_tokens", lambda *a, **k: pytest.fail("an evaluation text was loaded"))
    args = cli(tiny_dir, "opt", "--load", saved_state, "--export-sparsity", "0.5", "--export-dir", tmp_path / "x")
    del args[args.index("--eval"):args.index("--eval") + 2]            # no --eval: the README's export flow
    code, out, _ = run_cli(*args)
    assert code == 0 and "exported epts" in out and (tmp_path / "x" / "config.json").exists()
    assert epts.parse_args(["--model", "m", "--load", "s"]).eval == ["wikitext2"]   # --load alone evaluates


def test_output_folders_are_created_only_when_their_output_is_written(tiny_dir, tmp_path, monkeypatch):
    new = tmp_path / "new"
    stop_before_the_model(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--export-sparsity", "0.5", "--export-dir", new / "export",
                                 "--save", new / "s" / "a.safetensors", "--json-out", new / "j" / "r.json",
                                 "--checkpoint-dir", new / "ck"))[::2], "stopped where the model loads")
    assert not new.exists()                                             # checked, but nothing created
    monkeypatch.undo()
    assert run_cli(*cli(tiny_dir, "opt", "--method", "magnitude", "--eval", "none", "--json-out",
                        new / "j" / "r.json"))[0] == 0
    assert (new / "j" / "r.json").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--model", "./no-such-model", ": no such folder"),
    ("--model", "/no/such/model", ": no such folder"),
    ("--model", "~/no-such-model", ": no such folder"),
    ("--model", "no/such/model", ": no such folder"),                  # owner/name/...: not a hub name
    ("--model", "models/opt-mini", ": no such folder"),                # models/ exists here: a local path
    ("--eval", "wikitxt2", " is neither wikitext2, c4, none nor a text file"),
])
def test_a_path_that_does_not_exist_is_named_before_the_model_loads(tiny_dir, tmp_path, monkeypatch, flag, value,
                                                                    message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    stop_before_the_model(monkeypatch)
    args = cli(tiny_dir, "opt")
    args[args.index(flag) + 1] = value
    one_line_error(*run_cli(*args)[::2], f"{flag} '{value}'{message}")


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_in_a_folder_that_takes_no_files_gives_the_real_reason(tiny_dir, monkeypatch):
    no_work(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--json-out", "/proc/x.json"))[::2],
                   "the folder exists, but creating a file in it fails")


def test_load_evaluates_at_the_states_seqlen_or_warns_when_it_is_not_recorded(tiny_dir, saved_state, tmp_path):
    out = tmp_path / "r.json"
    args = cli(tiny_dir, "opt", "--load", saved_state, "--sparsities", "0.5", "--json-out", out, "--overwrite")
    del args[args.index("--seqlen"):args.index("--seqlen") + 2]
    code, _, err = run_cli(*args)
    assert code == 0 and json.loads(out.read_text())["config"]["seqlen"] == 16 and "seqlen" not in err
    tensors, header = epts._read(str(saved_state))
    del header["seqlen"]
    epts._write(str(tmp_path / "older.safetensors"), tensors, header)  # a state that does not record its seqlen
    args[args.index("--load") + 1] = tmp_path / "older.safetensors"
    code, _, err = run_cli(*args)
    assert code == 0 and "does not record its --seqlen; evaluating at 64 tokens" in err


def test_float16_on_the_cpu_warns_in_one_line(tiny_dir, monkeypatch):
    stop_before_the_model(monkeypatch)
    err = run_cli(*cli(tiny_dir, "opt", "--dtype", "float16"))[2]
    assert [l for l in err.splitlines() if "float16" in l] == [
        "warning: --dtype float16 on the CPU is very slow (few CPU kernels are fast in fp16): float32, the CPU's "
        "default, takes a fraction of the time"]


def test_ctrl_c_after_save_says_the_state_is_saved_and_load_continues(tiny_dir, tmp_path, monkeypatch):
    art = tmp_path / "a.safetensors"
    art.write_bytes(b"the state of an earlier run")
    interrupt_at_block(monkeypatch, 0)                                  # before this run saved anything ...
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", art, "--overwrite"))
    assert code == 130 and "--load" not in err                          # ... the earlier file is not offered
    monkeypatch.undo()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(epts, "perplexity", ctrl_c)                     # Ctrl-C in the evaluation, after --save
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", art, "--overwrite"))
    assert code == 130 and f"saved in '{art}'" in err and f"--load {art} instead of --save" in err


# ---------------------------------------------------------------------------------------------- 2:4 kernels (sparse24)

def tiny_24(arch: str = "llama") -> torch.nn.Module:
    """A tiny model pruned to 2:4 by magnitude, in bf16 (cuSPARSELt's dtype)."""
    model = tiny_model(arch)
    epts.prune_magnitude(model, "2:4")
    return model.to(torch.bfloat16)


@pytest.fixture
def fake_cusparselt(monkeypatch):
    """cuSPARSELt on the CPU: "compression" keeps the weight, the matmul is F.linear, its search finds config
    (alg 3, split-k 1, mode 0); records each matmul's tokens. Every entry point is faked: a real one, given host
    tensors on a CUDA machine, faults later in an unrelated call."""
    calls = []

    def sparse_mm(packed, xt, bias=None, transpose_result=False, **config):
        assert transpose_result and xt.stride() == (1, xt.shape[0])  # x^T column-major, ld = in; out x W^T + b
        assert set(config) <= {"alg_id", "split_k", "split_k_mode"}
        calls.append(xt.shape[1])
        return torch.nn.functional.linear(xt.t(), packed, bias)

    def mm_search(packed, xt, bias, alpha, out_dtype, transpose_result):  # -> (alg_id, split_k, mode, max alg_id)
        return 3, 1, 0, 5
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=mm_search), raising=False)
    monkeypatch.setattr(epts, "cusparselt_missing", lambda device: None)
    monkeypatch.setattr(torch, "_cslt_compress", lambda W: W.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    return calls


def made_up_timer(rules: dict, seen: list | None = None):
    """A timer that runs fn once and returns made-up seconds. A linear alone: dense 1.0, 2:4 rules[(out, in)](tokens).
    A block with m such linears: 100 on their dense weights, on 2:4 less m times their saving (the same speed-up)."""
    def timer(fn, label, device=None):
        fn()
        if seen is not None:
            seen.append(label)
        kind, out, inp, n, *m = label
        t = 1.0 if kind.endswith("dense") else rules[(out, inp)](n)
        return 100 - m[0] * (1 - t) if kind.startswith("block") else t
    return timer


def test_sparse24_swaps_only_what_its_probe_finds_faster_and_runs_dense_below_the_break_even(fake_cusparselt):
    model = tiny_24()                            # q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64 (out x in)
    with torch.no_grad():
        epts.decoder_blocks(model)[1].mlp.up_proj.weight.fill_(0.01)   # not 2:4: never swapped, whatever the speed
    ref, seen = copy.deepcopy(model), []
    timer = made_up_timer({(64, 32): lambda n: 0.5 if n >= 64 else 2.0,   # 2x faster from 64 tokens on
                           (16, 32): lambda n: 0.8,                        # 1.25x at every size
                           (32, 32): lambda n: 1.5,                        # slower
                           (32, 64): lambda n: 0.97}, seen)                # 3% faster: below the 5% margin
    report = epts.sparse24(model, 256, timer=timer)
    swapped = {f"{i}.{n}" for i in (0, 1) for n in ("mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                                                     "self_attn.v_proj")} - {"1.mlp.up_proj"}
    assert set(report.swapped) == swapped
    assert {k: (round(report.swapped[k], 9), report.min_tokens[k]) for k in swapped} == {
        k: (2.0, 64) if "mlp" in k else (1.25, 16) for k in swapped}
    assert "not 2:4" in report.kept["1.mlp.up_proj"] and "forward at 256 tokens (32x32: 0.67x)" in report.kept[
        "0.self_attn.q_proj"]
    assert "1.03x" in report.kept["1.mlp.down_proj"] and len(report.kept) == 14 - len(swapped)
    assert sum(label[0] == "dense" and label[3] == 256 for label in seen) == 4       # one probe per shape,
    assert sorted(label[1:] for label in seen if label[0] == "block 2:4") == sorted(  # timed in block 0 (2 rounds)
        [(64, 32, 256, 2), (16, 32, 256, 2), (32, 32, 256, 2), (32, 64, 256, 1)] * 2)
    lins = epts.pruned_linears(model)
    assert report.fallback_bytes == sum(lins[k].weight.numel() * 2 for k in swapped)
    assert all(isinstance(lins[k], epts.Sparse24Linear) == (k in swapped) for k in lins)
    assert all(lins[k].config == dict(alg_id=3, split_k=1, split_k_mode=0) for k in swapped)  # the search's config
    assert "7 of 14 linears swapped" in report.summary() and "not 2:4" in report.summary()
    fake_cusparselt.clear()
    with torch.no_grad():
        for batch, seqlen, expected in ((1, 8, []), (4, 12, [48] * 4), (4, 32, [128] * 7)):
            ids = torch.randint(0, 64, (batch, seqlen), generator=torch.Generator().manual_seed(seqlen))
            assert torch.equal(model(ids).logits, ref(ids).logits)          # the fake kernel is exact: so is all else
            assert sorted(fake_cusparselt) == sorted(expected)  # 8 tokens: all dense; 48: only k/v (from 16 up)
            fake_cusparselt.clear()
        prompts = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
        tokens = model.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, ref.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0))
    assert fake_cusparselt == [128] * 7                                     # the prefill; every decode step dense
    assert lins["0.self_attn.k_proj"].calls == {"2:4": 3, "dense": 1 + 5}   # 48, 128 and the prefill; 8 and 5 steps


def test_sparse24_decides_by_the_block_forward_not_by_the_linear_alone(fake_cusparselt):
    """cuSPARSELt plans every call on the host: alone a 2:4 call can look slow while a forward hides that time, and
    the reverse. The block's time decides; the linear alone gives only the break-even."""
    def timer(block_24, alone_24):
        def time(fn, label):
            fn()
            kind, *_, m = label if label[0].startswith("block") else (*label, 0)
            return {"dense": 1.0, "2:4": alone_24, "block dense": 100.0, "block 2:4": 100 + m * block_24}[kind]
        return time
    model = tiny_24()
    report = epts.sparse24(model, 256, timer=timer(block_24=-0.5, alone_24=2.0))  # slow alone, 2x in the block
    assert len(report.swapped) == 14 and {round(s, 9) for s in report.swapped.values()} == {2.0}
    assert set(report.min_tokens.values()) == {256}                              # alone it never breaks even
    epts.unsparse24(model)
    report = epts.sparse24(model, 256, timer=timer(block_24=0.1, alone_24=0.5))   # fast alone, slower in the block
    assert not report.swapped and all("(32x32: 0.91x)" in report.kept[f"{i}.self_attn.q_proj"] for i in (0, 1))

    def failing(fn, label):  # a timer that fails while the block runs on 2:4: the block gets its linears back
        if label[0] == "block 2:4":
            raise RuntimeError("the timer failed")
        return 1.0
    with pytest.raises(RuntimeError, match="the timer failed"):
        epts.sparse24(model, 256, timer=failing)
    assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())


def test_sparse24_layer_falls_back_to_the_dense_weight_never_to_an_exception(fake_cusparselt, monkeypatch):
    lin = torch.nn.Linear(32, 16).to(torch.bfloat16)
    layer = epts.Sparse24Linear(lin, min_tokens=16)
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(layer(x), lin(x)) and layer.calls == {"2:4": 1, "dense": 0}
        wide = torch.randn(4, 8, 48, dtype=torch.bfloat16)[..., :32]          # rows 48 apart: x.view works, ld != in
        for other in (x[:1, :3], x.transpose(0, 1), wide, x[:1, :1]):        # 3 rows, strided x2, 1 row (decode)
            assert torch.equal(layer(other), lin(other))
    assert torch.equal(layer(x), lin(x))                                    # autograd on: the dense path
    assert layer.calls == {"2:4": 1, "dense": 5}

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not supported when calling cusparseLtDenseDescriptorInit")
    monkeypatch.setattr(torch, "_cslt_sparse_mm", refuse)
    with torch.no_grad():
        assert torch.equal(layer(x), lin(x)) and layer.calls["dense"] == 6
    assert epts.sparse24_refusal(torch.nn.Linear(32, 16), torch.device("cpu")).startswith("float32")
    assert "multiples of 16" in epts.sparse24_refusal(torch.nn.Linear(32, 20).bfloat16(), torch.device("cpu"))


def test_sparse24_without_cuda_changes_nothing_and_warns_once(monkeypatch):
    model = tiny_24()
    ref, ids = copy.deepcopy(model), torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = epts.sparse24(model, 16384)
    assert len(caught) == 1 and "sparse24: the model is on cpu" in str(caught[0].message)
    assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert not report.swapped and len(report.kept) == 14 and "0 of 14 linears swapped" in report.summary()
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert epts.cusparselt_missing(torch.device("cuda")) == "this torch has no cuSPARSELt"


def test_cli_sparse24_evaluates_the_2of4_row_through_the_swap_and_needs_the_pattern(tiny_dir, tmp_path, monkeypatch,
                                                                                     fake_cusparselt):
    base = cli(tiny_dir, "llama", "--method", "magnitude", "--pattern", "2:4", "--dtype", "bfloat16")
    monkeypatch.setattr(epts, "seconds_per_call", made_up_timer({(32, 32): lambda n: 0.5, (16, 32): lambda n: 2.0,
                                                                 (64, 32): lambda n: 0.5, (32, 64): lambda n: 0.5}))
    runs = {}
    for extra in ((), ("--sparse24",)):
        out = tmp_path / f"{len(extra)}.json"
        code, printed, err = run_cli(*base, *extra, "--json-out", out)
        assert code == 0, err
        runs[extra] = json.loads(out.read_text())
    report = runs[("--sparse24",)]["sparse24"]
    assert len(report["swapped"]) == 10 and set(report["kept"]) == {f"{i}.self_attn.{n}_proj" for i in (0, 1)
                                                                       for n in "kv"}
    assert "10 of 14 linears swapped" in printed and fake_cusparselt                  # the 2:4 row ran through it
    assert runs[()]["results"][0]["ppl"] == runs[("--sparse24",)]["results"][0]["ppl"]
    no_work(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--sparsities", "2:4"))[::2], "use --pattern 2:4")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--sparse24"))[::2], "use it with --pattern 2:4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse24_on_cuda_swaps_runs_and_generates_the_unswapped_tokens():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512))
    epts.prune_magnitude(model.eval(), "2:4")
    model.to("cuda", torch.bfloat16)
    if epts.cusparselt_missing(torch.device("cuda")):
        pytest.skip(epts.cusparselt_missing(torch.device("cuda")))
    short, long = (torch.randint(0, 512, shape, device="cuda") for shape in ((3, 8), (4, 64)))
    generate = lambda ids: model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,  # noqa: E731
                                          pad_token_id=0)
    with torch.no_grad():
        ref = [model(short).logits, model(long).logits, generate(short)]
        report = epts.sparse24(model, 4096)                  # the real probe: swaps only what it measured faster
        assert all(s >= 1.05 and 16 <= report.min_tokens[k] <= 4096 for k, s in report.swapped.items())
        epts.unsparse24(model)
        assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())
        # the real kernels behind a timer that calls 2:4 twice as fast from 64 tokens on: all 14 swapped
        report = epts.sparse24(model, 256, timer=made_up_timer({s: (lambda n: 0.5 if n >= 64 else 2.0) for s in
                                                                [(256, 256), (128, 256), (512, 256), (256, 512)]}))
        layers = list(epts.pruned_linears(model).values())
        assert len(report.swapped) == 14 and set(report.min_tokens.values()) == {64}
        assert torch.equal(model(short).logits, ref[0])                    # 24 tokens: the dense path, bit for bit
        assert all(layer.calls["2:4"] == 0 for layer in layers)
        logits = model(long).logits                                       # 256 tokens: the 2:4 kernel
        assert all(layer.calls["2:4"] == 1 for layer in layers)
        assert float((logits - ref[1]).abs().max() / ref[1].abs().max()) < 5e-2
        assert torch.equal(generate(short), ref[2])                         # prefill and decode below 64: dense
        out = generate(long)                                              # prefill 2:4, 12 decode steps dense
        assert out.shape == (4, 76) and all(layer.calls["2:4"] == 2 for layer in layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse24_layer_on_cuda_runs_dense_below_its_break_even_and_2of4_above():
    if epts.cusparselt_missing(torch.device("cuda")):
        pytest.skip(epts.cusparselt_missing(torch.device("cuda")))
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).to("cuda", torch.bfloat16)
    with torch.no_grad():
        lin.weight.mul_(epts.mask_from_ranks(epts.nm_ranks(lin.weight.abs().float(), 4), 0.5))  # 2:4
        layer = epts.Sparse24Linear(lin, min_tokens=128)
        for tokens, path in ((1, "dense"), (3, "dense"), (127, "dense"), (128, "2:4"), (131, "2:4"), (2048, "2:4")):
            x = torch.randn(1, tokens, 512, device="cuda", dtype=torch.bfloat16)
            before = dict(layer.calls)
            y, ref = layer(x), lin(x)
            assert layer.calls[path] == before[path] + 1 and y.shape == ref.shape and y.is_contiguous()
            if path == "dense":
                assert torch.equal(y, ref)                                   # the unswapped module, bit for bit
            else:
                assert float((y - ref).abs().max() / ref.abs().max()) < 2e-2
        strided = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
        assert torch.equal(layer(strided), lin(strided)) and layer.calls["dense"] == 4  # 2048 rows, strided: dense
