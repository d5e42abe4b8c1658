"""What a full-size EPTS run costs: time and memory per block for LLaMA-7B- and OPT-1.3B-shaped
models with random weights (time and memory do not depend on weight values), extrapolated to the
whole model.

    python bench/scale.py               # on the GPU machine; updates bench/scale.json's "models"
    python bench/scale.py --tiny --device cpu --out /tmp/scale.json  # a smoke test of this script
    torchrun --nproc-per-node N bench/scale.py --shapes llama-7b     # N GPUs: the `multi_gpu` key

For each shape: build `--blocks` decoder blocks from a config, calibrate on random tokens (128 x
2048 by default), run EPTS with `--epochs` epochs (default 1, scaled linearly to the paper's 10:
Phase-1 time is linear in the number of steps) and one dedicated single-sparsity run at 0.5 (rank
8 x 4), and report: Phase-1 ms per step and per block, Phase-2 and target time, peak GPU memory,
host/GPU memory of the two streams, the achieved TFLOP/s of the Phase-1 step, and the projection

    total = n_layers x (targets + phase1 x 10 / epochs + low_check + phase2)   (per-block means)
    five dedicated runs = 5 x n_layers x (dedicated block time, Phase 1 scaled the same way)

Every run is epts_scale.optimize, as the command line runs it (bf16, all groups in one block call,
a CUDA graph of the Phase-1 step); the low-memory run is epts_scale.Options(low_memory=True), as
`--low-memory`. One-time costs of a process (torch.compile of Phase 1's fused merge) are paid in a
short warm-up run first and reported as `warmup_seconds_once`, so the projection does not multiply
them.

Under torchrun (WORLD_SIZE set; N = 1 is the one-GPU baseline of the same code path, N > 1 runs
epts_scale's torchrun path: rank r runs the group slices r, r+N, ...) only the EPTS run is timed
(no dedicated or low-memory run; `--low-memory` times that path instead) and rank 0 adds
`multi_gpu[shape][N]` to --out, keeping what the file holds: per-stage seconds of rank 0 (the
collectives keep the ranks in step), peak GPU memory of every rank, the projection above, the
speed-up over N = 1 per stage, and `multi_gpu[shape]["projection"]`: per stage, t_W = t_1 *
ceil(n/W)/n / e, with n the slices the stage splits (Phase 1 and Phase 2: the 7 groups; the
low-group check: 2; the dense targets: the chunks of 8 samples, dealt round-robin) and e the
parallel efficiency measured at the largest N (ideal time / measured time), for W = 4 and W = 7
(7 groups: at most 7 ranks, so an 8-GPU node runs 7).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402
from phase1_speed import step_flops  # noqa: E402

SHAPES = {
    "llama-7b": dict(arch="llama", hidden=4096, ffn=11008, heads=32, kv_heads=32, layers=32,
                     vocab=32000),
    "opt-1.3b": dict(arch="opt", hidden=2048, ffn=8192, heads=32, kv_heads=32, layers=24,
                     vocab=50272),
    "llama-70b": dict(arch="llama", hidden=8192, ffn=28672, heads=64, kv_heads=8, layers=80,
                      vocab=32000),
}
DEFAULT = ("llama-7b", "opt-1.3b")  # what runs without --shapes (the 70B shape only when named)
TINY = {
    "llama-tiny": dict(arch="llama", hidden=64, ffn=160, heads=4, kv_heads=4, layers=32,
                       vocab=128),
    "opt-tiny": dict(arch="opt", hidden=64, ffn=256, heads=4, kv_heads=4, layers=24, vocab=128),
    "llama-70b-tiny": dict(arch="llama", hidden=64, ffn=224, heads=8, kv_heads=2, layers=80,
                           vocab=128),
}
# what each stage splits over ranks
STAGE_SLICES = {"targets": "chunks", "phase1": 7, "low_check": 2, "phase2": 7}


def build(shape: dict, n_blocks: int, seqlen: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    if shape["arch"] == "llama":
        cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                          intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                          num_key_value_heads=shape["kv_heads"], num_hidden_layers=n_blocks,
                          max_position_embeddings=max(seqlen, 2048))
        cls = LlamaForCausalLM
    else:
        cfg = OPTConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"],
                        ffn_dim=shape["ffn"], num_attention_heads=shape["heads"],
                        num_hidden_layers=n_blocks, word_embed_proj_dim=shape["hidden"],
                        max_position_embeddings=max(seqlen, 2048), dropout=0.0)
        cls = OPTForCausalLM
    torch.manual_seed(0)  # the same random weights on every rank
    with torch.device(device):  # random init where it runs; the blocks are fp32 while optimized
        model = cls(cfg).to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    return model.eval()


def random_windows(shape: dict, a: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, shape["vocab"], (a.nsamples, a.seqlen),
                         generator=torch.Generator().manual_seed(0))


def measure(name: str, shape: dict, a: argparse.Namespace, device: torch.device) -> dict:
    model = build(shape, a.blocks, a.seqlen, device)
    windows = random_windows(shape, a)
    cfg = epts.EPTSConfig(epochs=a.epochs)

    def timed(options: epts_scale.Options = epts_scale.Options()
              ) -> tuple[epts.ElasticState, float, float]:
        """(state, wall seconds, peak GPU GiB) of one epts_scale.optimize with `options` (default:
        as the command line runs it; epts.optimize, the plain paths, records no stage times)."""
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        state = epts_scale.optimize(model, windows, cfg, device, options)
        wall = time.perf_counter() - t0
        peak = (torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
                else float("nan"))
        return state, wall, peak

    low_options = epts_scale.Options(low_memory=True)  # as --low-memory
    # one-time costs of a process (torch.compile of the fused merge, for G = 7 and G = 1) are paid
    # here, not inside the timed per-block stages that the projection multiplies by 10 epochs x
    # n_layers
    t0 = time.perf_counter()
    for options in [epts_scale.Options()] + ([] if a.no_low_memory else [low_options]):
        epts_scale.optimize(model, windows[:2], cfg, device, options)
    warmup = time.perf_counter() - t0
    state, wall, peak = timed()
    # low_memory: streams in pinned host memory, Phase 1's activations recomputed group by group
    low = None if a.no_low_memory else timed(low_options)
    ded = epts_scale.optimize(model, windows, epts.dedicated_config(cfg, 0.5), device)
    names = epts.arch_of(model)[1]
    head_dim = shape["hidden"] // shape["heads"]
    flops = step_flops(epts.decoder_blocks(model)[0], names, len(cfg.groups), a.seqlen,
                       shape["heads"] * head_dim)
    steps = a.epochs * a.nsamples

    def projected(reports) -> float:  # the one formula, below
        return hours(shape, per_stage(reports), a.epochs)
    mean = per_stage(state.reports)
    stream_gib = a.nsamples * a.seqlen * shape["hidden"] * 4 / 2 ** 30  # one fp32 stream
    out = {
        "shape": shape, "measured_blocks": a.blocks, "nsamples": a.nsamples, "seqlen": a.seqlen,
        "epochs_timed": a.epochs, "wall_seconds_measured": wall, "warmup_seconds_once": warmup,
        "per_block_seconds_measured": mean,
        "phase1_ms_per_step": 1000 * mean["phase1"] / steps,
        "phase1_gflop_per_step": flops / 1e9,
        "phase1_tflops_achieved": flops * steps / mean["phase1"] / 1e12,
        "peak_gpu_gib": peak,
        "stream_gib_each_fp32": stream_gib,
        "streams_and_targets_gib": 3 * stream_gib,  # X_dense, X_mix and the targets Y
        "projected_block_seconds_10_epochs": projected(state.reports) * 3600 / shape["layers"],
        "projected_total_hours_10_epochs": projected(state.reports),
        "projected_one_dedicated_hours_10_epochs": projected(ded.reports),
        "projected_five_dedicated_hours_10_epochs": 5 * projected(ded.reports),
        "projected_seven_dedicated_hours_10_epochs": 7 * projected(ded.reports),
        "formula": "n_layers x (targets + phase1 x 10/epochs + low_check + phase2), per-block "
                   "means",
    }
    if low is not None:
        low_state, _, out["peak_gpu_gib_low_memory"] = low
        out["per_block_seconds_measured_low_memory"] = per_stage(low_state.reports)
        out["projected_total_hours_10_epochs_low_memory"] = projected(low_state.reports)
    print(f"{name}: {json.dumps(out, indent=1)}", flush=True)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def random_state(model, cfg: epts.EPTSConfig) -> epts.ElasticState:
    """An elastic state of random adapters (B ~ N(0, 1e-4)) for timing: the values do not change
    the time."""
    state = epts.ElasticState(list(cfg.groups), list(cfg.mixer), cfg.rank, cfg.tuned)
    K, r, g = len(cfg.groups), cfg.rank, torch.Generator().manual_seed(0)
    for key, lin in epts.pruned_linears(model).items():
        out_f, in_f = lin.weight.shape
        state.adapters[key] = (torch.randn(K, r, in_f, generator=g) / in_f ** 0.5,
                               torch.randn(K, out_f, r, generator=g) * 1e-4)
        state.act_norms[key] = torch.ones(in_f)
    state.reports = [epts.BlockReport() for _ in epts.decoder_blocks(model)]
    return state


def measure_tuned(name: str, shape: dict, a: argparse.Namespace, device: torch.device) -> dict:
    """The tuned recipe at this shape: its block-wise pass on --blocks blocks, as measure() times
    the paper's, and the distillation stage's seconds per step on models of --blocks and 2 x
    --blocks blocks, extrapolated linearly to the shape's layers. Projection: n_layers x the
    tuned per-block stages (10 epochs) + --distill-epochs x nsamples x the step."""
    cfg = epts.recipe_config("tuned", epochs=a.epochs,
                             tuned=epts.TunedRecipe(distill_epochs=1))
    model, windows = build(shape, a.blocks, a.seqlen, device), random_windows(shape, a)
    blockwise = dataclasses.replace(cfg, tuned=epts.TunedRecipe())
    epts_scale.optimize(model, windows[:2], blockwise, device)  # warm-up (torch.compile)
    stages = per_stage(epts_scale.optimize(model, windows, blockwise, device).reports)
    del model
    step = {}
    for n_blocks in (a.blocks, 2 * a.blocks):
        model = build(shape, n_blocks, a.seqlen, device)
        state = random_state(model, cfg)
        epts_scale.distill(model, state, windows[:2], cfg, device)  # warm-up
        lap = epts.stopwatch(device)
        epts_scale.distill(model, state, windows[:a.distill_steps], cfg, device)
        step[n_blocks] = lap() / a.distill_steps
        del model
    per_layer = (step[2 * a.blocks] - step[a.blocks]) / a.blocks
    at_shape = step[a.blocks] + per_layer * (shape["layers"] - a.blocks)
    distill_hours = a.distill_epochs * a.nsamples * at_shape / 3600
    out = {"rank": cfg.rank, "per_block_seconds_measured": stages,
           "distill_seconds_per_step_measured": {str(k): v for k, v in step.items()},
           "distill_seconds_per_step_at_shape": at_shape, "distill_epochs": a.distill_epochs,
           "projected_blockwise_hours_10_epochs": hours(shape, stages, a.epochs),
           "projected_distill_hours": distill_hours,
           "projected_total_hours": hours(shape, stages, a.epochs) + distill_hours}
    print(f"{name} tuned: {json.dumps(out, indent=1)}", flush=True)
    return out


def per_stage(reports) -> dict[str, float]:
    return {k: sum(r.seconds.get(k, 0.0) for r in reports) / len(reports)
            for k in ("targets", "phase1", "low_check", "phase2", "total")}


def hours(shape: dict, stages: dict, epochs: int) -> float:
    """n_layers x (targets + phase1 x 10/epochs + low_check + phase2) in hours."""
    per_block = sum(stages[k] for k in STAGE_SLICES) + stages["phase1"] * (10 / epochs - 1)
    return shape["layers"] * per_block / 3600


def measure_ranks(name: str, shape: dict, a: argparse.Namespace, device: torch.device) -> dict:
    """One shape under torchrun: EPTS on `--blocks` blocks as `python epts.py` / torchrun runs it
    (epts_scale.optimize takes the torchrun path when WORLD_SIZE > 1)."""
    world = epts_scale.world_size()
    model = build(shape, a.blocks, a.seqlen, device)
    windows = random_windows(shape, a)
    cfg = epts.EPTSConfig(epochs=a.epochs)
    options = epts_scale.Options(cuda_graph=not a.no_cuda_graph, low_memory=a.low_memory)
    t0 = time.perf_counter()
    # torch.compile of the fused merge, once
    epts_scale.optimize(model, windows[:2], cfg, device, options)
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    state = epts_scale.optimize(model, windows, cfg, device, options)
    wall = time.perf_counter() - t0
    peak = [torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda"
            else float("nan")] * world
    if world > 1:
        torch.distributed.all_gather_object(peak, peak[0])
    stages = per_stage(state.reports)
    slices = len(epts.phase1_slices(cfg))
    return {"world_size": world, "groups_by_rank": epts_scale.groups_by_rank(slices, world),
            # a CUDA graph runs for one process on CUDA only (torchrun's steps are eager)
            "cuda_graph": options.cuda_graph and world == 1 and device.type == "cuda",
            "low_memory": a.low_memory,
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "command": f"torchrun --nproc-per-node {world} bench/scale.py "
                       + " ".join(sys.argv[1:]),
            "measured_blocks": a.blocks, "nsamples": a.nsamples, "seqlen": a.seqlen,
            "epochs_timed": a.epochs, "wall_seconds_measured": wall,
            "warmup_seconds_once": warmup, "per_block_seconds_measured": stages,
            "phase1_ms_per_step": 1000 * stages["phase1"] / (a.epochs * a.nsamples),
            "peak_gpu_gib_per_rank": peak,
            "projected_total_hours_10_epochs": hours(shape, stages, a.epochs),
            "formula": "n_layers x (targets + phase1 x 10/epochs + low_check + phase2), "
                       "per-block means of rank 0"}


def add_speedups(entries: dict, shape: dict) -> None:
    """Speed-ups over N = 1, and the projection to 4 and 7 ranks from the largest measured N (see
    the docstring)."""
    if "1" not in entries:
        return
    one = entries["1"]["per_block_seconds_measured"]
    for n, e in entries.items():
        if n.isdigit():
            e["speedup_over_1"] = {k: one[k] / v
                                   for k, v in e["per_block_seconds_measured"].items() if v > 0}
            e["speedup_over_1"]["projected_10_epochs"] = (
                entries["1"]["projected_total_hours_10_epochs"]
                / e["projected_total_hours_10_epochs"])
    top = max((int(n) for n in entries if n.isdigit()), default=1)
    if top == 1:
        return
    at_top, epochs = entries[str(top)]["per_block_seconds_measured"], entries["1"]["epochs_timed"]
    # the targets' rounds deal out these chunks (of the default options' samples per chunk)
    chunks = -(-entries["1"]["nsamples"] // epts_scale.Options().chunk)
    slices = {k: chunks if n == "chunks" else n for k, n in STAGE_SLICES.items()}

    def ideal(k: str, w: int) -> float:
        return one[k] * -(-slices[k] // w) / slices[k]
    eff = {k: ideal(k, top) / at_top[k] for k in STAGE_SLICES}
    proj = {str(w): {k: ideal(k, w) / eff[k] for k in STAGE_SLICES} for w in (4, 7)}
    entries["projection"] = {
        "from_world_size": top, "efficiency": eff, "per_block_seconds": proj,
        "projected_total_hours_10_epochs": {w: hours(shape, p, epochs) for w, p in proj.items()},
        "formula": "t_W = t_1 x ceil(n/W)/n / e per stage, e = (t_1 x ceil(n/N)/n) / t_N at the "
                   "largest measured N; n: slices the stage splits (STAGE_SLICES); hours as "
                   "projected_total_hours_10_epochs"}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda")
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--tiny", action="store_true",
                   help="tiny shapes and data: a smoke test of this script")
    p.add_argument("--shapes", nargs="+", default=None, help="measure only these shapes")
    p.add_argument("--no-low-memory", action="store_true",
                   help="skip the Options(low_memory=True) measurement")
    p.add_argument("--low-memory", action="store_true",
                   help="torchrun: time the low-memory path instead")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="torchrun with N = 1: eager steps, as N > 1 runs")
    p.add_argument("--tuned", action="store_true", help="measure the tuned recipe and its "
                   "distillation stage instead (models[shape]['tuned'])")
    p.add_argument("--distill-epochs", type=int, default=8, help="--tuned: the projection's")
    p.add_argument("--distill-steps", type=int, default=8, help="--tuned: distillation steps timed")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "scale.json"))
    a = p.parse_args()
    if a.tiny:
        a.nsamples, a.seqlen = min(a.nsamples, 4), min(a.seqlen, 64)
    device = epts.pick_device(a.device)
    if "WORLD_SIZE" in os.environ:  # torchrun: a process group for N > 1, cuda:LOCAL_RANK
        run = argparse.Namespace(method="epts", load=None)  # what start_ranks checks
        device = epts_scale.start_ranks(run, device, epts.EPTSConfig(epochs=a.epochs))
        return main_ranks(a, device)
    import transformers
    res = {}
    if os.path.exists(a.out):  # keep the other shapes and bench/e2e.py's "e2e" entries
        with open(a.out) as f:
            res = json.load(f)
    res.setdefault("models", {})
    env = res.setdefault("env", {})
    env.pop("code", None)
    env.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               torch=torch.__version__, transformers=transformers.__version__)
    for name, shape in (TINY if a.tiny else SHAPES).items():
        if name not in (a.shapes or (TINY if a.tiny else DEFAULT)):
            continue
        if a.tuned:
            res["models"].setdefault(name, {})["tuned"] = measure_tuned(name, shape, a, device)
        else:
            res["models"][name] = measure(name, shape, a, device)
        env.setdefault("commands", {})[name] = "python " + " ".join(sys.argv)
        with open(a.out, "w") as f:  # after every shape: a run cut short keeps what it finished
            json.dump(res, f, indent=1)


def main_ranks(a: argparse.Namespace, device: torch.device) -> None:
    """torchrun: every named shape (default: llama-7b) measured; rank 0 merges
    multi_gpu[shape][N] into --out."""
    for name, shape in (TINY if a.tiny else SHAPES).items():
        if name not in (a.shapes or (["llama-tiny"] if a.tiny else ["llama-7b"])):
            continue
        entry = measure_ranks(name, shape, a, device)
        if epts_scale.process_rank() == 0:
            print(f"{name} on {entry['world_size']} rank(s): {json.dumps(entry, indent=1)}",
                  flush=True)
            res = json.load(open(a.out)) if os.path.isfile(a.out) else {}
            entries = res.setdefault("multi_gpu", {}).setdefault(name, {})
            key = (str(entry["world_size"]) + "-low-memory" * a.low_memory
                   + "-eager" * a.no_cuda_graph)
            entries[key] = entry  # "1", "2", ...: the default path; the others not in speed-ups
            add_speedups(entries, shape)
            with open(a.out, "w") as f:
                json.dump(res, f, indent=1)
    epts_scale.end_ranks(epts.EPTSConfig(epochs=a.epochs), {})  # the process group ends


if __name__ == "__main__":
    main()
