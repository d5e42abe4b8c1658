"""Tests for epts_scale.py: every fast path equal to the plain path of epts.py it replaces, and the
companion's own behaviour (torchrun, checkpoints and --resume, 2:4 kernels). Tiny random OPT and
LLaMA models on the CPU; the CUDA-only tests skip without a GPU.

Run:  python -m pytest -q test_epts_scale.py
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import sys
import types
import warnings

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import epts
import epts_scale
from conftest import cli, no_work, one_line_error, run_cli, tiny_model
from epts import Setting
from epts_scale import Options


# ------------------------------------------------------------------------------------- fixtures


def some_windows(n: int, seqlen: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, seqlen), generator=torch.Generator().manual_seed(seed))


OPTIMIZE_BLOCK = inspect.signature(epts.optimize_block)  # before any test patches it


def block_index(*args, **kwargs) -> int:
    """The `index` argument of a call to epts.optimize_block, read by name."""
    return OPTIMIZE_BLOCK.bind(*args, **kwargs).arguments["index"]


def interrupt_at_block(monkeypatch, index: int) -> None:
    """Ctrl-C when a run reaches block `index` (the blocks before it are finished and
    checkpointed)."""
    real = epts.optimize_block

    def interrupted(*a, **k):
        if block_index(*a, **k) == index:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(epts, "optimize_block", interrupted)


def block0_io(model, windows):
    """Block 0's captured inputs X and call kwargs."""
    return epts.capture_block_inputs(model, windows)


