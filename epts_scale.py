"""epts_scale: EPTS fast and large. The companion of epts.py, which reads like the paper.

Nothing here changes what EPTS computes; each piece is tested equal to the plain path it replaces
(test_epts_scale.py), and epts.py's command line uses it when this file lies beside epts.py:

  1. All groups in one block call: the G settings of a step as one batch, each linear computing
     its G elastic weights with one matmul, and a compiled merge on the GPU.
  2. CUDA graphs of the Phase-1 step and of the distillation step: a step launches hundreds or
     thousands of small kernels, a replay one.
  3. --low-memory: the streams in pinned host memory, Phase 1's activations recomputed group by
     group in the backward, no-grad passes 2 samples at a time.
  4. torchrun: the sparsity groups split over GPUs, the same adapters.
  5. Checkpoints after every block and --resume.
  6. The driver, optimize(): epts.optimize with bf16 autocast, the pieces above, checks, a
     progress bar and the time of every stage.
  7. cuSPARSELt 2:4 kernels, swapped in only where a timed probe finds them faster.

GGUF loading and the checks that protect a user's files stay in epts.py: the README's command
reads a GGUF file, and epts.py copied alone must not overwrite anything either.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import sys
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import epts
from epts import EPTSError, Setting


# 1. All groups in one block call -------------------------------------------------------------

@dataclass
class Slices:
    """G settings of one block call as tensors: sparsity [G] (float64), chain [G, K] (c_gj = 1 if
    adapter j is in slice g's sum of Eq. 2, else 0; the tuned recipe's gain scales c_g0), frozen
    [G, K] (sg(B_j) in slice g) or None, nm [G] (the N:M ranks) or None."""

    sparsity: torch.Tensor
    chain: torch.Tensor
    frozen: torch.Tensor | None = None
    nm: torch.Tensor | None = None


def filled(values: Sequence[int | float | bool | torch.Tensor], device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Python numbers (or 0-d tensors) as one tensor, made on `device` by fills, not copied from
    host memory: a CUDA graph capture (cuda_graph_step) refuses copies from pageable host memory."""
    return torch.stack([v.to(device, dtype) if torch.is_tensor(v) else
                        torch.full((), v, dtype=dtype, device=device) for v in values])


def slices_of(layer: epts.HiLoRALinear, settings: Sequence[Setting]) -> Slices:
    """The tensors of `settings` for `layer`: the paper's chain, and for a TunedHiLoRALinear its
    gain on B_0 in group 0 (ramped with s / hi_0) and sg(B_0) in groups >= 1 (epts.tuned_group0).
    A setting's fields may be tensors (LiveLinear): one CUDA graph then serves every group."""
    device, K = layer.A.device, layer.A.shape[0]
    sparsity = filled([st.sparsity for st in settings], device, torch.float64)
    group = filled([-1 if st.group is None else st.group for st in settings], device, torch.long)
    chain = (torch.arange(K, device=device).view(1, -1) <= group.view(-1, 1)).float()
    nms = [st.nm for st in settings]
    nm = filled(nms, device, torch.bool) if any(torch.is_tensor(v) or v for v in nms) else None
    frozen = None
    if isinstance(layer, epts.TunedHiLoRALinear):
        recipe, gain = layer.recipe, layer.gain
        if recipe.group0_ramp or gain != 1.0:  # in group 0: g(s) = gain * s / hi_0, or gain
            g = gain * (sparsity / layer.top0 if recipe.group0_ramp else torch.ones_like(sparsity))
            g = torch.where(group == 0, g, torch.ones_like(g)).float()
            chain = torch.cat([chain[:, :1] * g.view(-1, 1), chain[:, 1:]], dim=1)
        if recipe.stop_chain_grad:
            first = torch.arange(K, device=device) == 0
            frozen = first.view(1, -1) & (group.view(-1, 1) > 0)
    return Slices(sparsity, chain, frozen, nm)


def chained_delta(A: torch.Tensor, B: torch.Tensor, chain: torch.Tensor,
                  frozen: torch.Tensor | None = None) -> torch.Tensor:
    """sum_j c_gj B_j A_j for G slices at once -> [G, out, in], as one matmul of
    [c_g0 B_0 .. c_g(K-1) B_(K-1)] and [A_0; ..; A_(K-1)]. A [K, r, in], B [K, out, r]."""
    K, out_f, r = B.shape
    B_k = B.permute(1, 0, 2).unsqueeze(0)  # [1, out, K, r]
    if frozen is not None:
        B_k = torch.where(frozen.view(-1, 1, K, 1), B_k.detach(), B_k)
    return (B_k * chain.view(-1, 1, K, 1)).reshape(-1, out_f, K * r) @ A.reshape(K * r, -1)


def plain_merge(weight: torch.Tensor, delta: torch.Tensor, ranks: torch.Tensor, n: torch.Tensor
                ) -> torch.Tensor:
    """(W + delta) * M with M = ranks >= n: Eq. 2's last step, in the delta's dtype."""
    return ((weight + delta) * (ranks >= n)).to(delta.dtype)


@functools.cache
def fused_merge() -> Callable:
    """Speed: at 7B the ~8 memory passes over [G, out, in] of a Phase-1 step's merge cost more than
    the block's matmuls; compiled, it is one kernel each way. Same numbers: the sum is fp32,
    rounded once, and * M is exact."""
    return torch.compile(plain_merge, dynamic=True)


