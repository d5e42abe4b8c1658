"""Time the Phase-1 step of EPTS on one block: ms per step (all groups, forward + backward + Adam),
the achieved TFLOP/s, and a profiler summary of where the time goes.

    python bench/phase1_speed.py --model .cache/models/llama-mini --calib .cache/data/calib.txt \
        --device cuda

Block 0 is optimized as epts_scale.optimize optimizes every block (its seams: all groups in one
block call, a CUDA graph of the step, bf16 autocast on CUDA).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402


def step_flops(block: torch.nn.Module, names, n_groups: int, tokens: int, heads_dim: int
               ) -> float:
    """Matmul FLOPs of one Phase-1 step: n_groups x (forward + backward) of the block on `tokens`
    tokens.

    Linear: 2 * out * in per token forward; backward computes grads for inputs and weights (2x
    forward). Attention: QK^T and AV, 2 * 2 * T^2 * d_attn per sequence forward (full square, as
    SDPA computes with masks).
    """
    lin = sum(block.get_submodule(n).weight.numel() for n in names)
    fwd = 2 * lin * tokens + 4 * tokens * tokens * heads_dim
    return 3 * fwd * n_groups


def amp(options: epts_scale.Options, device: torch.device) -> torch.autocast:
    """The autocast epts_scale.optimize runs the elastic passes under (bf16 on CUDA)."""
    return torch.autocast(device.type, torch.bfloat16, options.amp and device.type == "cuda")


def optimize_block0(block: torch.nn.Module, names, X: torch.Tensor, kwargs: dict,
                    cfg: epts.EPTSConfig, options: epts_scale.Options, device: torch.device
                    ) -> tuple[dict, epts.BlockReport]:
    """(adapters, report) of block 0 optimized on X (both streams start there) as
    epts_scale.optimize does it; report.seconds: targets, phase1, low_check, phase2, total."""
    forward, wrap_step, targets = epts_scale.seams(options, device, tqdm(disable=True))
    lap = epts.stopwatch(device)
    Y, norms = targets(block, names, X, kwargs, options.chunk)
    seconds = {"targets": lap()}
    with amp(options, device):
        adapters, report, _ = epts.optimize_block(block, 0, norms, X, X.clone(), Y, kwargs, cfg,
                                                  forward, wrap_step, options.chunk)
    report.seconds = {**seconds, **report.seconds}
    report.seconds["total"] = sum(report.seconds.values())
    return adapters, report


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reference-loop", action="store_true")
    p.add_argument("--no-graph", action="store_true",
                   help="eager steps instead of a replayed CUDA graph")
    p.add_argument("--check-graph", action="store_true",
                   help="train 32 steps with and without the CUDA graph and compare the adapters")
    p.add_argument("--trace", action="store_true", help="print a torch.profiler summary of 5 steps")
    a = p.parse_args()
    device = torch.device(a.device)
    model, tok = epts.load_model(a.model, "float32", device, verbose=False)
    windows = epts.calibration_windows(tok, a.calib, a.nsamples, a.seqlen, 0)
    _, names = epts.arch_of(model)
    X, kwargs = epts.capture_block_inputs(model, windows, device)
    block = epts.decoder_blocks(model)[0].to(device, torch.float32)
    cfg = epts.EPTSConfig(epochs=a.epochs)
    options = epts_scale.Options(reference_loop=a.reference_loop, cuda_graph=not a.no_graph)
    if a.check_graph:
        one = epts.EPTSConfig(epochs=1)
        res = [optimize_block0(block, names, X[:32], kwargs, one,
                               epts_scale.Options(cuda_graph=g), device)[0] for g in (False, True)]
        diff = max(float((res[0][n][i] - res[1][n][i]).abs().max() / res[0][n][i].abs().max())
                   for n in res[0] for i in (0, 1))
        print(f"CUDA graph vs eager, 32 steps: max relative adapter difference {diff:.2e}")
    # warm-up (kernels, allocator): one block-optimization with 4 samples
    optimize_block0(block, names, X[:4], kwargs, cfg, options, device)
    _, report = optimize_block0(block, names, X, kwargs, cfg, options, device)
    steps = a.epochs * a.nsamples
    cfgm = model.config
    head_dim = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
    flops = step_flops(block, names, len(cfg.groups), a.seqlen, cfgm.num_attention_heads * head_dim)
    sec = report.seconds
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"model={a.model} device={gpu} torch={torch.__version__} "
          f"reference_loop={a.reference_loop} cuda_graph={options.cuda_graph}")
    print("block 0 stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in sec.items()))
    print(f"Phase 1: {steps} steps, {1000 * sec['phase1'] / steps:.2f} ms/step (7 groups, "
          f"fwd+bwd+Adam), {flops / 1e9:.1f} GFLOP/step -> "
          f"{flops * steps / sec['phase1'] / 1e12:.2f} TFLOP/s")
    per_block = sec["total"] + sec["phase1"] * (10 / a.epochs - 1)
    print(f"projected at 10 epochs: {per_block:.1f} s/block")
    if a.trace:  # where eager Phase-1 steps spend their time (graphs hide kernels from profilers)
        trace(block, names, X[:8], kwargs, a.reference_loop, device)


def trace(block: torch.nn.Module, names, X: torch.Tensor, kwargs: dict, reference_loop: bool,
          device: torch.device) -> None:
    """A torch.profiler table of 8 eager Phase-1 steps (one epoch on X's 8 samples, after one
    untimed epoch), with epts_scale's block calls under its autocast."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _, norms = epts.dense_targets_and_norms(block, names, X, kwargs, 1)
    one, eager = epts.EPTSConfig(epochs=1), epts_scale.Options(cuda_graph=False)
    forward = epts_scale.Forward(reference_loop=reference_loop)
    with epts.hilora_attached(block, norms, one, torch.Generator().manual_seed(0)) as layers:
        inputs = [X] * len(epts.phase1_slices(one))

        def train() -> None:
            with amp(eager, device):
                epts.phase1_train(block, layers, inputs, X, kwargs, one,
                                  torch.Generator().manual_seed(0), forward)
        train()
        with profile(activities=acts) as prof:
            train()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print("torch.profiler, 8 eager Phase-1 steps:")
    print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