def hilora_block(model, X, kwargs, cfg):
    """Block 0 with its linears wrapped by (Tuned)HiLoRALinear (dense norms from X), and every
    B_k random and non-zero, so that each adapter of the chain changes the outputs."""
    block = epts.decoder_blocks(model)[0]
    _, norms = epts.dense_targets_and_norms(block, epts.arch_of(model)[1], X, kwargs, chunk=2)
    block.requires_grad_(False)
    layers = epts.attach_hilora(block, norms, cfg, torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for layer in layers.values():
        layer.B.data.copy_(torch.randn(layer.B.shape, generator=gen) * 0.05)
    return block, layers


def max_state_difference(a: epts.ElasticState, b: epts.ElasticState) -> float:
    """max |a - b| over every adapter, activation norm and group-0 gain (the gains kept or
    dropped the same)."""
    assert set(a.adapters) == set(b.adapters)
    gains = [(r.group0_gain, s.group0_gain) for r, s in zip(a.reports, b.reports)]
    assert len(gains) == len(a.reports) == len(b.reports)
    assert all((x == 0) == (y == 0) for x, y in gains)
    diffs = [(x - y).abs().max().item() for k in a.adapters
             for x, y in zip((*a.adapters[k], a.act_norms[k]), (*b.adapters[k], b.act_norms[k]))]
    return max(diffs + [abs(x - y) for x, y in gains])


def assert_same_adapters(a: epts.ElasticState, b: epts.ElasticState, rtol=1e-4, atol=1e-6):
    assert set(a.adapters) == set(b.adapters)
    for key, (A, B) in a.adapters.items():
        torch.testing.assert_close(b.adapters[key][0], A, rtol=rtol, atol=atol)
        torch.testing.assert_close(b.adapters[key][1], B, rtol=rtol, atol=atol)
    assert [r.group0_gain for r in a.reports] == [r.group0_gain for r in b.reports]
    assert any(B.abs().max() > 0 for _, B in a.adapters.values())  # something was trained


# ------------------------------------------------------- 1. all groups in one call = one per group

RECIPES = {  # name -> (config, the gain of each layer of block 0, or None: the layers' own)
    "paper": (epts.EPTSConfig(rank=4, nm_train="2:4"), None),
    "tuned, gain 0.5": (epts.recipe_config("tuned", rank=4, nm_train="2:4"), [0.5] * 7),
    "tuned, no ramp, a gain per layer": (
        epts.recipe_config("tuned", rank=4, nm_train="2:4",
                           tuned=epts.TunedRecipe(group0_ramp=False)),
        [0.0, 0.25, 0.5, 0.75, 1.0, 0.5, 0.25]),
}


def elastic_block(arch: str, recipe: str):
    """(block, layers, kwargs, X) of block 0 of a tiny model, elastic with `recipe`: random B,
    N:M ranks (--nm-train 2:4), the recipe's gains."""
    model = tiny_model(arch, n_layers=1)
    X, kwargs = block0_io(model, some_windows(4))
    cfg, gains = RECIPES[recipe]
    block, layers = hilora_block(model, X, kwargs, cfg)
    for layer, gain in zip(layers.values(), gains or []):
        layer.gain = gain
    return block, layers, kwargs, X


def seven_settings() -> list[Setting]:
    """One setting per group, as a Phase-1 step draws them, except that group 2's slice is the
    mask alone (Setting(s, None)) and group 4's is --nm-train's N:M slice at 2:4 (group 2)."""
    s = epts.draw_sparsities(epts.EPTSConfig(), 1, torch.Generator().manual_seed(1))[0]
    settings = [Setting(s[k], k) for k in range(7)]
    settings[2] = Setting(s[2], None)
    settings[4] = Setting(torch.tensor(0.5, dtype=torch.float64), 2, True)
    return settings


@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_all_groups_in_one_call_equal_one_call_per_group(arch, recipe):
    block, layers, kwargs, X = elastic_block(arch, recipe)
    settings = seven_settings()
    xs = [X[[g % 4, (g + 1) % 4]] for g in range(7)]  # another input per slice
    with torch.no_grad():
        fast = epts_scale.grouped_forward(block, layers, xs, kwargs, settings)
        ref = epts.forward_groups(block, layers, xs, kwargs, settings)
    assert fast.shape == (7, *xs[0].shape)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert all(type(block.get_submodule(n)) is type(layer) for n, layer in layers.items())


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_batched_eq2_equals_the_literal_eq2_of_every_layer(recipe):
    _, layers, _, _ = elastic_block("llama", recipe)
    settings = seven_settings()
    with torch.no_grad():
        for layer in layers.values():
            batched = epts_scale.grouped_weight(layer, epts_scale.slices_of(layer, settings))
            for g, setting in enumerate(settings):
                layer.setting = setting
                literal = layer.weight()
                torch.testing.assert_close(batched[g], literal, rtol=1e-6, atol=1e-6)
                assert torch.equal(batched[g] == 0, literal == 0)  # the same mask, exactly


def gradients(layers) -> list[torch.Tensor]:
    grads = [p.grad.clone() for layer in layers.values() for p in (layer.A, layer.B)]
    for layer in layers.values():
        layer.A.grad = layer.B.grad = None
    return grads


def both_paths_backward(block, layers, kwargs, X, settings) -> list[list[torch.Tensor]]:
    """The gradients of sum(O^2) over the slices, from one call per group and from one call."""
    out = []
    for forward in (epts.forward_groups, epts_scale.grouped_forward):
        forward(block, layers, [X[:2]] * len(settings), kwargs, settings).pow(2).sum().backward()
        out.append(gradients(layers))
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_one_call_gives_the_gradients_of_one_call_per_group(recipe):
    block, layers, kwargs, X = elastic_block("opt", recipe)
    ref, fast = both_paths_backward(block, layers, kwargs, X, seven_settings())
    for r, f in zip(ref, fast):  # within 1e-5 of each gradient's largest entry
        assert float((f - r).abs().max()) <= 1e-5 * float(r.abs().max())
    assert all(g.abs().max() > 0 for g in ref)


@pytest.mark.parametrize("recipe", ["paper", "tuned, gain 0.5"])
def test_with_stop_chain_grad_b0_gets_no_gradient_from_groups_1_and_up(recipe):
    block, layers, kwargs, X = elastic_block("opt", recipe)
    high = [s for s in seven_settings() if s.group]  # groups >= 1 only, the N:M slice too
    for grads in both_paths_backward(block, layers, kwargs, X, high):
        B_grads = grads[1::2]
        assert all(g[1:].abs().max() > 0 for g in B_grads)
        b0_moves = [bool(g[0].abs().max() > 0) for g in B_grads]
        assert b0_moves == [recipe == "paper"] * len(B_grads)  # the paper's chain trains B_0 too


# --------------------------------------------------------------- 2. whole runs: the same adapters

def counting(forward, seen: list):
    """`forward`, recording the samples per slice of every call with autograd on (Phase 1)."""
    def counted(block, layers, xs, *rest):
        if torch.is_grad_enabled():
            seen.append(len(xs[0]))
        return forward(block, layers, xs, *rest)
    return counted


@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_optimize_gives_the_plain_adapters_with_an_uneven_last_batch(recipe, monkeypatch):
    """5 samples in batches of 2: the last batch holds one sample, and every sample is trained on
    in every epoch, on both paths."""
    windows = some_windows(5, seed=2)
    cfg = epts.recipe_config(recipe, rank=4, epochs=2, lr=1e-3, batch_size=2)
    plain_seen, fast_seen = [], []
    plain = epts.optimize(tiny_model("opt", n_layers=1), windows, cfg,
                          forward=counting(epts.forward_groups, plain_seen))
    monkeypatch.setattr(epts_scale, "grouped_forward",
                        counting(epts_scale.grouped_forward, fast_seen))
    fast = epts_scale.optimize(tiny_model("opt", n_layers=1), windows, cfg, "cpu", Options())
    assert plain_seen == fast_seen == [2, 2, 1] * 2  # Phase 1: 2 epochs of batches 2, 2, 1
    assert_same_adapters(plain, fast)


@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_low_memory_gives_the_plain_adapters_and_losses(recipe):
    windows = some_windows(4, seed=3)
    cfg = epts.recipe_config(recipe, rank=2, epochs=2, batch_size=2, lr=5e-3)
    plain = epts.optimize(tiny_model("opt"), windows, cfg)
    low = epts_scale.optimize(tiny_model("opt"), windows, cfg, "cpu", Options(low_memory=True))
    assert_same_adapters(plain, low)
    for a, b in zip(low.reports, plain.reports):
        assert sum(a.loss_history, []) == pytest.approx(sum(b.loss_history, []), rel=1e-4)
        assert a.mix_sparsities == b.mix_sparsities


def test_reference_loop_gives_the_default_options_adapters(monkeypatch):
    windows = some_windows(4, seed=4)
    cfg = epts.EPTSConfig(rank=4, epochs=2, batch_size=2, lr=5e-3, nm_train="2:4")
    calls = []
    monkeypatch.setattr(epts, "forward_groups", counting(epts.forward_groups, calls))
    default = epts_scale.optimize(tiny_model("llama"), windows, cfg, "cpu", Options())
    assert calls == []  # the default calls each block once per step
    loop = epts_scale.optimize(tiny_model("llama"), windows, cfg, "cpu",
                               Options(reference_loop=True))
    assert calls == [2, 2] * 2 * 2  # 2 epochs of 2 batches, in each of 2 blocks
    assert_same_adapters(default, loop)


# --------------------------------------------------------------------------------- 3. CUDA only

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@needs_cuda
@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_cuda_graph_step_trains_the_eager_steps_adapters(recipe):
    """The CUDA graph only replays the same step (bf16 autocast both ways): 8 samples in batches
    of 3, so the smaller last batch runs eagerly beside the replays."""
    runs = []
    for graph in (False, True):
        cfg = epts.recipe_config(recipe, rank=4, epochs=3, lr=5e-3, batch_size=3)
        runs.append(epts_scale.optimize(tiny_model("llama", n_layers=1), some_windows(8, seed=4),
                                        cfg, "cuda", Options(cuda_graph=graph)))
    assert_same_adapters(runs[0], runs[1], rtol=2e-2, atol=1e-3)


@needs_cuda
@pytest.mark.parametrize("recipe", ["paper", "tuned"])
def test_fused_merge_trains_the_plain_merges_adapters(recipe, monkeypatch):
    """The compiled merge of Phase 1 (CUDA autocast) is a speed trick: adapters and losses match
    the plain merge's within bf16 noise."""
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(epts_scale, "fused_merge", lambda: epts_scale.plain_merge)
        cfg = epts.recipe_config(recipe, rank=4, epochs=3, lr=5e-3)
        runs.append(epts_scale.optimize(tiny_model("llama", n_layers=1), some_windows(8, seed=4),
                                        cfg, "cuda", Options()))
    assert_same_adapters(runs[0], runs[1], rtol=2e-2, atol=1e-3)
    losses = [sum(run.reports[0].loss_history, []) for run in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def distilled_twice(nm_train: str | None, device: str, steps: list
                    ) -> list[tuple[epts.ElasticState, list[float]]]:
    """(state, loss per epoch) of the same tuned state distilled with each step function in
    `steps` (2 epochs, 6 windows): the block-wise pass once, then a copy of its state per step."""
    model, windows = tiny_model("llama"), some_windows(6, seed=5)
    cfg = epts.recipe_config("tuned", rank=2, epochs=1, batch_size=2, nm_train=nm_train,
                             tuned=epts.TunedRecipe(distill_epochs=2, distill_lr=1e-2))
    state = epts.optimize(model, windows, dataclasses.replace(
        cfg, tuned=dataclasses.replace(cfg.tuned, distill_epochs=0)))
    runs = []
    for step in steps:
        distilled = copy.deepcopy(state)
        with torch.autocast("cuda", torch.bfloat16, device == "cuda"):
            history = epts.distill(model, distilled, windows, cfg, device, step=step)
        runs.append((distilled, history))
    return runs


def one_distill_step_gradients(state, model, cfg, window, setting, step) -> list[torch.Tensor]:
    """The adapters' gradients after one `step` at `setting` (Adam at lr 0: nothing moves)."""
    with epts.elastic_model(model, copy.deepcopy(state), cfg, torch.Generator()) as layers:
        params = [p for layer in layers.values() for p in (layer.A, layer.B)]
        step(model, layers, window, setting, torch.optim.Adam(params, lr=0.0), 0.0)
        return [p.grad for p in params]


def gradients_in_every_group(nm_train: str | None, device: str, steps: tuple
                             ) -> list[tuple[Setting, list[list[torch.Tensor]]]]:
    """(setting, gradients of each step) at one s in every group and, with nm_train, at its N:M
    slice (group 2): one tuned state and window, a fresh step from each factory in `steps` per
    setting (a DistillGraph records once), bf16 autocast on CUDA."""
    model, window = tiny_model("llama"), some_windows(1, seed=6)
    cfg = epts.recipe_config("tuned", rank=2, epochs=1, batch_size=2, nm_train=nm_train)
    state = epts.optimize(model, some_windows(4, seed=5), cfg)
    model, window = model.to(device), window.to(device)
    settings = [Setting(0.05 + 0.1 * k, k) for k in range(7)]
    settings += [Setting(0.5, epts.group_of(0.5), True)] if nm_train else []
    runs = []
    for setting in settings:
        with torch.autocast("cuda", torch.bfloat16, device == "cuda"):
            runs.append((setting, [one_distill_step_gradients(state, model, cfg, window, setting,
                                                              make()) for make in steps]))
    return runs


@pytest.mark.parametrize("nm_train", [None, "2:4"])
def test_the_live_distillation_step_is_the_plain_step(nm_train):
    """DistillGraph's step reads its setting from a tensor (what lets one CUDA graph serve every
    group); eagerly it is epts.distill_step: the same gradients in every group and N:M, and the
    same training (Adam at lr 1e-2 for 12 steps lets float order show in the 5th digit)."""
    (plain, plain_losses), (live, live_losses) = distilled_twice(
        nm_train, "cpu", [epts.distill_step, epts_scale.DistillGraph(graph=False)])
    assert_same_adapters(plain, live, rtol=1e-3, atol=1e-4)
    assert live_losses == pytest.approx(plain_losses, rel=1e-5)
    steps = (lambda: epts.distill_step, lambda: epts_scale.DistillGraph(graph=False))
    for _, (plain_grads, live_grads) in gradients_in_every_group(nm_train, "cpu", steps):
        for a, b in zip(plain_grads, live_grads):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


@needs_cuda
def test_the_distillation_graph_replays_the_live_step():
    """The CUDA graph replays the live step (bf16 autocast both ways): the same gradients in every
    group and N:M, and the same losses over 2 epochs. Not the same adapters entry by entry: where
    a gradient is near 0, Adam moves an entry by about lr on its sign, which bf16 can flip."""
    (_, eager_losses), (_, graph_losses) = distilled_twice(
        "2:4", "cuda", [epts_scale.DistillGraph(graph=False), epts_scale.DistillGraph()])
    assert graph_losses == pytest.approx(eager_losses, rel=1e-2)
    steps = (lambda: epts_scale.DistillGraph(graph=False), epts_scale.DistillGraph)
    for setting, (eager_grads, graph_grads) in gradients_in_every_group("2:4", "cuda", steps):
        for a, b in zip(eager_grads, graph_grads):
            assert float((b - a).norm()) <= 1e-2 * float(a.norm()) + 1e-6, setting


# --------------------------------------------------------------------- 4. many processes (torchrun)

def rank_main(r: int, world: int, port: int, args: list, interrupt_at: int | None) -> None:
    """One rank of run_ranks: the environment torchrun gives rank r, one thread, epts.main(args);
    interrupt_at: Ctrl-C when the run reaches that block."""
    import os
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                      LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if interrupt_at is not None:
        interrupt_at_block(pytest.MonkeyPatch(), interrupt_at)  # this process only
    sys.exit(epts.main([str(a) for a in args]))


def run_ranks(world: int, args, interrupt_at: int | None = None) -> list[int]:
    """epts.main(args) in `world` processes started from this one, each as torchrun starts a rank,
    with one thread (gloo on the CPU); returns their exit codes. Forked (fast) unless this process
    has initialized CUDA, which a forked child cannot use: then spawned."""
    import multiprocessing
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn" if torch.cuda.is_initialized() else "fork")
    procs = [ctx.Process(target=rank_main, args=(r, world, port, args, interrupt_at))
             for r in range(world)]
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


@pytest.mark.parametrize("arch,recipe,nsamples", [
    ("opt", "paper", "12"),   # targets in chunks of 8: 8 + 4 samples
    ("llama", "tuned", "4")])  # one chunk: rank 1 sends none
def test_two_ranks_write_the_artifact_of_one_process(arch, recipe, nsamples, tiny_dir, tmp_path):
    """torchrun with 2 ranks (gloo): rank r runs the group slices r, r+2, .. and the dense
    targets' chunks r, r+2, ..; the adapters and gains are one process's up to float
    reassociation, the activation norms exactly; only rank 0 writes."""
    run = cli(tiny_dir, arch, "--epochs", "2", "--recipe", recipe, "--eval", "none",
              "--save-dtype", "float32", "--nsamples", nsamples)
    assert one_thread_cli(*run, "--save", tmp_path / "one.safetensors")[0] == 0
    two = tmp_path / "two"
    args = [*run, "--save", two / "s.safetensors", "--json-out", two / "r.json"]
    assert run_ranks(2, args) == [0, 0]
    one = epts.load_elastic(str(tmp_path / "one.safetensors"))
    both = epts.load_elastic(str(two / "s.safetensors"))
    assert max_state_difference(one, both) <= 1e-4
    assert all(torch.equal(one.act_norms[k], both.act_norms[k]) for k in one.act_norms)
    assert any(B.abs().max() > 0 for _, B in both.adapters.values())
    for a, b in zip(one.reports, both.reports):  # each group's loss, from the rank that ran it
        assert sum(a.loss_history, []) == pytest.approx(sum(b.loss_history, []), rel=1e-4)
    res = json.loads((two / "r.json").read_text())
    assert res["world_size"] == 2 and res["groups_by_rank"] == [[0, 2, 4, 6], [1, 3, 5]]
    assert sorted(p.name for p in two.iterdir()) == ["r.json", "s.safetensors"]  # no checkpoint


def test_a_resumed_two_rank_run_equals_a_straight_one(tiny_dir, tmp_path):
    """Ctrl-C in block 1 of a 2-rank run leaves rank 0's checkpoint of block 0; --resume under 2
    ranks (one slice at a time: --low-memory) finishes it with the straight run's result."""
    run = cli(tiny_dir, "llama", "--epochs", "1", "--eval", "none", "--save-dtype", "float32",
              "--low-memory", "--nsamples", "8")  # targets in chunks of 2: 2 per rank
    assert one_thread_cli(*run, "--save", tmp_path / "straight.safetensors")[0] == 0
    cut = [*run, "--save", tmp_path / "cut.safetensors"]
    assert run_ranks(2, cut, interrupt_at=1) == [130, 130]
    checkpoint = tmp_path / "cut.safetensors.checkpoint"
    assert epts.read_safetensors(str(checkpoint), header_only=True)[1]["next_block"] == 1
    assert run_ranks(2, [*cut, "--resume"]) == [0, 0]
    assert not checkpoint.exists()
    straight, resumed = (epts.load_elastic(str(tmp_path / f"{n}.safetensors"))
                         for n in ("straight", "cut"))
    assert max_state_difference(straight, resumed) <= 1e-4
    assert all(torch.equal(straight.act_norms[k], resumed.act_norms[k])
               for k in straight.act_norms)


def test_ranks_give_each_block_back_the_tensors_it_was_loaded_as(tiny_dir):
    """distributed_blocks hands every finished block back the very tensors it was loaded as
    (transformers maps the safetensors files: the ranks share one copy of the model through the
    page cache), where epts.blocks_on copies each block back (bf16 here: the blocks are worked on
    in fp32, so a copy is visible on the CPU too)."""
    model, _ = epts.load_model(str(tiny_dir / "opt"), "bfloat16", torch.device("cpu"),
                               verbose=False)
    loaded = [p.untyped_storage().data_ptr() for p in model.parameters()]
    seen = []
    for _, block in epts_scale.distributed_blocks(model, torch.device("cpu")):
        seen.append({p.dtype for p in block.parameters()})
    assert seen == [{torch.float32}] * 2  # each block worked on in fp32 ...
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] == loaded  # ... given back
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for _ in epts.blocks_on(model, torch.device("cpu")):
        pass
    assert [p.untyped_storage().data_ptr() for p in model.parameters()] != loaded  # copied back


def test_a_bad_world_size_is_one_line_on_rank_0_and_silence_elsewhere(tiny_dir, monkeypatch,
                                                                      capfd):
    """More ranks than group slices, more ranks than GPUs, or a method torchrun does not split:
    one line and exit 2 before any work and without a process group; ranks > 0 print nothing."""
    no_work(monkeypatch)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    one_line_error(*run_cli(*cli(tiny_dir, "opt"))[::2],
                   "torchrun started 8 ranks, but Phase 1 has 7 group slices")
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--method", "wanda"))[::2],
                   "--method wanda runs in one process")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    args = cli(tiny_dir, "opt")
    args[args.index("--device") + 1] = "cuda"
    one_line_error(*run_cli(*args)[::2],
                   "torchrun started 2 ranks on this machine, but it has 1 GPU(s)")
    assert not torch.distributed.is_initialized()
    capfd.readouterr()
    assert run_ranks(8, cli(tiny_dir, "opt")) == [2] * 8  # the one line comes from rank 0 alone
    out, err = capfd.readouterr()
    assert out == "" and [line for line in err.splitlines() if line] == [
        ("error: torchrun started 8 ranks, but Phase 1 has 7 group slices to split: use "
         "--nproc-per-node 7 or fewer")]