def grouped_weight(layer: epts.HiLoRALinear, sl: Slices) -> torch.Tensor:
    """Eq. 2 for G slices at once -> [G, out, in]; compiled in Phase 1 on the GPU (bf16)."""
    ranks = layer.ranks if sl.nm is None else torch.where(sl.nm.view(-1, 1, 1), layer.nm_ranks,
                                                          layer.ranks)
    n = epts.prune_count(sl.sparsity, ranks.shape[-1]).view(-1, 1, 1)
    delta = chained_delta(layer.A, layer.B, sl.chain, sl.frozen)
    from torch.utils._triton import has_triton  # torch.compile's GPU backend
    training = (torch.is_grad_enabled() and layer.B.requires_grad and layer.B.is_cuda
                and torch.is_autocast_enabled())
    merge = fused_merge() if training and has_triton() else plain_merge
    return merge(layer.base.weight.detach(), delta, ranks, n)


class GroupedLinear(nn.Module):
    """One HiLoRALinear running G settings in one call: part g of the batch times W_g."""

    def __init__(self, layer: epts.HiLoRALinear, settings: Sequence[Setting]):
        super().__init__()
        self.layer, self.slices = layer, slices_of(layer, settings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W, base = grouped_weight(self.layer, self.slices), self.layer.base
        G, (out_f, in_f) = W.shape[0], base.weight.shape
        y = torch.bmm(x.reshape(G, -1, in_f), W.transpose(1, 2))
        if base.bias is not None:
            y = y + base.bias
        return y.reshape(*x.shape[:-1], out_f)


def grouped_forward(block: nn.Module, layers: dict[str, epts.HiLoRALinear],
                    xs: Sequence[torch.Tensor], kwargs: dict, settings: Sequence[Setting]
                    ) -> torch.Tensor:
    """epts.forward_groups in one block call: the G inputs as one batch, each linear grouped.
    Attention, norms and activations act per sample, so this equals G calls."""
    device = epts.device_of(block)
    x = torch.cat([x.to(device, non_blocking=True) for x in xs])
    for name, layer in layers.items():
        epts.swap_module(block, name, GroupedLinear(layer, settings))
    try:
        out = epts.call_block(block, x, kwargs)
    finally:
        for name, layer in layers.items():
            epts.swap_module(block, name, layer)
    return out.view(len(settings), *xs[0].shape)


@dataclass
class Forward:
    """phase1_train's `forward` seam: epts.forward_groups, faster. All slices in one call unless
    reference_loop; with low_memory, each slice's activations are recomputed in the backward
    (activation checkpointing) instead of held for all slices at once."""

    reference_loop: bool = False
    low_memory: bool = False

    def __call__(self, block, layers, xs, kwargs, settings) -> torch.Tensor:
        if self.low_memory and torch.is_grad_enabled():
            return torch.stack([torch.utils.checkpoint.checkpoint(
                grouped_forward, block, layers, [x], kwargs, [s], use_reentrant=False,
                preserve_rng_state=False)[0] for x, s in zip(xs, settings)])
        if self.reference_loop:
            return epts.forward_groups(block, layers, xs, kwargs, settings)
        return grouped_forward(block, layers, xs, kwargs, settings)


# 2. CUDA graphs of the Phase-1 and distillation steps ---------------------------------------------

def cuda_graph_step(step: Callable, opt: torch.optim.Optimizer) -> Callable:
    """phase1_train's `wrap_step` seam (and DistillGraph's): record step(s, lr, *batch) as a CUDA
    graph on its first call and replay it after. The graph reads fixed buffers, so Adam must be
    capturable and its lr a tensor. The warm-up that capture needs runs the step at lr 0 (no
    weight moves) and then resets Adam's moments and step count, so training is unchanged. A call
    whose batch has another shape (a smaller last batch) runs eagerly."""
    graph, buffers, out = None, [], None

    def replay(s: torch.Tensor, lr: float, *batch: torch.Tensor) -> torch.Tensor:
        nonlocal graph, buffers, out
        if graph is None:
            graph, buffers, out = capture(step, opt, s, batch)
        if [b.shape for b in batch] != [b.shape for b in buffers[2:]]:
            return step(s, lr, *batch)
        for buffer, new in zip(buffers, (s, None, *batch)):
            if new is not None:
                buffer.copy_(new)
        buffers[1].fill_(lr)
        graph.replay()
        return out
    return replay


def capture(step: Callable, opt: torch.optim.Optimizer, s: torch.Tensor,
            batch: Sequence[torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, list, torch.Tensor]:
    """(graph, its input buffers [s, lr, *batch], its output) of one step."""
    distinct = {id(b): b.clone() for b in batch}  # a stream read by many slices: one buffer
    buffers = [s.clone(), torch.zeros((), device=s.device), *(distinct[id(b)] for b in batch)]
    opt.param_groups[0]["capturable"] = True  # phase1_train's and distill's Adam: one group
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(*buffers)  # the warm-up, at lr 0
        for moments in opt.state.values():
            for v in moments.values():
                v.zero_()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(*buffers)
    return graph, buffers, out


class LiveLinear(nn.Module):
    """A HiLoRALinear whose `setting` may hold tensors: Eq. 2 as grouped_weight computes it, for
    one slice. A recorded step then reads the group from memory, so one CUDA graph serves all."""

    def __init__(self, layer: epts.HiLoRALinear):
        super().__init__()
        self.layer, self.setting = layer, Setting(0.0, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        W = grouped_weight(self.layer, slices_of(self.layer, [self.setting]))[0]
        return nn.functional.linear(x, W, self.layer.base.bias)


class DistillGraph:
    """epts.distill's `step` seam: epts.distill_step with LiveLinears in place of the elastic
    layers and the setting in a device tensor, recorded as one CUDA graph on the first call and
    replayed after (graph=False: eagerly). Speed: a step through the whole model launches thousands
    of small kernels, and at SmolLM2's size launching them took longer than running them."""

    def __init__(self, graph: bool = True):
        self.graph, self.run, self.code = graph, None, None

    def __call__(self, model: nn.Module, layers: dict[str, epts.HiLoRALinear],
                 window: torch.Tensor, setting: Setting, opt: torch.optim.Optimizer, lr: float
                 ) -> torch.Tensor:
        if self.run is None:
            self.run, self.code = self.record(model, layers, opt, window.device)
        s, k, nm = setting
        for i, v in enumerate((float(s), -1 if k is None else k, float(nm))):
            self.code[i].fill_(v)  # a fill, not a copy from the host: no wait for the GPU
        return self.run(self.code, lr, window)

    def record(self, model: nn.Module, layers: dict[str, epts.HiLoRALinear],
               opt: torch.optim.Optimizer, device: torch.device) -> tuple[Callable, torch.Tensor]:
        """(step(code, lr, window), code): LiveLinears swapped into `model` (epts.distill's
        hilora_attached puts the original linears back), code = [s, group, nm] on `device`."""
        live, blocks = {}, epts.decoder_blocks(model)
        for key, layer in layers.items():
            live[key] = LiveLinear(layer)
            epts.swap_module(blocks[epts.block_of(key)], key.split(".", 1)[1], live[key])
        nm = any(layer.nm_ranks is not None for layer in layers.values())

        def step(code: torch.Tensor, lr: float | torch.Tensor, window: torch.Tensor):
            setting = Setting(code[0], code[1], code[2] > 0 if nm else False)
            return epts.distill_step(model, live, window, setting, opt, lr)
        code = torch.zeros(3, dtype=torch.float64, device=device)
        return (cuda_graph_step(step, opt) if self.graph else step), code


# 4. torchrun: the sparsity groups split over GPUs, the same adapters -------------------------

def world_size() -> int:
    """torchrun's WORLD_SIZE; 1 for `python epts.py`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def process_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def groups_by_rank(n_slices: int, world: int) -> list[list[int]]:
    """The Phase-1 slices each rank runs (slice k: group k; --nm-train's last): r, r+W, ..."""
    return [list(range(r, n_slices, world)) for r in range(world)]


def quiet_other_ranks() -> None:
    """Under torchrun, ranks > 0 print nothing but a crash: rank 0 speaks for all."""
    if world_size() > 1 and int(os.environ.get("RANK", 0)):
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)


def start_ranks(args: argparse.Namespace, device: torch.device, cfg: epts.EPTSConfig
                ) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): a run torchrun cannot split, or a bad world size, in one
    line; then the process group (NCCL on GPUs, gloo on the CPU) and this rank's device,
    cuda:LOCAL_RANK. Nothing for one process."""
    world, n_slices = world_size(), len(epts.phase1_slices(cfg))
    if world == 1:
        return device
    if args.method != "epts" or args.load:
        raise EPTSError(f"torchrun splits EPTS's optimization over ranks; --method {args.method}"
                        f"{' --load' * bool(args.load)} runs in one process: python epts.py")
    if cfg.tuned is not None and cfg.tuned.distill_epochs:
        raise EPTSError("--distill-epochs trains the whole model in one process: python epts.py")
    if world > n_slices:
        raise EPTSError(f"torchrun started {world} ranks, but Phase 1 has {n_slices} group slices "
                        f"to split: use --nproc-per-node {n_slices} or fewer")
    if device.type == "cuda":
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local > torch.cuda.device_count():
            raise EPTSError(f"torchrun started {local} ranks on this machine, but it has "
                            f"{torch.cuda.device_count()} GPU(s): one GPU per rank, so "
                            "--nproc-per-node at most that")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                         device_id=device if device.type == "cuda" else None)
    return device


def end_ranks(cfg: epts.EPTSConfig, result: dict) -> int:
    """After the optimization of `cfg`: the split recorded in `result`, the process group ended;
    returns the rank (ranks > 0 then stop, rank 0 goes on)."""
    slices = len(epts.phase1_slices(cfg))
    result.update(world_size=world_size(), groups_by_rank=groups_by_rank(slices, world_size()))
    rank = process_rank()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return rank


@dataclass
class DistributedForward(Forward):
    """Forward under torchrun: rank r runs the slices r, r+W, r+2W, ... of every block call. The
    no-grad passes add the ranks' outputs with one all-reduce (the others' rows are zero, and
    + 0 is exact). In Phase 1 the other ranks' slices stay zero, since they pass no gradient
    here, except O_0, rank 0's, broadcast as the guide sg(O_0) of Eq. 3."""

    def __call__(self, block, layers, xs, kwargs, settings) -> torch.Tensor:
        rank, world, G = process_rank(), world_size(), len(settings)
        mine = list(range(rank, G, world))
        part = (super().__call__(block, layers, [xs[g] for g in mine], kwargs,
                                 [settings[g] for g in mine]) if mine else None)
        zero = torch.zeros(xs[0].shape, device=epts.device_of(block))  # a block keeps the shape
        if not torch.is_grad_enabled():
            out = torch.stack([part[mine.index(g)] if g in mine else zero for g in range(G)])
            torch.distributed.all_reduce(out)
            return out
        guide = part[0].detach().clone() if rank == 0 else torch.empty_like(zero)
        torch.distributed.broadcast(guide, 0)
        rows = [part[mine.index(g)] if g in mine else guide if g == 0 else zero for g in range(G)]
        return torch.stack(rows)


def distributed_step(step: Callable, opt: torch.optim.Optimizer) -> Callable:
    """The `wrap_step` seam under torchrun: before Adam steps, one all-reduce sums the adapters'
    gradients over the ranks (each rank backpropagated its own slices' losses); after it, one
    more adds up the per-group losses, each from the rank that ran it. Eager steps (collectives
    inside a CUDA graph are untested here)."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def all_reduce_grads(optimizer, args, kwargs) -> None:
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten()
                          for p in params])
        torch.distributed.all_reduce(flat)
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)

    opt.register_step_pre_hook(all_reduce_grads)

    def synced(*args) -> torch.Tensor:
        per_group = step(*args)
        mine = torch.zeros_like(per_group)
        mine[process_rank()::world_size()] = per_group[process_rank()::world_size()]
        torch.distributed.all_reduce(mine)
        return mine
    return synced


@torch.no_grad()
def distributed_targets(block: nn.Module, names: Sequence[str], X: torch.Tensor, kwargs: dict,
                        chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """epts.dense_targets_and_norms under torchrun: chunk c of `chunk` samples runs on rank c mod
    W; one all-reduce per tensor adds the zero-filled rows in, and each linear's per-chunk sums of
    squares are added in chunk order, as one process adds them: the same Y and norms, bit for
    bit. Streams in host memory (--low-memory: no NCCL there): every rank computes them all."""
    if X.device != epts.device_of(block):
        return epts.dense_targets_and_norms(block, names, X, kwargs, chunk)
    rows, Y = epts.in_chunks(X, chunk), torch.zeros_like(X)
    sq = {n: X.new_zeros(len(rows), block.get_submodule(n).in_features) for n in names}
    for c in range(process_rank(), len(rows), world_size()):
        Y[rows[c]], sums = epts.block_outputs_and_stats(block, names, X[rows[c]], kwargs, chunk)
        for n in names:
            sq[n][c] = sums[n]
    for t in (Y, *sq.values()):
        torch.distributed.all_reduce(t)
    return Y, {n: functools.reduce(torch.add, s.unbind()).sqrt() for n, s in sq.items()}


def distributed_blocks(model: nn.Module, device: torch.device, start: int = 0):
    """epts.blocks_on, but a finished block gets back the very tensors it was loaded as (on GPUs,
    mmap'd views of the safetensors files, shared by all ranks through the page cache: one model
    in host memory), where .to() would copy them."""
    home = {p: p.data for p in model.parameters()}
    for i, block in epts.blocks_on(model, device, start):
        yield i, block
        for p in block.parameters():
            p.data = home[p]


# 5. Checkpoints after every block, and --resume ----------------------------------------------

def run_identity(windows: torch.Tensor, dtype: str) -> dict:
    """What a resumed run shares with the interrupted one besides config and base model: the base
    weights' dtype and the calibration windows (their shape and a hash of their token ids)."""
    return {"dtype": dtype, "nsamples": len(windows), "seqlen": windows.shape[-1],
            "calib_sha256": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}


def save_checkpoint(path: str, state: epts.ElasticState, cfg: epts.EPTSConfig, next_block: int,
                    X_dense: torch.Tensor, X_mix: torch.Tensor, windows: torch.Tensor) -> None:
    """The elastic state so far and both streams at the input of `next_block` (atomic write)."""
    streams = {"stream.dense": X_dense.cpu(), "stream.mix": X_mix.cpu()}
    tensors = {**epts.state_tensors(state), **streams}
    header = {**epts.state_header(state), "next_block": next_block, "config": asdict(cfg),
              "run": run_identity(windows, state.base_dtype)}
    epts.write_safetensors(path, tensors, header)


def load_checkpoint(path: str, model: nn.Module, cfg: epts.EPTSConfig, windows: torch.Tensor,
                    model_name: str = "") -> tuple[epts.ElasticState, int, torch.Tensor,
                                                   torch.Tensor]:
    """(state so far, next block, X_dense, X_mix) of a checkpoint made with the same config, base
    model and calibration data; anything else is refused in one line."""
    tensors, header = epts.read_safetensors(path)
    saved, given = header.get("config", {}), json.loads(json.dumps(asdict(cfg)))
    differ = [f"{k} {saved.get(k)} (now {given.get(k)})" for k in sorted(set(saved) | set(given))
              if saved.get(k) != given.get(k)]
    if differ:
        raise EPTSError(f"checkpoint '{path}' was made with other settings: {'; '.join(differ)}; "
                        "remove it or run with the same arguments")
    state = epts.state_from(tensors, header)
    epts.check_fingerprint(state, model, model_name)
    now = run_identity(windows, epts.weight_dtype(model))
    for key, value in header.get("run", {}).items():
        if now[key] != value:
            raise EPTSError(f"checkpoint '{path}' was made with another {key.replace('_', ' ')} "
                            f"({value}, now {now[key]}): other calibration data, --seqlen, "
                            "--nsamples or --dtype; remove it or run with the same arguments")
    return state, header["next_block"], tensors["stream.dense"], tensors["stream.mix"]


def checkpoint_file(args: argparse.Namespace) -> str | None:
    """<--save>.checkpoint (in --checkpoint-dir if given, else beside --save), or epts.checkpoint
    in a --checkpoint-dir without --save; None when the run writes no checkpoint."""
    if args.method != "epts" or args.load or not (args.checkpoint_dir or args.save):
        return None
    name = os.path.basename(args.save) + ".checkpoint" if args.save else "epts.checkpoint"
    return os.path.join(args.checkpoint_dir or os.path.dirname(os.path.abspath(args.save)), name)


def checkpoint_path(args: argparse.Namespace) -> str | None:
    """The checkpoint file, checked: writable, outside the model folder, and an existing one is
    only ever continued (--resume), never replaced by another run."""
    path = checkpoint_file(args)
    if path is None:
        if args.resume:
            raise EPTSError("--resume needs --save or --checkpoint-dir (where the checkpoint "
                            "lives) and --method epts")
        return None
    if os.path.exists(args.model) and epts.inside(path, args.model):
        raise EPTSError(f"the checkpoint '{path}' would lie inside the model folder '{args.model}'")
    epts.writable_folder(os.path.dirname(path), "--checkpoint-dir" if args.checkpoint_dir
                         else "--save")
    if os.path.exists(path) and not args.resume:
        raise EPTSError(f"a checkpoint of an interrupted run exists at '{path}': pass --resume to "
                        "continue it, or remove it")
    if args.resume and not os.path.exists(path):
        epts.warn(f"--resume: no checkpoint at '{path}', starting from block 0")
    return path


def resume_hint(args: argparse.Namespace, started: float) -> str | None:
    """After Ctrl-C: how to continue from the checkpoint, if one was written (else None)."""
    path = checkpoint_file(args)
    try:
        header = (epts.read_safetensors(path, header_only=True)[1]
                  if path and os.path.isfile(path) else {})
    except EPTSError:
        header = {}
    if "next_block" not in header:
        return None
    return (f"{header['next_block']} finished block(s) are saved in '{path}'; run the same "
            "command with --resume to continue")


# 6. The driver: epts.optimize, fast, checked, with checkpoints and a progress bar -------------

@dataclass
class Options:
    """How optimize runs: never what it computes."""

    amp: bool = True              # bf16 autocast of the elastic passes on CUDA (targets: fp32)
    cuda_graph: bool = True       # record the Phase-1 step once and replay it, on CUDA
    reference_loop: bool = False  # one block call per slice instead of all in one
    low_memory: bool = False      # streams in pinned host memory, activations recomputed
    verbose: bool = False         # a progress bar
    checkpoint: str | None = None  # save the state and both streams after every block here
    resume: bool = False          # continue after the checkpoint's last block
    base_model: str = ""          # the model's name, checked against a checkpoint's

    @property
    def chunk(self) -> int:  # samples per no-grad block call
        return 2 if self.low_memory else 8


def options_from_args(args: argparse.Namespace, checkpoint: str | None = None) -> Options:
    """The Options of epts.py's command line."""
    return Options(amp=not args.no_amp, cuda_graph=not args.no_cuda_graph,
                   reference_loop=args.reference_loop, low_memory=args.low_memory,
                   verbose=not args.quiet, checkpoint=checkpoint,
                   resume=args.resume and checkpoint is not None, base_model=args.model)


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (CUDA: the driver's count; CPU: MemAvailable, else all memory)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f
                        if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_adapter_memory(model: nn.Module, cfg: epts.EPTSConfig, device: torch.device) -> None:
    """Refuse a rank whose adapters cannot fit, in one line, instead of being killed for memory.
    Per block on `device`: A and B with gradients and Adam's two moments (4 copies, fp32) plus the
    chained B of every group in the forward (K x out x K*r); on the host: every block's state."""
    K, r = len(cfg.groups), cfg.rank
    on_device, on_host = {}, 0
    for key, lin in epts.pruned_linears(model).items():
        adapters = K * r * (lin.in_features + lin.out_features) * 4
        need = 4 * adapters + K * lin.out_features * K * r * 4
        on_device[epts.block_of(key)] = on_device.get(epts.block_of(key), 0) + need
        on_host += adapters
    for need, where in ((max(on_device.values()), device), (on_host, torch.device("cpu"))):
        free = free_memory(where)
        if need > free:
            name = "host" if where.type == "cpu" and where != device else str(where)
            raise EPTSError(f"--rank {r}: the adapters need about {need / 2**30:.1f} GiB of {name} "
                            f"memory, but {free / 2**30:.1f} GiB are free; use a smaller --rank")


def check_losses(report: epts.BlockReport, block: int) -> None:
    """A Phase-1 loss that is not finite: an error naming the block, group and epoch."""
    for epoch, losses in enumerate(report.loss_history):
        bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise EPTSError(f"Phase-1 loss became {losses[bad[0]]} in block {block}, group "
                            f"{bad[0]} (epoch {epoch}); try a lower --lr or --no-amp (fp32)")


def restore(model: nn.Module, windows: torch.Tensor, cfg: epts.EPTSConfig, X_dense: torch.Tensor,
            options: Options) -> tuple[int, epts.ElasticState, torch.Tensor, torch.Tensor]:
    """(first block, state, X_dense, X_mix): block 0's, or a --resume checkpoint's. With
    low_memory the streams live in (pinned) host memory and move a batch or chunk at a time."""
    state = epts.ElasticState(list(cfg.groups), list(cfg.mixer), cfg.rank, cfg.tuned,
                              base_model=options.base_model, fingerprint=epts.fingerprint(model),
                              base_dtype=epts.weight_dtype(model))
    start, X_mix = 0, None
    if options.resume and options.checkpoint and os.path.isfile(options.checkpoint):
        state, start, X_dense, X_mix = load_checkpoint(options.checkpoint, model, cfg, windows,
                                                       options.base_model)
    if options.low_memory:
        X_dense = X_dense.cpu().pin_memory() if torch.cuda.is_available() else X_dense.cpu()
    X_mix = epts.empty_stream_like(X_dense).copy_(X_dense if X_mix is None else X_mix)
    return start, state, X_dense, X_mix


def seams(options: Options, device: torch.device, bar) -> tuple[Callable, Callable, Callable]:
    """(forward, wrap_step, dense targets) for epts.optimize_block and this process."""
    count = epts.counting_steps(bar)  # the plain command line's progress bar, the same wrapper
    if world_size() > 1:
        forward = DistributedForward(options.reference_loop, options.low_memory)
        return forward, lambda step, opt: count(distributed_step(step, opt), opt), \
            distributed_targets
    graph = options.cuda_graph and device.type == "cuda" and not options.reference_loop

    def wrap_step(step: Callable, opt: torch.optim.Optimizer) -> Callable:
        return count(cuda_graph_step(step, opt) if graph else step, opt)
    return Forward(options.reference_loop, options.low_memory), wrap_step, \
        epts.dense_targets_and_norms


def optimize(model: nn.Module, windows: torch.Tensor, cfg: epts.EPTSConfig,
             device: str | torch.device = "cpu", options: Options = Options()
             ) -> epts.ElasticState:
    """epts.optimize, fast: the same loop with this module's seams, bf16 autocast of the elastic
    passes, the checks of a run, a checkpoint after every block, the seconds of every stage."""
    device = torch.device(device)
    epts.validate_config(cfg)
    epts.check_windows(model, windows)
    check_adapter_memory(model, cfg, device)
    names = epts.arch_of(model)[1]
    X_dense, kwargs = epts.capture_block_inputs(model.eval(), windows, device)
    start, state, X_dense, X_mix = restore(model, windows, cfg, X_dense, options)
    steps = cfg.epochs * math.ceil(len(windows) / cfg.batch_size)  # per block
    blocks = distributed_blocks if world_size() > 1 else epts.blocks_on
    n_blocks = len(epts.decoder_blocks(model))
    with tqdm(total=steps * n_blocks, initial=steps * start, desc="EPTS", unit="step",
              disable=not options.verbose) as bar:
        forward, wrap_step, targets = seams(options, device, bar)
        for i, block in blocks(model, device, start):
            lap = epts.stopwatch(device)
            Y, norms = targets(block, names, X_dense, kwargs, options.chunk)
            seconds = {"targets": lap()}
            with torch.autocast(device.type, torch.bfloat16, options.amp and device.type == "cuda"):
                adapters, report, X_mix = epts.optimize_block(
                    block, i, norms, X_dense, X_mix, Y, kwargs, cfg, forward, wrap_step,
                    options.chunk)
            report.seconds = {**seconds, **report.seconds}
            report.seconds["total"] = sum(report.seconds.values())
            check_losses(report, i)
            bar.set_postfix(block=i, loss=f"{sum(report.loss_history[-1]):.4g}")
            state.add_block(i, adapters, norms, report)
            X_dense = Y
            if options.checkpoint and process_rank() == 0:  # every rank can read it to resume
                save_checkpoint(options.checkpoint, state, cfg, i + 1, X_dense, X_mix, windows)
    if cfg.tuned is not None and cfg.tuned.distill_epochs:  # the tuned recipe's last stage
        distill(model, state, windows, cfg, device, options)
    return state


def distill(model: nn.Module, state: epts.ElasticState, windows: torch.Tensor,
            cfg: epts.EPTSConfig, device: torch.device, options: Options = Options()
            ) -> list[float]:
    """epts.distill in bf16 autocast (CUDA), each step a CUDA graph replay, with a progress bar."""
    steps = cfg.tuned.distill_epochs * len(windows)
    graph = options.cuda_graph and device.type == "cuda" and not options.reference_loop
    with tqdm(total=steps, desc="distill", unit="step", disable=not options.verbose) as bar, \
            torch.autocast(device.type, torch.bfloat16, options.amp and device.type == "cuda"):
        return epts.distill(model, state, windows, cfg, device, on_step=bar.update,
                            step=DistillGraph() if graph else epts.distill_step)


# 7. 2:4 kernels: cuSPARSELt where a timed probe finds it faster, the dense weight elsewhere --

class Sparse24Linear(nn.Linear):
    """An nn.Linear with a 2:4 weight that runs inputs of at least `min_tokens` rows through
    cuSPARSELt. It holds the original weight and bias Parameters (same state_dict) plus `packed`,
    cuSPARSELt's compressed copy (unsparse24 before changing the weight). Fewer rows (decode
    steps), other dtypes or devices, strided inputs, autograd and any call cuSPARSELt refuses run
    F.linear on the dense weight, as the unswapped module would. `calls` counts both."""

    def __init__(self, linear: nn.Linear, min_tokens: int, config: dict | None = None):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None,
                         device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, no copy
        packed = torch._cslt_compress(linear.weight.detach().contiguous())
        self.register_buffer("packed", packed, persistent=False)
        self.min_tokens, self.config = min_tokens, dict(config or {})
        self.calls = {"2:4": 0, "dense": 0}

    def sparse_mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d [tokens, in] -> x2d W^T + b in one cuSPARSELt call, written row-major (a strided
        (W x^T)^T sends every later op onto slow paths); rows padded to a multiple of 8."""
        tokens, pad = x2d.shape[0], -x2d.shape[0] % 8
        xt = (nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d).t()
        return torch._cslt_sparse_mm(self.packed, xt, self.bias, transpose_result=True,
                                     **self.config)[:tokens]

    def runs_sparse(self, x: torch.Tensor) -> bool:
        return (x.numel() >= self.min_tokens * self.in_features and x.shape[-1] == self.in_features
                and x.is_contiguous() and x.dtype == self.packed.dtype
                and x.device == self.packed.device
                and not (torch.is_grad_enabled()
                         and (x.requires_grad or self.weight.requires_grad)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.runs_sparse(x):
            with contextlib.suppress(RuntimeError):  # a size cuSPARSELt has no kernel for: dense
                y = self.sparse_mm(x.view(-1, self.in_features))
                self.calls["2:4"] += 1
                return y.view(*x.shape[:-1], self.out_features)
        self.calls["dense"] += 1
        return super().forward(x)


@dataclass
class Sparse24Report:
    """What sparse24 did to each pruned linear ("<block index>.<name in block>")."""

    tokens: int                                              # the tokens per forward probed
    swapped: dict[str, float] = field(default_factory=dict)  # -> measured speed-up over dense
    min_tokens: dict[str, int] = field(default_factory=dict)  # -> break-even: fewer run dense
    kept: dict[str, str] = field(default_factory=dict)       # -> why it stays a dense nn.Linear
    fallback_bytes: int = 0  # the dense weights the swapped linears keep for the fallback
    packed_bytes: int = 0    # their compressed copies, on top

    def summary(self) -> str:
        s, m, kept = self.swapped.values(), self.min_tokens.values(), list(self.kept.values())
        text = (f"sparse24 at {self.tokens} tokens per forward: {len(s)} of {len(s) + len(kept)} "
                "linears swapped")
        if s:
            text += (f" ({min(s):.2f}-{max(s):.2f}x; 2:4 from {min(m)}-{max(m)} tokens per call, "
                     f"dense below), keeping {self.fallback_bytes / 2**20:.1f} MiB of dense "
                     f"weights for the fallback (+{self.packed_bytes / 2**20:.1f} MiB packed)")
        return text + "".join(f"\nkept dense: {kept.count(r)} x {r}" for r in dict.fromkeys(kept))


def cusparselt_missing(device: torch.device) -> str | None:
    """Why cuSPARSELt cannot run on `device` (a CUDA GPU of compute capability 8.0+, a torch built
    with it), or None."""
    if device.type != "cuda":
        return f"the model is on {device.type}; the 2:4 kernels run on CUDA GPUs"
    if not torch.backends.cusparselt.is_available():
        return "this torch has no cuSPARSELt"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return (f"{torch.cuda.get_device_name(device)} has no sparse tensor cores (compute "
                "capability < 8.0)")
    return None


def sparse24_refusal(lin: nn.Linear, device: torch.device) -> str | None:
    """Why cuSPARSELt cannot hold this linear, or None: fp16/bf16 only (fp32 would run as TF32),
    sizes multiples of 16, at most 2 non-zeros in every 4 consecutive inputs of a row."""
    W = lin.weight.detach()
    if W.dtype not in (torch.float16, torch.bfloat16):
        return f"{str(W.dtype).replace('torch.', '')} weights (cuSPARSELt runs fp16 and bf16)"
    if lin.out_features % 16 or lin.in_features % 16:
        return "sizes not multiples of 16"
    if W.device != device:
        return f"on {W.device}, not {device}"
    if ((W.view(W.shape[0], -1, 4) != 0).sum(-1) > 2).any():
        return "not 2:4 sparse (export with --export-sparsity 2:4)"
    return None


def seconds_per_call(fn: Callable, label: tuple, device: torch.device, calls: int = 10) -> float:
    """sparse24's timer: the median of 3 runs of `calls` back-to-back calls of fn() after 3
    warm-ups, so host and GPU time overlap as inside a forward (cuSPARSELt plans on every call).
    `label` says what is timed (unused here)."""
    lap, runs = epts.stopwatch(device), []
    for _ in range(3):
        fn()
    for _ in range(3):
        lap()
        for _ in range(calls):
            fn()
        runs.append(lap() / calls)
    return sorted(runs)[1]


def searched_config(layer: Sparse24Linear, x: torch.Tensor, bias: torch.Tensor | None) -> dict:
    """The kernel config cuSPARSELt's own GPU-timed search picks (from the host, its per-call
    planning hides the differences); {} where this torch cannot search or the call refuses it."""
    try:  # mm_search -> (alg_id, split_k, split_k_mode, max alg_id)
        alg, split_k, mode, _ = torch._C._cusparselt.mm_search(layer.packed, x.t(), bias, None,
                                                               None, True)
        config = dict(alg_id=int(alg), split_k=int(split_k), split_k_mode=int(mode))
        layer.config = config
        layer.sparse_mm(x)
        return config
    except (AttributeError, RuntimeError, TypeError, ValueError):
        return {}


@torch.no_grad()
def probe24(lin: nn.Linear, tokens: int, timer: Callable, tol: float = 2e-2) -> dict:
    """One linear alone on `tokens` random rows -> {dense_seconds, min_tokens, config} or
    {refused: why}. The 2:4 result must be within `tol` of dense relative to max |dense| (both
    round to bf16/fp16, in other orders); the break-even: rows halved while 2:4 stays faster."""
    out, inp = lin.weight.shape
    gen = torch.Generator(lin.weight.device).manual_seed(0)  # leaves the caller's RNG alone
    x = torch.randn(tokens, inp, generator=gen, device=lin.weight.device, dtype=lin.weight.dtype)

    def dense(n: int) -> float:
        return timer(lambda: nn.functional.linear(x[:n], lin.weight, lin.bias),
                     ("dense", out, inp, n))
    try:
        layer, ref = Sparse24Linear(lin, tokens), nn.functional.linear(x, lin.weight, lin.bias)
        layer.config = searched_config(layer, x, lin.bias)
        err = float((layer.sparse_mm(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    except RuntimeError as e:
        return dict(refused=f"cuSPARSELt refused {out}x{inp}: "
                    f"{str(e).strip().splitlines()[0][:80]}")
    if not err <= tol:
        return dict(refused=f"wrong results from cuSPARSELt (rel. error {err:.1e})")
    smallest = tokens
    with contextlib.suppress(RuntimeError):  # refused at a size: the break-even lies above it
        while (n := smallest // 2) >= 16 and timer(lambda: layer.sparse_mm(x[:n]),
                                                   ("2:4", out, inp, n)) < dense(n):
            smallest = n
    return dict(dense_seconds=dense(tokens), min_tokens=smallest, config=layer.config)


@torch.no_grad()
def speedup_in_block(model: nn.Module, keys: Sequence[str], probe: dict, x: torch.Tensor,
                     kwargs: dict, timer: Callable) -> float:
    """The speed-up of the m linears `keys` (one block, one shape) as a forward sees it: their block
    timed with them on 2:4 (T_24) and dense (T), interleaved, the faster of 2 rounds each, the
    saving spread over them:

        speed-up = t / (t - (T - T_24) / m),    t = probe["dense_seconds"], one linear alone

    cuSPARSELt plans every call on the host: alone that time shows, in a forward it overlaps."""
    linears, prefix, times = epts.pruned_linears(model), epts.arch_of(model)[0], {}
    swapped = {k: Sparse24Linear(linears[k], probe["min_tokens"], probe["config"]) for k in keys}
    block = epts.decoder_blocks(model)[epts.block_of(keys[0])]
    out, inp = linears[keys[0]].weight.shape
    try:
        for kind in ("block dense", "block 2:4") * 2:
            for k in keys:
                epts.swap_module(model, f"{prefix}.{k}",
                                 swapped[k] if kind == "block 2:4" else linears[k])
            label = (kind, out, inp, x.shape[0] * x.shape[1], len(keys))
            seconds = timer(lambda: epts.call_block(block, x, kwargs), label)
            times[kind] = min(times.get(kind, math.inf), seconds)
    finally:
        for k in keys:  # the dense linears back, whatever happened
            epts.swap_module(model, f"{prefix}.{k}", linears[k])
    t, saved = probe["dense_seconds"], (times["block dense"] - times["block 2:4"]) / len(keys)
    return t / max(t - saved, 1e-3 * t)


def probe_shapes(model: nn.Module, by_shape: dict, tokens: int, timer: Callable,
                 margin: float) -> dict:
    """probe24 and speedup_in_block for every weight shape, in the first block that has it, all
    before anything is swapped -> {shape: probe}; a probe below `margin` is refused."""
    W = next(iter(epts.pruned_linears(model).values())).weight
    seqlen = min(tokens, 2048, getattr(model.config, "max_position_embeddings", 2048))
    ids = torch.randint(model.config.vocab_size, (-(-tokens // seqlen), seqlen),
                        generator=torch.Generator().manual_seed(0))  # at least `tokens` tokens
    x, kwargs = epts.capture_block_inputs(model, ids, W.device, W.dtype) if by_shape else (None, {})
    linears, probes = epts.pruned_linears(model), {}
    for shape, keys in by_shape.items():
        probe = probes[shape] = probe24(linears[keys[0]], tokens, timer)
        if "refused" in probe:
            continue
        first = [k for k in keys if epts.block_of(k) == epts.block_of(keys[0])]
        probe["speedup"] = speedup_in_block(model, first, probe, x, kwargs, timer)
        if probe["speedup"] < margin:
            probe["refused"] = (f"not {margin:.2f}x faster in a forward at {tokens} tokens "
                                f"({shape[0]}x{shape[1]}: {probe['speedup']:.2f}x)")
    return probes


def sparse24(model: nn.Module, tokens: int, timer: Callable | None = None, margin: float = 1.05
             ) -> Sparse24Report:
    """Swap, in place, every pruned linear of a 2:4 model that cuSPARSELt runs `margin` times as
    fast as dense inside a block forward on `tokens` tokens (the tokens per forward you will run,
    e.g. prefill 8 x 2048) for a Sparse24Linear; below its break-even (decode steps) it runs
    dense. `timer(fn, label)` -> seconds per call. On the CPU or without cuSPARSELt: no change, one
    warning. Run under torch.no_grad() (with autograd every call runs dense); unsparse24 undoes."""
    if tokens < 16:
        raise EPTSError(f"sparse24: tokens is the token count of a prefill forward (at least 16), "
                        f"got {tokens}")
    linears, report = epts.pruned_linears(model), Sparse24Report(tokens)
    device = next(iter(linears.values())).weight.device
    if missing := cusparselt_missing(device):
        warnings.warn(f"sparse24: {missing}; the model is unchanged", stacklevel=2)
        report.kept = dict.fromkeys(linears, missing)
        return report
    by_shape = {}
    for key, lin in linears.items():
        if why := sparse24_refusal(lin, device):
            report.kept[key] = why
        else:
            shape = (*lin.weight.shape, lin.weight.dtype, lin.bias is not None)
            by_shape.setdefault(shape, []).append(key)
    timer = timer or functools.partial(seconds_per_call, device=device)
    probes = probe_shapes(model, by_shape, tokens, timer, margin)
    for shape, keys in by_shape.items():
        for key in keys:
            swap24(model, key, probes[shape], report)
    return report


def swap24(model: nn.Module, key: str, probe: dict, report: Sparse24Report) -> None:
    """One linear swapped for a Sparse24Linear as its shape's probe says, or kept and why."""
    if "refused" in probe:
        report.kept[key] = probe["refused"]
        return
    layer = Sparse24Linear(epts.pruned_linears(model)[key], probe["min_tokens"], probe["config"])
    epts.swap_module(model, f"{epts.arch_of(model)[0]}.{key}", layer)
    report.swapped[key], report.min_tokens[key] = probe["speedup"], layer.min_tokens
    report.fallback_bytes += layer.weight.numel() * layer.weight.element_size()
    report.packed_bytes += layer.packed.numel() * layer.packed.element_size()


def unsparse24(model: nn.Module) -> nn.Module:
    """Undo sparse24: every Sparse24Linear back to a plain nn.Linear, same weight and bias."""
    prefix = epts.arch_of(model)[0]
    for key, lin in epts.pruned_linears(model).items():
        if isinstance(lin, Sparse24Linear):
            plain = nn.Linear(lin.in_features, lin.out_features, lin.bias is not None,
                              device="meta")
            plain.weight, plain.bias = lin.weight, lin.bias
            epts.swap_module(model, f"{prefix}.{key}", plain)
    return model
