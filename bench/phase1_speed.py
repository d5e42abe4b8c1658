"""Time the Phase-1 step of EPTS on one block: ms per step (all groups, forward + backward + Adam), the
achieved TFLOP/s, and a profiler summary of where the time goes.

    python bench/phase1_speed.py --model .cache/models/llama-mini --calib .cache/data/calib.txt --device cuda
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402


def step_flops(block: torch.nn.Module, names, n_groups: int, tokens: int, heads_dim: int) -> float:
    """Matmul FLOPs of one Phase-1 step: n_groups x (forward + backward) of the block on `tokens` tokens.

    Linear: 2 * out * in per token forward; backward computes grads for inputs and weights (2x forward).
    Attention: QK^T and AV, 2 * 2 * T^2 * d_attn per sequence forward (full square, as SDPA computes with masks).
    """
    lin = sum(block.get_submodule(n).weight.numel() for n in names)
    fwd = 2 * lin * tokens + 4 * tokens * tokens * heads_dim
    return 3 * fwd * n_groups


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--reference-loop", action="store_true")
    p.add_argument("--no-graph", action="store_true", help="eager steps instead of a replayed CUDA graph")
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
    runtime = epts.Runtime(reference_loop=a.reference_loop, cuda_graph=not a.no_graph)
    if a.check_graph:
        res = [epts.optimize_block(block, names, X[:32], X[:32].clone(), kwargs, epts.EPTSConfig(epochs=1), 0,
                                   epts.Runtime(cuda_graph=g))[0] for g in (False, True)]
        diff = max(float((res[0][n][i] - res[1][n][i]).abs().max() / res[0][n][i].abs().max())
                   for n in res[0] for i in (0, 1))
        print(f"CUDA graph vs eager, 32 steps: max relative adapter difference {diff:.2e}")
    # warm-up (kernels, allocator): one block-optimization with 4 samples
    epts.optimize_block(block, names, X[:4], X[:4].clone(), kwargs, cfg, 0, runtime)
    _, _, report, _, _ = epts.optimize_block(block, names, X, X.clone(), kwargs, cfg, 0, runtime)
    steps = a.epochs * a.nsamples
    cfgm = model.config
    head_dim = getattr(cfgm, "head_dim", None) or cfgm.hidden_size // cfgm.num_attention_heads
    flops = step_flops(block, names, len(cfg.groups), a.seqlen, cfgm.num_attention_heads * head_dim)
    sec = report.seconds
    print(f"model={a.model} device={torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'} "
          f"torch={torch.__version__} reference_loop={a.reference_loop} cuda_graph={runtime.cuda_graph}")
    print("block 0 stages (s): " + ", ".join(f"{k} {v:.3f}" for k, v in sec.items()))
    print(f"Phase 1: {steps} steps, {1000 * sec['phase1'] / steps:.2f} ms/step (7 groups, fwd+bwd+Adam), "
          f"{flops / 1e9:.1f} GFLOP/step -> {flops * steps / sec['phase1'] / 1e12:.2f} TFLOP/s")
    per_block = sec["total"] + sec["phase1"] * (10 / a.epochs - 1)
    print(f"projected at 10 epochs: {per_block:.1f} s/block")
    if a.trace:  # where the time of eager Phase-1 steps goes (graphs hide their kernels from the profiler)
        from torch.profiler import ProfilerActivity, profile
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        _, norms = epts.dense_targets_and_norms(block, names, X[:8], kwargs, 1)
        block.requires_grad_(False)
        layers = epts.attach_hilora(block, names, norms, cfg, torch.Generator().manual_seed(0))
        one, eager = epts.EPTSConfig(epochs=1), epts.Runtime(cuda_graph=False, reference_loop=a.reference_loop)
        epts.phase1_train(block, layers, X[:8], X[:8], kwargs, one, torch.Generator().manual_seed(0), eager)
        with profile(activities=acts) as prof:
            epts.phase1_train(block, layers, X[:8], X[:8], kwargs, one, torch.Generator().manual_seed(0), eager)
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print("torch.profiler, 8 eager Phase-1 steps:")
        print(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=60))


if __name__ == "__main__":
    main()