# ------------------------------------------------------------------- 5. checkpoints and --resume

def test_kill_and_resume_gives_the_same_result_as_a_straight_run(tmp_path, monkeypatch):
    windows = some_windows(4, seed=3)
    cfg = epts.EPTSConfig(rank=2, epochs=2, batch_size=2)
    straight = epts_scale.optimize(tiny_model("llama"), windows, cfg)
    ckpt = str(tmp_path / "ckpt.safetensors")
    real_save = epts_scale.save_checkpoint

    def dies_after_block_0(path, state, cfg, next_block, *rest, **kw):
        real_save(path, state, cfg, next_block, *rest, **kw)
        if next_block == 1:  # the process "dies" after block 0 was checkpointed
            raise KeyboardInterrupt

    monkeypatch.setattr(epts_scale, "save_checkpoint", dies_after_block_0)
    with pytest.raises(KeyboardInterrupt):
        epts_scale.optimize(tiny_model("llama"), windows, cfg, "cpu",
                            Options(checkpoint=ckpt))
    monkeypatch.setattr(epts_scale, "save_checkpoint", real_save)
    assert epts.read_safetensors(ckpt, header_only=True)[1]["next_block"] == 1
    started, real_block = [], epts.optimize_block
    monkeypatch.setattr(epts, "optimize_block",
                        lambda *a, **k: started.append(block_index(*a, **k)) or real_block(*a, **k))
    resumed = epts_scale.optimize(tiny_model("llama"), windows, cfg, "cpu",
                                  Options(checkpoint=ckpt, resume=True, low_memory=True))
    assert started == [1]  # only the missing block ran; Options may differ
    assert_same_adapters(straight, resumed, rtol=1e-5, atol=1e-7)
    assert max_state_difference(straight, resumed) <= 1e-6


