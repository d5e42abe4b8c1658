"""Seconds per step of the distillation stage (--distill-epochs): the plain path (epts.logits_at)
beside the fast one (a CUDA graph of the step, epts_scale.DistillGraph), both through
epts_scale.distill as the command line runs it (bf16 autocast on CUDA), on random-weight models of
a real shape (the time does not depend on the weights' values).

    python bench/distill_speed.py --shapes smollm2-135m llama-7b --out $OUT/distill_speed.json
    python bench/distill_speed.py --device cpu --tiny      # a smoke test of this script

Each shape is timed at --blocks and 2 x --blocks decoder blocks and extrapolated linearly to its
layers (a step's time is linear in the blocks); with --blocks 0, at its full depth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402
from scale import SHAPES, build, random_state  # noqa: E402

SMOLLM2 = dict(arch="llama", hidden=576, ffn=1536, heads=9, kv_heads=3, layers=30, vocab=49152)
TINY = dict(arch="llama", hidden=64, ffn=160, heads=4, kv_heads=4, layers=4, vocab=128)


def seconds_per_step(shape: dict, n_blocks: int, a: argparse.Namespace, device: torch.device,
                     reference_loop: bool) -> float:
    """Seconds per step, from two runs of --steps and 2 x --steps windows: their difference over
    --steps, so that a run's one-time cost (the graph's capture) is left out."""
    model = build(shape, n_blocks, a.seqlen, device).to(getattr(torch, a.dtype))
    cfg = epts.recipe_config("tuned", tuned=epts.TunedRecipe(distill_epochs=1))
    state = random_state(model, cfg)
    windows = torch.randint(0, shape["vocab"], (2 * a.steps, a.seqlen),
                            generator=torch.Generator().manual_seed(0))
    options = epts_scale.Options(reference_loop=reference_loop)
    epts_scale.distill(model, state, windows[:2], cfg, device, options)  # warm-up, compile
    seconds = []
    for n in (a.steps, 2 * a.steps):
        lap = epts.stopwatch(device)
        epts_scale.distill(model, state, windows[:n], cfg, device, options)
        seconds.append(lap())
    print(f"  {n_blocks} blocks, {'plain' if reference_loop else 'fast'}: "
          f"{seconds[0]:.2f} s for {a.steps} steps, {seconds[1]:.2f} s for {2 * a.steps}",
          flush=True)
    return (seconds[1] - seconds[0]) / a.steps


def measure(shape: dict, a: argparse.Namespace, device: torch.device) -> dict:
    out = {}
    for path, reference_loop in (("plain", True), ("fast", False)):
        depths = [shape["layers"]] if a.blocks == 0 else [a.blocks, 2 * a.blocks]
        step = {n: seconds_per_step(shape, n, a, device, reference_loop) for n in depths}
        per_layer = (step[depths[-1]] - step[depths[0]]) / a.blocks if a.blocks else 0.0
        out[path] = {"seconds_per_step_measured": {str(n): t for n, t in step.items()},
                     "seconds_per_step_at_shape":
                         step[depths[0]] + per_layer * (shape["layers"] - depths[0])}
        print(f"{path}: {json.dumps(out[path])}", flush=True)
    out["speedup"] = (out["plain"]["seconds_per_step_at_shape"]
                      / out["fast"]["seconds_per_step_at_shape"])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["smollm2-135m"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--blocks", type=int, default=2, help="0: the whole depth")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--dtype", default="float32", help="the weights' (bench/run_bench.py: fp32)")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    device = epts.pick_device(a.device)
    shapes = {"smollm2-135m": SMOLLM2, **SHAPES}
    if a.tiny:
        shapes, a.shapes, a.seqlen, a.steps = {"tiny": TINY}, ["tiny"], 32, 2
    res = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "command": "python " + " ".join(sys.argv), "shapes": {}}
    for name in a.shapes:
        print(name, flush=True)
        res["shapes"][name] = measure(shapes[name], a, device)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