def test_resume_refuses_a_checkpoint_of_other_settings_naming_them(tmp_path):
    windows, cfg, ckpt = some_windows(4, seed=3), epts.EPTSConfig(rank=2, epochs=1), tmp_path / "c"
    epts_scale.optimize(tiny_model("llama"), windows, cfg, "cpu", Options(checkpoint=str(ckpt)))
    with pytest.raises(epts.EPTSError, match=r"other settings: rank 2 \(now 3\); remove it") as no:
        epts_scale.optimize(tiny_model("llama"), windows, epts.EPTSConfig(rank=3, epochs=1), "cpu",
                            Options(checkpoint=str(ckpt), resume=True))
    assert "epochs" not in str(no.value) and "mixer" not in str(no.value)


def test_resume_refuses_other_calibration_data_seqlen_or_dtype(tmp_path):
    windows = some_windows(4, seed=3)
    cfg, ckpt = epts.EPTSConfig(rank=2, epochs=1), str(tmp_path / "ck")
    model = tiny_model("llama", n_layers=2)
    state = epts_scale.optimize(model, windows, cfg)
    X = torch.zeros(4, 32, 32)
    epts_scale.save_checkpoint(ckpt, state, cfg, 1, X, X.clone(), windows)
    other = windows.clone()
    other[0, 0] = (other[0, 0] + 1) % 64  # same sizes, other tokens
    bf16 = tiny_model("llama", n_layers=2).to(torch.bfloat16)
    for w, m, message in [(other, model, "calib sha256"), (windows[:, :16], model, "seqlen"),
                          (windows, bf16, "dtype")]:
        with pytest.raises(epts.EPTSError, match=message):
            epts_scale.load_checkpoint(ckpt, m, cfg, w)
    assert epts_scale.load_checkpoint(ckpt, model, cfg, windows)[1] == 1


def test_checkpoints_are_named_after_the_output_and_never_taken_over(tiny_dir, tmp_path,
                                                                     monkeypatch):
    real = epts.optimize_block
    interrupt_at_block(monkeypatch, 1)
    a = tmp_path / "a.safetensors"
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", a))
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    assert code == 130 and checkpoint.exists()
    assert "1 finished block(s)" in err and "--resume" in err and "Traceback" not in err
    monkeypatch.setattr(epts, "optimize_block", real)
    # another run in the same folder gets its own checkpoint, gone once its state is saved
    b = tmp_path / "b.safetensors"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", b))[0] == 0
    assert checkpoint.exists() and not (tmp_path / "b.safetensors.checkpoint").exists()
    # the same command without --resume is refused; with it, it finishes and cleans up
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", a))[::2],
                   "pass --resume")
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", a, "--resume"))
    assert code == 0 and not checkpoint.exists() and a.exists()


def test_checkpoint_dir_takes_the_checkpoint_away_from_the_save_folder(tiny_dir, tmp_path,
                                                                       monkeypatch):
    interrupt_at_block(monkeypatch, 1)
    args = cli(tiny_dir, "opt", "--epochs", "1", "--save", tmp_path / "out" / "a.safetensors",
               "--checkpoint-dir", tmp_path / "ck")
    assert run_cli(*args)[0] == 130
    assert [p.name for p in (tmp_path / "ck").iterdir()] == ["a.safetensors.checkpoint"]
    assert not (tmp_path / "out").exists()


def test_resume_with_nothing_to_resume_says_so(tiny_dir, tmp_path):
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--sparsities", "0.5", "--save",
                                tmp_path / "a.safetensors", "--resume"))
    assert code == 0 and "no checkpoint" in err and "starting from block 0" in err


def stop_before_the_model(monkeypatch) -> None:
    """End the run with a one-line error where the model would load."""
    def stop(*a, **k):
        raise epts.EPTSError("stopped where the model loads")
    monkeypatch.setattr(epts, "load_model", stop)


def test_loading_the_checkpoint_of_an_unfinished_run_names_resume(tiny_dir, tmp_path,
                                                                  monkeypatch):
    interrupt_at_block(monkeypatch, 1)
    a = tmp_path / "a.safetensors"
    assert run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", a))[0] == 130
    checkpoint = tmp_path / "a.safetensors.checkpoint"
    stop_before_the_model(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--load", checkpoint))[::2],
                   "is a checkpoint of an unfinished run, not an elastic state; continue it with "
                   "--resume")
    with pytest.raises(epts.EPTSError, match="checkpoint of an unfinished run"):  # the library too
        epts.load_elastic(str(checkpoint))


def test_ctrl_c_after_save_says_the_state_is_saved_and_load_continues(tiny_dir, tmp_path,
                                                                      monkeypatch):
    art = tmp_path / "a.safetensors"
    art.write_bytes(b"the state of an earlier run")
    interrupt_at_block(monkeypatch, 0)  # before this run saved anything ...
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", art, "--overwrite"))
    assert code == 130 and "--load" not in err  # ... the earlier file is not offered
    monkeypatch.undo()

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(epts, "perplexity", ctrl_c)  # Ctrl-C in the evaluation, after --save
    code, _, err = run_cli(*cli(tiny_dir, "opt", "--epochs", "1", "--save", art, "--overwrite"))
    assert code == 130 and f"saved in '{art}'" in err and f"--load {art} instead of --save" in err


# -------------------------------------------------------------------- 6. 2:4 kernels (sparse24)

def tiny_24(arch: str = "llama") -> torch.nn.Module:
    """A tiny model pruned to 2:4 by magnitude, in bf16 (cuSPARSELt's dtype)."""
    model = tiny_model(arch)
    epts.prune_magnitude(model, "2:4")
    return model.to(torch.bfloat16)


@pytest.fixture
def fake_cusparselt(monkeypatch):
    """cuSPARSELt on the CPU: "compression" keeps the weight, the matmul is F.linear, its search
    finds config (alg 3, split-k 1, mode 0); records each matmul's tokens. Every entry point is
    faked: a real one, given host tensors on a CUDA machine, faults later in an unrelated call."""
    calls = []

    def sparse_mm(packed, xt, bias=None, transpose_result=False, **config):
        # x^T column-major (ld = in); out = x W^T + b, row-major
        assert transpose_result and xt.stride() == (1, xt.shape[0])
        assert set(config) <= {"alg_id", "split_k", "split_k_mode"}
        calls.append(xt.shape[1])
        return torch.nn.functional.linear(xt.t(), packed, bias)

    def mm_search(packed, xt, bias, alpha, out_dtype, transpose_result):
        return 3, 1, 0, 5  # (alg_id, split_k, split_k_mode, max alg_id)
    monkeypatch.setattr(torch._C, "_cusparselt", types.SimpleNamespace(mm_search=mm_search),
                        raising=False)
    monkeypatch.setattr(epts_scale, "cusparselt_missing", lambda device: None)
    monkeypatch.setattr(torch, "_cslt_compress", lambda W: W.clone())
    monkeypatch.setattr(torch, "_cslt_sparse_mm", sparse_mm)
    return calls


def made_up_timer(rules: dict, seen: list | None = None):
    """A timer that runs fn once and returns made-up seconds. A linear alone: dense 1.0, 2:4
    rules[(out, in)](tokens). A block with m such linears: 100 on their dense weights, on 2:4
    less m times their saving (the same speed-up)."""
    def timer(fn, label, device=None):
        fn()
        if seen is not None:
            seen.append(label)
        kind, out, inp, n, *m = label
        t = 1.0 if kind.endswith("dense") else rules[(out, inp)](n)
        return 100 - m[0] * (1 - t) if kind.startswith("block") else t
    return timer


def test_sparse24_swaps_only_what_its_probe_finds_faster(fake_cusparselt):
    model = tiny_24()  # q/o 32x32, k/v 16x32, gate/up 64x32, down 32x64 (out x in)
    with torch.no_grad():  # not 2:4: never swapped, whatever the speed
        epts.decoder_blocks(model)[1].mlp.up_proj.weight.fill_(0.01)
    seen = []
    timer = made_up_timer({(64, 32): lambda n: 0.5 if n >= 64 else 2.0,  # 2x from 64 tokens on
                           (16, 32): lambda n: 0.8,                       # 1.25x at every size
                           (32, 32): lambda n: 1.5,                       # slower
                           (32, 64): lambda n: 0.97}, seen)               # 3%: below the margin
    report = epts_scale.sparse24(model, 256, timer=timer)
    swapped = {f"{i}.{n}" for i in (0, 1) for n in ("mlp.gate_proj", "mlp.up_proj",
                                                     "self_attn.k_proj", "self_attn.v_proj")}
    swapped -= {"1.mlp.up_proj"}
    assert set(report.swapped) == swapped
    assert {k: (round(report.swapped[k], 9), report.min_tokens[k]) for k in swapped} == {
        k: (2.0, 64) if "mlp" in k else (1.25, 16) for k in swapped}
    assert "not 2:4" in report.kept["1.mlp.up_proj"]
    assert "forward at 256 tokens (32x32: 0.67x)" in report.kept["0.self_attn.q_proj"]
    assert "1.03x" in report.kept["1.mlp.down_proj"] and len(report.kept) == 14 - len(swapped)
    assert sum(label[0] == "dense" and label[3] == 256 for label in seen) == 4  # one per shape,
    assert sorted(label[1:] for label in seen if label[0] == "block 2:4") == sorted(  # in block 0
        [(64, 32, 256, 2), (16, 32, 256, 2), (32, 32, 256, 2), (32, 64, 256, 1)] * 2)  # twice
    lins = epts.pruned_linears(model)
    assert report.fallback_bytes == sum(lins[k].weight.numel() * 2 for k in swapped)
    assert all(isinstance(lins[k], epts_scale.Sparse24Linear) == (k in swapped) for k in lins)
    assert all(lins[k].config == dict(alg_id=3, split_k=1, split_k_mode=0) for k in swapped)
    assert "7 of 14 linears swapped" in report.summary() and "not 2:4" in report.summary()


def test_sparse24_runs_dense_below_the_break_even_and_changes_no_output(fake_cusparselt):
    model = tiny_24()
    ref = copy.deepcopy(model)
    timer = made_up_timer({(64, 32): lambda n: 0.5 if n >= 64 else 2.0,
                           (16, 32): lambda n: 0.8, (32, 32): lambda n: 1.5,
                           (32, 64): lambda n: 0.97})
    epts_scale.sparse24(model, 256, timer=timer)  # gate/up from 64 tokens, k/v from 16
    lins = epts.pruned_linears(model)
    fake_cusparselt.clear()
    with torch.no_grad():
        for batch, seqlen, expected in ((1, 8, []), (4, 12, [48] * 4), (4, 32, [128] * 8)):
            ids = torch.randint(0, 64, (batch, seqlen),
                                generator=torch.Generator().manual_seed(seqlen))
            assert torch.equal(model(ids).logits, ref(ids).logits)  # the fake kernel is exact
            assert sorted(fake_cusparselt) == sorted(expected)  # 48 tokens: only k/v
            fake_cusparselt.clear()
        prompts = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(1))
        tokens = model.generate(prompts, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(tokens, ref.generate(prompts, max_new_tokens=6, do_sample=False,
                                                pad_token_id=0))
    assert fake_cusparselt == [128] * 8  # the prefill; every decode step dense
    assert lins["0.self_attn.k_proj"].calls == {"2:4": 3, "dense": 1 + 5}  # 48, 128, prefill
    assert epts_scale.unsparse24(model) is model
    assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())


def test_sparse24_decides_by_the_block_forward_not_by_the_linear_alone(fake_cusparselt):
    """cuSPARSELt plans every call on the host: alone a 2:4 call can look slow while a forward
    hides that time, and the reverse. The block's time decides; the linear alone gives only the
    break-even."""
    def timer(block_24, alone_24):
        def time(fn, label):
            fn()
            kind, *_, m = label if label[0].startswith("block") else (*label, 0)
            return {"dense": 1.0, "2:4": alone_24, "block dense": 100.0,
                    "block 2:4": 100 + m * block_24}[kind]
        return time
    model = tiny_24()
    # slow alone, 2x in the block
    report = epts_scale.sparse24(model, 256, timer=timer(block_24=-0.5, alone_24=2.0))
    assert len(report.swapped) == 14 and {round(s, 9) for s in report.swapped.values()} == {2.0}
    assert set(report.min_tokens.values()) == {256}  # alone it never breaks even
    epts_scale.unsparse24(model)
    # fast alone, slower in the block
    report = epts_scale.sparse24(model, 256, timer=timer(block_24=0.1, alone_24=0.5))
    assert not report.swapped
    assert all("(32x32: 0.91x)" in report.kept[f"{i}.self_attn.q_proj"] for i in (0, 1))

    def failing(fn, label):  # fails while the block runs on 2:4: the block gets its linears back
        if label[0] == "block 2:4":
            raise RuntimeError("the timer failed")
        return 1.0
    with pytest.raises(RuntimeError, match="the timer failed"):
        epts_scale.sparse24(model, 256, timer=failing)
    assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())


def test_sparse24_layer_falls_back_to_the_dense_weight_never_to_an_exception(fake_cusparselt,
                                                                            monkeypatch):
    lin = torch.nn.Linear(32, 16).to(torch.bfloat16)
    layer = epts_scale.Sparse24Linear(lin, min_tokens=16)
    x = torch.randn(4, 8, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.allclose(layer(x), lin(x)) and layer.calls == {"2:4": 1, "dense": 0}
        wide = torch.randn(4, 8, 48, dtype=torch.bfloat16)[..., :32]  # rows 48 apart: ld != in
        for other in (x[:1, :3], x.transpose(0, 1), wide, x[:1, :1]):  # 3 rows, strided, 1 row
            assert torch.equal(layer(other), lin(other))
    assert torch.equal(layer(x), lin(x))  # autograd on: the dense path
    assert layer.calls == {"2:4": 1, "dense": 5}

    def refuse(*args, **kwargs):
        raise RuntimeError("CUDA error: operation not supported when calling "
                           "cusparseLtDenseDescriptorInit")
    monkeypatch.setattr(torch, "_cslt_sparse_mm", refuse)
    with torch.no_grad():
        assert torch.equal(layer(x), lin(x)) and layer.calls["dense"] == 6
    cpu = torch.device("cpu")
    assert epts_scale.sparse24_refusal(torch.nn.Linear(32, 16), cpu).startswith("float32")
    assert "multiples of 16" in epts_scale.sparse24_refusal(torch.nn.Linear(32, 20).bfloat16(),
                                                            cpu)


def test_sparse24_without_cuda_changes_nothing_and_warns_once(monkeypatch):
    model = tiny_24()
    ref = copy.deepcopy(model)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = epts_scale.sparse24(model, 16384)
    assert len(caught) == 1 and "sparse24: the model is on cpu" in str(caught[0].message)
    assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert not report.swapped and len(report.kept) == 14
    assert "0 of 14 linears swapped" in report.summary()
    monkeypatch.setattr(torch.backends.cusparselt, "is_available", lambda: False)
    assert epts_scale.cusparselt_missing(torch.device("cuda")) == "this torch has no cuSPARSELt"


def test_cli_sparse24_evaluates_the_2of4_row_through_the_swap(tiny_dir, tmp_path, monkeypatch,
                                                              fake_cusparselt):
    base = cli(tiny_dir, "llama", "--method", "magnitude", "--pattern", "2:4",
               "--dtype", "bfloat16")
    monkeypatch.setattr(epts_scale, "seconds_per_call", made_up_timer({
        (32, 32): lambda n: 0.5, (16, 32): lambda n: 2.0, (64, 32): lambda n: 0.5,
        (32, 64): lambda n: 0.5}))
    runs = {}
    for extra in ((), ("--sparse24",)):
        out = tmp_path / f"{len(extra)}.json"
        code, printed, err = run_cli(*base, *extra, "--json-out", out)
        assert code == 0, err
        runs[extra] = json.loads(out.read_text())
    report = runs[("--sparse24",)]["sparse24"]
    assert len(report["swapped"]) == 10
    assert set(report["kept"]) == {f"{i}.self_attn.{n}_proj" for i in (0, 1) for n in "kv"}
    assert "10 of 14 linears swapped" in printed and fake_cusparselt  # the 2:4 row ran through it
    assert runs[()]["results"][0]["ppl"] == runs[("--sparse24",)]["results"][0]["ppl"]


def test_cli_sparse24_needs_the_2of4_pattern(tiny_dir, monkeypatch):
    no_work(monkeypatch)
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--sparsities", "2:4"))[::2],
                   "use --pattern 2:4")
    one_line_error(*run_cli(*cli(tiny_dir, "opt", "--sparse24"))[::2],
                   "use it with --pattern 2:4")


@needs_cuda
def test_sparse24_on_cuda_swaps_runs_and_generates_the_unswapped_tokens():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                                         num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=512))
    epts.prune_magnitude(model.eval(), "2:4")
    model.to("cuda", torch.bfloat16)
    if epts_scale.cusparselt_missing(torch.device("cuda")):
        pytest.skip(epts_scale.cusparselt_missing(torch.device("cuda")))
    short, long = (torch.randint(0, 512, shape, device="cuda") for shape in ((3, 8), (4, 64)))

    def generate(ids):
        return model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                              pad_token_id=0)
    with torch.no_grad():
        ref = [model(short).logits, model(long).logits, generate(short)]
        report = epts_scale.sparse24(model, 4096)  # the real probe: only what it measured faster
        assert all(s >= 1.05 and 16 <= report.min_tokens[k] <= 4096
                   for k, s in report.swapped.items())
        epts_scale.unsparse24(model)
        assert all(type(lin) is torch.nn.Linear for lin in epts.pruned_linears(model).values())
        # the real kernels behind a timer that calls 2:4 twice as fast from 64 tokens on
        shapes = [(256, 256), (128, 256), (512, 256), (256, 512)]
        report = epts_scale.sparse24(model, 256, timer=made_up_timer(
            {s: (lambda n: 0.5 if n >= 64 else 2.0) for s in shapes}))
        layers = list(epts.pruned_linears(model).values())
        assert len(report.swapped) == 14 and set(report.min_tokens.values()) == {64}
        assert torch.equal(model(short).logits, ref[0])  # 24 tokens: the dense path, bit for bit
        assert all(layer.calls["2:4"] == 0 for layer in layers)
        logits = model(long).logits  # 256 tokens: the 2:4 kernel
        assert all(layer.calls["2:4"] == 1 for layer in layers)
        assert float((logits - ref[1]).abs().max() / ref[1].abs().max()) < 5e-2
        assert torch.equal(generate(short), ref[2])  # prefill and decode below 64: dense
        out = generate(long)  # prefill 2:4, 12 decode steps dense
        assert out.shape == (4, 76) and all(layer.calls["2:4"] == 2 for layer in layers)


@needs_cuda
def test_sparse24_layer_on_cuda_runs_dense_below_its_break_even_and_2of4_above():
    if epts_scale.cusparselt_missing(torch.device("cuda")):
        pytest.skip(epts_scale.cusparselt_missing(torch.device("cuda")))
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 256).to("cuda", torch.bfloat16)
    with torch.no_grad():
        mask = epts.mask_from_ranks(epts.nm_ranks(lin.weight.abs().float(), 4), 0.5)  # 2:4
        lin.weight.mul_(mask)
        layer = epts_scale.Sparse24Linear(lin, min_tokens=128)
        for tokens, path in ((1, "dense"), (3, "dense"), (127, "dense"), (128, "2:4"),
                             (131, "2:4"), (2048, "2:4")):
            x = torch.randn(1, tokens, 512, device="cuda", dtype=torch.bfloat16)
            before = dict(layer.calls)
            y, ref = layer(x), lin(x)
            assert layer.calls[path] == before[path] + 1
            assert y.shape == ref.shape and y.is_contiguous()
            if path == "dense":
                assert torch.equal(y, ref)  # the unswapped module, bit for bit
            else:
                assert float((y - ref).abs().max() / ref.abs().max()) < 2e-2
        strided = torch.randn(2, 1024, 512, device="cuda", dtype=torch.bfloat16).transpose(0, 1)
        assert torch.equal(layer(strided), lin(strided))  # 2048 rows, strided: dense
        assert layer.calls["dense"] == 4
