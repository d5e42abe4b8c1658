"""EPTS: Elastic Post-Training Sparsity, a single-file reference.

Xu et al., "Elastic Post-Training Sparsity", KDD 2026 (arXiv 2606.25285). One short block-by-block
optimization turns a pretrained causal LM (OPT, LLaMA) into one *elastic* model that deploys at any
sparsity s in [0, 1) in seconds (trained for (0, 0.7]; above that, the mask alone), instead of one
pruning run per sparsity. In the paper's notation:

    Eq. 1   M(s): Wanda's score |W_ij| * ||X_j||_2, ranked once per row, so the masks nest in s
    Eq. 2   W_s = (W + sum_{j<=k} B_j A_j) * M(s)   for s in sparsity group k      (MS-HiLoRA)
    Eq. 3   L_0 = l(O_0, Y),  L_k = 1/2 l(O_k, sg(O_0)) + 1/2 l(O_k, Y)          (Phase 1)
    Eq. 4   X_mix <- sum_k w_k O_k                                              (MSFM, Phase 2)

The whole algorithm (sections 6-8):

    X_dense = X_mix = the inputs of block 0
    for every decoder block f:
        Y, ||X_j|| = f(X_dense), the norms of its linears' inputs      dense targets, Eq. 1
        Phase 1: Adam on Eq. 3, O_k = f(X_mix; W_{s_k}), s_k drawn in every group k
        keep group 0's adapter only if it helps at s = 0.3             the low-group check
        Phase 2: X_mix = sum_k w_k f(X_mix; W_{s_k})                   Eq. 4
        X_dense = Y
    deploy(model, state, s): W <- W_s                                  any s, or one per block

Sections: 0 configuration, 1 architecture map, 2 masks, 3 MS-HiLoRA, 4 objective, 5 MSFM,
6 calling a block, 7 the two-phase loop, 8 deploy, 9 the tuned recipe (not in the paper). Below the
"harness" banner: baselines, data and evaluation, the elastic artifact, the command line.

epts_scale.py, beside this file, holds what makes EPTS fast and large: all groups in one block
call, bf16, CUDA graphs, low-memory streams, torchrun, checkpoints, 2:4 kernels. The command line
uses it when it is there; this file runs without it, on the plain paths below.

Run:   python epts.py --model facebook/opt-125m
Test:  python -m pytest -q test_epts.py
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn as nn


class EPTSError(Exception):
    """A user-facing error: the command line prints it on one line and exits with status 2."""


# 0. Configuration: the paper's hyper-parameters ------------------------------------------------

# The seven sparsity groups (lo, hi]. Group 0 covers the easy low sparsities; the others are narrow
# because reconstruction gets hard quickly above 40%. A sparsity of exactly 0 means "dense".
GROUPS: tuple[tuple[float, float], ...] = ((0.00, 0.40), (0.40, 0.45), (0.45, 0.50), (0.50, 0.55),
                                           (0.55, 0.60), (0.60, 0.65), (0.65, 0.70))
# MSFM weights w_k (Eq. 4): high-sparsity outputs drift furthest from the dense stream.
MIXER_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2)


@dataclass
class EPTSConfig:
    """The hyper-parameters of a run. The defaults are the paper's and its authors' code's."""

    groups: tuple[tuple[float, float], ...] = GROUPS
    mixer: tuple[float, ...] = MIXER_WEIGHTS
    rank: int = 8                              # LoRA rank r of every adapter pair (B_k, A_k)
    epochs: int = 10                           # Phase-1 epochs per block
    lr: float = 1e-3                           # Adam, cosine-annealed to 0
    batch_size: int = 1                        # calibration windows per Phase-1 step
    low_check_sparsity: float | None = 0.3     # where the low-group check compares (None: no check)
    seed: int = 0
    fixed_sparsity: float | str | None = None  # one sparsity or N:M: the dedicated baseline
    nm_train: str | None = None                # "N:M", not in the paper: also train on N:M masks
    tuned: TunedRecipe | None = None           # not in the paper: the tuned recipe (section 9)


# 1. Architecture map: which modules are the decoder blocks, which linears get pruned ------------

# model_type -> (path of the decoder blocks, the pruned linears of one block). Embeddings, norms and
# lm_head are never pruned. To support another decoder-only family, add a row here.
ARCHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "opt": ("model.decoder.layers",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
             "fc1", "fc2")),
    "llama": ("model.layers",
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


def arch_of(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in ARCHS:
        raise EPTSError(f"unsupported architecture '{model_type}'; supported: "
                        f"{', '.join(sorted(ARCHS))}. To add one, give its decoder-block path "
                        "and linear names in ARCHS in epts.py")
    return ARCHS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model)[0])


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every pruned linear, keyed "<block index>.<name in block>", e.g. "3.self_attn.q_proj"."""
    names = arch_of(model)[1]
    return {f"{i}.{n}": block.get_submodule(n)
            for i, block in enumerate(decoder_blocks(model)) for n in names}


def block_of(key: str) -> int:
    return int(key.split(".", 1)[0])


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `root`."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)  # get_submodule("") is root itself


# 2. Masks (Eq. 1): Wanda's score, ranked once per row, so the masks at all sparsities nest ------

def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Eq. 1: S_ij = |W_ij| * ||X_j||_2, the norm of input feature j over the calibration tokens."""
    return weight.abs().float() * act_norm.float().view(1, -1)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """The rank of every weight inside its row: 0 is the lowest score, ties go by column. One
    ranking per layer gives the mask at every sparsity, and makes the masks nested."""
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    columns = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks.scatter_(1, order, columns)
    return ranks.to(torch.int16 if scores.shape[1] < 2 ** 15 else torch.int32)  # less memory


def prune_count(sparsity: float | torch.Tensor, in_features: int) -> int | torch.Tensor:
    """Weights removed per row: floor(s * in). The 1e-6 guards against 0.29 * 100 = 28.999..."""
    if isinstance(sparsity, torch.Tensor):
        return torch.floor(sparsity.double() * in_features + 1e-6).long()
    return math.floor(sparsity * in_features + 1e-6)


def mask_from_ranks(ranks: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
    """M(s): keep the weights whose row rank is at least floor(s * in)."""
    return ranks >= prune_count(sparsity, ranks.shape[-1])


def nm_ranks(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Ranks for N:M masks (what GPU sparse tensor cores run): mask_from_ranks(nm_ranks(S, M), N/M)
    drops the N lowest-scoring weights of every M consecutive inputs of a row. Rank j inside its
    group of M becomes j * in/M + the group's index, so a row's lowest N * in/M ranks are exactly
    the N lowest of every group; the masks nest in N."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise EPTSError(f"an N:M pattern with M = {m} needs input sizes divisible by {m}, "
                        f"got {in_f}")
    within = row_ranks(scores.reshape(-1, m)).long().view(out_f, in_f // m, m)
    ranks = within * (in_f // m) + torch.arange(in_f // m, device=scores.device).view(1, -1, 1)
    return ranks.view(out_f, in_f).to(torch.int16 if in_f < 2 ** 15 else torch.int32)


def pattern(sparsity: float | str) -> tuple[float, int | None]:
    """A sparsity as (fraction pruned, M): 0.5 -> (0.5, None), unstructured; "2:4" -> (0.5, 4)."""
    if isinstance(sparsity, str):
        n, _, m = sparsity.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise EPTSError("a sparsity pattern is a number or N:M with 0 < N < M (e.g. 2:4), "
                            f"got '{sparsity}'")
        return int(n) / int(m), int(m)
    return float(sparsity), None


def ranks_for(scores: torch.Tensor, sparsity: float | str | None) -> torch.Tensor:
    """Row ranks for an unstructured sparsity (or None), N:M ranks for an "N:M" pattern."""
    m = None if sparsity is None else pattern(sparsity)[1]
    return row_ranks(scores) if m is None else nm_ranks(scores, m)


# 3. MS-HiLoRA (Eq. 2): W_s = (W + sum_{j<=k} B_j A_j) * M(s) for s in group k -----------------

def group_of(sparsity: float, groups: Sequence[tuple[float, float]] = GROUPS) -> int | None:
    """The group k with lo_k < s <= hi_k; None for s = 0 (dense); an error outside [0, hi_last]."""
    if not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity):
        raise EPTSError(f"sparsity must be a number, got {sparsity!r}")
    if sparsity == 0:
        return None
    for k, (lo, hi) in enumerate(groups):
        if lo < sparsity <= hi:
            return k
    raise EPTSError(f"sparsity {sparsity} is outside the trained range [0, {groups[-1][1]}]")


def elastic_weight(weight: torch.Tensor, ranks: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   sparsity: float | torch.Tensor, k: int | None) -> torch.Tensor:
    """Eq. 2, for one sparsity s in group k:

        W_s = (W + sum_{j<=k} B_j A_j) * M(s)

    The sum is the inheritance chain: group k reuses the adapters of every lower group and adds its
    own. Masking the sum keeps W_s exactly as sparse as M(s). k = None: the mask alone, W * M(s).
    A [K, r, in], B [K, out, r]: the adapter pairs of all K groups."""
    chain = 0 if k is None else sum(B[j] @ A[j] for j in range(k + 1))
    return (weight + chain) * mask_from_ranks(ranks, sparsity)


class Setting(NamedTuple):
    """Where an elastic layer runs: sparsity s with the adapters of groups 0..group (None: none,
    the mask alone). nm (--nm-train, not in the paper): the N:M mask of the same scores."""

    sparsity: float | torch.Tensor
    group: int | None
    nm: bool = False


class HiLoRALinear(nn.Module):
    """A frozen linear layer with K chained LoRA pairs (B_k, A_k) and nested masks (MS-HiLoRA). It
    multiplies its input by W_s of Eq. 2 at its current `setting`."""

    def __init__(self, base: nn.Linear, ranks: torch.Tensor, n_groups: int, rank: int,
                 generator: torch.Generator | None = None, nm_ranks: torch.Tensor | None = None):
        super().__init__()
        self.base = base  # kept to put back afterwards; its parameters stay frozen
        out_f, in_f = base.weight.shape
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer("nm_ranks", nm_ranks, persistent=False)  # --nm-train's N:M ranks
        A = torch.empty(n_groups, rank, in_f)
        for k in range(n_groups):  # Kaiming-uniform(a=sqrt(5)) per A_k, as LoRA
            nn.init.kaiming_uniform_(A[k], a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(base.weight.device))
        self.B = nn.Parameter(torch.zeros(n_groups, out_f, rank, device=base.weight.device))
        self.setting = Setting(0.0, None)  # dense until told otherwise (B = 0: a no-op anyway)

    def weight(self) -> torch.Tensor:
        """W_s of Eq. 2 at this layer's setting."""
        s, k, nm = self.setting
        return elastic_weight(self.base.weight, self.nm_ranks if nm else self.ranks, self.A, self.B,
                              s, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight(), self.base.bias)


def attach_hilora(block: nn.Module, norms: dict[str, torch.Tensor], cfg: EPTSConfig,
                  generator: torch.Generator) -> dict[str, HiLoRALinear]:
    """Replace each pruned linear of `block` (the keys of `norms`) by a HiLoRALinear whose masks
    rank the dense Wanda scores (Eq. 1). A dedicated N:M run ranks N:M; --nm-train adds N:M
    ranks."""
    layers = {}
    for name, norm in norms.items():
        base = block.get_submodule(name)
        scores = wanda_scores(base.weight, norm)
        extra = None if cfg.nm_train is None else nm_ranks(scores, pattern(cfg.nm_train)[1])
        args = (base, ranks_for(scores, cfg.fixed_sparsity), len(cfg.groups), cfg.rank,
                generator, extra)
        if cfg.tuned is None:
            layers[name] = HiLoRALinear(*args)
        else:  # not in the paper: section 9
            layers[name] = TunedHiLoRALinear(*args, recipe=cfg.tuned, top0=cfg.groups[0][1])
        swap_module(block, name, layers[name])
    return layers


@contextlib.contextmanager
def hilora_attached(block: nn.Module, norms: dict[str, torch.Tensor], cfg: EPTSConfig,
                    generator: torch.Generator):
    """The block with HiLoRALinears in place of its pruned linears and only the adapters
    trainable; the original linears and flags are back afterwards, whatever happened."""
    trainable = {p: p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)
    layers = attach_hilora(block, norms, cfg, generator)
    try:
        yield layers
    finally:
        for name, layer in layers.items():
            swap_module(block, name, layer.base)
        for p, flag in trainable.items():
            p.requires_grad_(flag)


# 4. Objective (Eq. 3): block reconstruction, guided by the lowest-sparsity output ---------------

def recon_loss(P: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """l(P, T) = ((P - T)^2).sum(over tokens).mean(), the authors' scale. P, T: [..., batch,
    tokens, hidden]; the leading dimensions stay (one loss per group when stacked)."""
    return (P.float() - T.float()).pow(2).sum(dim=-2).mean(dim=(-2, -1))


def phase1_objective(outputs: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 over the group outputs O_k = f(X; W_{s_k}), stacked as [K, batch, tokens, hidden]:

        L_0 = l(O_0, Y),   L_k = 1/2 l(O_k, sg(O_0)) + 1/2 l(O_k, Y)  for k >= 1,   loss = sum_k L_k

    sg is stop-gradient: the lowest-sparsity output guides the others without being pulled towards
    them. Returns (loss, the per-group losses, detached)."""
    to_target = recon_loss(outputs, target.unsqueeze(0))
    to_guide = recon_loss(outputs[1:], outputs[:1].detach())
    per_group = torch.cat([to_target[:1], 0.5 * to_guide + 0.5 * to_target[1:]])
    return per_group.sum(), per_group.detach()


# 5. MSFM (Eq. 4): the next block learns from a mix of this block's outputs ----------------------

def mix_features(outputs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Eq. 4: X_mix = sum_k w_k O_k, the outputs stacked as [K, ...]."""
    w = torch.tensor(weights, dtype=outputs.dtype, device=outputs.device)
    return torch.tensordot(w, outputs, dims=1)


# 6. Calling a block: capture what block 0 is called with, then call any block on any stream -----

def device_of(block: nn.Module) -> torch.device:
    """Where the block computes; its streams may live elsewhere (host memory)."""
    return next(block.parameters()).device


def empty_stream_like(X: torch.Tensor) -> torch.Tensor:
    """An empty stream where X lives: on its device, or in pinned host memory if X is pinned."""
    return torch.empty(X.shape, dtype=X.dtype, device=X.device, pin_memory=X.is_pinned())


def blocks_on(model: nn.Module, device: torch.device | str, start: int = 0):
    """Yield (index, block) from block `start` on, each moved to `device` in fp32 while it is worked
    on and moved back afterwards: only one block is on the accelerator at a time."""
    for i, block in enumerate(decoder_blocks(model)[start:], start):
        p = next(block.parameters())
        home, home_dtype = p.device, p.dtype
        block.to(device, torch.float32)
        try:
            yield i, block
        finally:
            block.to(home, home_dtype)


class _StopForward(Exception):  # ends the model's forward once block 0's inputs are recorded
    pass


@torch.no_grad()
def capture_block_inputs(model: nn.Module, windows: torch.Tensor,
                         device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
                         ) -> tuple[torch.Tensor, dict]:
    """Run the model up to block 0 for every window -> (hidden states [N, seqlen, hidden], block
    0's keyword arguments: attention mask, position embeddings, ... whatever the installed
    transformers passes), on `device` in `dtype`. Captured at batch 1, the kwargs broadcast."""
    kwargs, hidden = {}, []

    def hook(module, args, kw):
        x = args[0] if args else kw["hidden_states"]
        hidden.append(x.to(device, dtype))
        kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _StopForward

    handle = decoder_blocks(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for w in windows:
            with contextlib.suppress(_StopForward):
                model(w.view(1, -1).to(model.device), use_cache=False)
    finally:
        handle.remove()

    def cast(t):
        return t.to(device, dtype if t.is_floating_point() else None) if torch.is_tensor(t) else t
    return torch.cat(hidden), torch.utils._pytree.tree_map(cast, kwargs)


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """f(x): a decoder block called with the captured kwargs, on its device. Older transformers
    return a tuple, 5.x a tensor."""
    out = block(x.to(device_of(block), non_blocking=True), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def in_chunks(X: torch.Tensor, chunk: int) -> list[slice]:
    """Slices of `chunk` samples along X's first dimension."""
    return [slice(i, i + chunk) for i in range(0, len(X), chunk)]


@torch.no_grad()
def block_forward(block: nn.Module, X: torch.Tensor, kwargs: dict, chunk: int = 8
                  ) -> torch.Tensor:
    """f(X) for every sample of a stream, `chunk` samples at a time."""
    Y = empty_stream_like(X)
    for rows in in_chunks(X, chunk):
        Y[rows] = call_block(block, X[rows], kwargs)
    return Y


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """sum_t x_tj^2 per input feature j over a batch's tokens: ||X_j||_2^2 accumulates it."""
    return x.pow(2).sum(0)


@torch.no_grad()
def block_outputs_and_stats(block: nn.Module, names: Sequence[str], X: torch.Tensor,
                            kwargs: dict, chunk: int = 8, stat: Callable = sum_of_squares
                            ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f(X) for every sample, and stat(inputs) of every pruned linear summed over all tokens."""
    sums: dict[str, Any] = {n: 0.0 for n in names}
    name_of = {block.get_submodule(n): n for n in names}

    def hook(module, args):
        x, n = args[0].detach().float(), name_of[module]
        sums[n] = sums[n] + stat(x.reshape(-1, x.shape[-1]))

    handles = [module.register_forward_pre_hook(hook) for module in name_of]
    try:
        Y = block_forward(block, X, kwargs, chunk)
    finally:
        for h in handles:
            h.remove()
    return Y, sums


def dense_targets_and_norms(block: nn.Module, names: Sequence[str], X: torch.Tensor, kwargs: dict,
                            chunk: int = 8) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Y = f(X; W), the dense block's outputs, and ||X_j||_2 of the inputs of every pruned linear
    (Wanda's statistic, Eq. 1)."""
    Y, sq = block_outputs_and_stats(block, names, X, kwargs, chunk, sum_of_squares)
    return Y, {n: v.sqrt() for n, v in sq.items()}


def run_at(block: nn.Module, layers: dict[str, HiLoRALinear], x: torch.Tensor, kwargs: dict,
           setting: Setting) -> torch.Tensor:
    """f(x; W_s): the block with every elastic layer at `setting`."""
    for layer in layers.values():
        layer.setting = setting
    return call_block(block, x, kwargs)


def forward_groups(block: nn.Module, layers: dict[str, HiLoRALinear], xs: Sequence[torch.Tensor],
                   kwargs: dict, settings: Sequence[Setting]) -> torch.Tensor:
    """O_g = f(xs[g]; W at settings[g]) for every slice g, one block call each -> [G, ...].
    epts_scale.py runs the G calls as one, with the same math."""
    return torch.stack([run_at(block, layers, x, kwargs, s) for x, s in zip(xs, settings)])


# 7. The two-phase loop: Phase 1 (adapters), the low-group check, Phase 2 (mixed features) -------

def draw_sparsities(cfg: EPTSConfig, steps: int, generator: torch.Generator) -> torch.Tensor:
    """s_k for `steps` steps and every group k -> float64 [steps, K], stratified: group k = (lo, hi]
    is cut into `steps` equal parts, and each step draws uniformly inside another one, in random
    order (one step, as in Phase 2: one uniform draw per group). A dedicated run (fixed_sparsity)
    always uses its one sparsity."""
    if cfg.fixed_sparsity is not None:
        s = pattern(cfg.fixed_sparsity)[0]
        return torch.full((steps, len(cfg.groups)), s, dtype=torch.float64)
    columns = []
    for lo, hi in cfg.groups:
        part = torch.randperm(steps, generator=generator).double()  # randperm(1) draws nothing
        u = torch.rand(steps, generator=generator, dtype=torch.float64)
        columns.append(hi - (part + u) / steps * (hi - lo))  # in (lo, hi]
    return torch.stack(columns, dim=1)


def phase1_slices(cfg: EPTSConfig) -> list[tuple[int, bool]]:
    """(group, N:M?) of every block call of a Phase-1 step: one per group, as in the paper;
    --nm-train "N:M" (not in the paper) adds the group of N/M on N:M masks at exactly N/M."""
    slices = [(k, False) for k in range(len(cfg.groups))]
    if cfg.nm_train is not None:
        slices.append((group_of(pattern(cfg.nm_train)[0], cfg.groups), True))
    return slices


def phase1_draws(cfg: EPTSConfig, steps: int, generator: torch.Generator) -> torch.Tensor:
    """The sparsity of every Phase-1 slice at every step -> float64 [steps, slices]."""
    draws = draw_sparsities(cfg, steps, generator)
    if cfg.nm_train is None:
        return draws
    fixed = torch.full((steps, 1), pattern(cfg.nm_train)[0], dtype=torch.float64)
    return torch.cat([draws, fixed], dim=1)


def cosine_lr(step: int, total: int, base: float) -> float:
    """lr_t = base * (1 + cos(pi * t / T)) / 2: cosine annealing from `base` to 0 over T steps."""
    return base * (1 + math.cos(math.pi * step / total)) / 2


def batch_of(streams: Sequence[torch.Tensor], rows: slice, device: torch.device
             ) -> list[torch.Tensor]:
    """The rows of every stream on `device`, each distinct stream moved once."""
    distinct = {id(S): S for S in streams}
    moved = {i: S[rows].to(device) for i, S in distinct.items()}
    return [moved[id(S)] for S in streams]


def phase1_train(block: nn.Module, layers: dict[str, HiLoRALinear], inputs: list[torch.Tensor],
                 Y: torch.Tensor, kwargs: dict, cfg: EPTSConfig, generator: torch.Generator,
                 forward: Callable = forward_groups, wrap_step: Callable | None = None
                 ) -> list[list[float]]:
    """Phase 1: learn every adapter of one block with Eq. 3 against the dense targets Y. Every step
    draws s_k in each group k, runs O_k = f(X_k; W_{s_k}) (X_k = inputs[k]: the mixed stream for
    every group in the paper), and takes one Adam step at the cosine-annealed rate. Returns the
    mean loss per group, per epoch. The seams: `forward` runs the block calls (epts_scale.py: all
    at once), `wrap_step(step, opt)` wraps one step (a progress bar; a CUDA graph)."""
    device, slices = device_of(block), phase1_slices(cfg)
    batches = in_chunks(Y, cfg.batch_size)
    total = cfg.epochs * len(batches)
    draws = phase1_draws(cfg, total, generator).to(device)  # every step's s_k, drawn up front
    params = [p for layer in layers.values() for p in (layer.A, layer.B)]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type == "cuda")

    def step(s: torch.Tensor, lr: float, y: torch.Tensor, *xs: torch.Tensor) -> torch.Tensor:
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        settings = [Setting(s[g], k, nm) for g, (k, nm) in enumerate(slices)]
        loss, per_group = phase1_objective(forward(block, layers, xs, kwargs, settings), y)
        loss.backward()
        opt.step()
        return per_group

    step = wrap_step(step, opt) if wrap_step else step
    history = []
    for epoch in range(cfg.epochs):
        epoch_loss = torch.zeros(len(slices), device=device)
        for t, rows in enumerate(batches, start=epoch * len(batches)):
            y, *xs = batch_of([Y, *inputs], rows, device)
            epoch_loss += step(draws[t], cosine_lr(t, total, cfg.lr), y, *xs)
        history.append((epoch_loss / len(batches)).tolist())  # one host sync per epoch
    return history


@torch.no_grad()
def stream_loss(block: nn.Module, layers: dict[str, HiLoRALinear], X: torch.Tensor,
                Y: torch.Tensor, kwargs: dict, settings: Sequence[Setting],
                forward: Callable = forward_groups, chunk: int = 8) -> torch.Tensor:
    """l(f(X; W at settings[g]), Y) over a whole stream, for every setting g -> float64 [G]."""
    loss = torch.zeros(len(settings), dtype=torch.float64, device=device_of(block))
    for rows in in_chunks(X, chunk):
        x = X[rows].to(device_of(block))
        out = forward(block, layers, [x] * len(settings), kwargs, settings)
        target = Y[rows].to(out.device).unsqueeze(0)
        loss += recon_loss(out, target).double() * len(out[0])  # a mean over the samples
    return loss / len(X)


@torch.no_grad()
def low_group_check(block: nn.Module, layers: dict[str, HiLoRALinear], X_dense: torch.Tensor,
                    Y: torch.Tensor, kwargs: dict, cfg: EPTSConfig,
                    forward: Callable = forward_groups, chunk: int = 8
                    ) -> tuple[bool, dict[str, float]]:
    """Keep group 0's adapter only if it lowers l(f(X_dense; W_s), Y) at s = 0.3 compared with
    the mask alone (the authors' code)."""
    if cfg.low_check_sparsity is None:
        return True, {}
    s = torch.tensor(cfg.low_check_sparsity, dtype=torch.float64, device=device_of(block))
    settings = [Setting(s, 0), Setting(s, None)]  # with group 0's adapter; the mask alone
    losses = stream_loss(block, layers, X_dense, Y, kwargs, settings, forward, chunk).tolist()
    with_adapter, mask_only = losses
    return with_adapter < mask_only, {"with_adapter": with_adapter, "mask_only": mask_only}


@torch.no_grad()
def phase2_mix(block: nn.Module, layers: dict[str, HiLoRALinear], X_mix: torch.Tensor,
               kwargs: dict, cfg: EPTSConfig, generator: torch.Generator, keep_group0: bool,
               forward: Callable = forward_groups, chunk: int = 8
               ) -> tuple[torch.Tensor, list[float]]:
    """Phase 2 (MSFM): draw one s_k per group, then X_mix <- sum_k w_k f(X_mix; W_{s_k}) (Eq. 4).
    Group 0 runs as deploy will: the mask alone if the low-group check dropped its adapter."""
    s = draw_sparsities(cfg, 1, generator)[0].to(device_of(block))
    settings = [Setting(s[k], None if k == 0 and not keep_group0 else k)
                for k in range(len(cfg.groups))]
    mixed = empty_stream_like(X_mix)
    for rows in in_chunks(X_mix, chunk):
        x = X_mix[rows].to(device_of(block))
        outputs = forward(block, layers, [x] * len(settings), kwargs, settings)
        mixed[rows] = mix_features(outputs.float(), cfg.mixer).to(X_mix.dtype)
    return mixed, s.tolist()


@dataclass
class BlockReport:
    """What happened while optimizing one block (kept in the elastic state)."""

    loss_history: list[list[float]] = field(default_factory=list)  # mean Phase-1 loss per group
    low_check: dict[str, Any] = field(default_factory=dict)        # the check's losses
    group0_gain: float = 1.0  # B_0 A_0's scale in group 0: 1 kept, 0 dropped (the mask alone)
    mix_sparsities: list[float] = field(default_factory=list)      # the s_k Phase 2 drew
    seconds: dict[str, float] = field(default_factory=dict)        # wall time of each stage


@dataclass
class ElasticState:
    """The elastic model minus its base weights: what deploys it at any sparsity. Keys are
    "<block>.<linear>": adapters[key] = (A [K, r, in], B [K, out, r]), act_norms[key] = ||X_j||_2
    of the dense inputs; the masks are re-derived from the base weights and these norms."""

    groups: list[tuple[float, float]]
    mixer: list[float]
    rank: int
    tuned: TunedRecipe | None = None  # not in the paper: the tuned recipe's switches (section 9)
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    act_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    reports: list[BlockReport] = field(default_factory=list)
    base_model: str = ""                          # the artifact's metadata (section 12)
    fingerprint: dict = field(default_factory=dict)
    base_dtype: str = ""

    def add_block(self, i: int, adapters: dict, norms: dict, report: BlockReport) -> None:
        self.adapters.update({f"{i}.{n}": v for n, v in adapters.items()})
        self.act_norms.update({f"{i}.{n}": v.cpu() for n, v in norms.items()})
        self.reports.append(report)


def stopwatch(device: torch.device) -> Callable[[], float]:
    """A clock: each call returns the seconds since the last one, after the GPU's queued work."""
    last = time.perf_counter()

    def lap() -> float:
        nonlocal last
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        seconds, last = now - last, now
        return seconds
    return lap


def optimize_block(block: nn.Module, index: int, norms: dict[str, torch.Tensor],
                   X_dense: torch.Tensor, X_mix: torch.Tensor, Y: torch.Tensor, kwargs: dict,
                   cfg: EPTSConfig, forward: Callable = forward_groups,
                   wrap_step: Callable | None = None, chunk: int = 8
                   ) -> tuple[dict, BlockReport, torch.Tensor]:
    """Phase 1, the low-group check and Phase 2 for one block (on its device, in fp32), given its
    dense targets Y and input norms -> (adapters, report, the next block's X_mix). `chunk`: samples
    per no-grad block call."""
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + index)  # per block: resumable
    report, lap = BlockReport(), stopwatch(device_of(block))
    with hilora_attached(block, norms, cfg, generator) as layers:
        inputs = [X_mix] * len(phase1_slices(cfg))
        if cfg.tuned is not None and cfg.tuned.group0_dense_input:  # not in the paper: section 9
            inputs[0] = X_dense
        report.loss_history = phase1_train(block, layers, inputs, Y, kwargs, cfg, generator,
                                           forward, wrap_step)
        report.seconds["phase1"] = lap()
        if cfg.tuned is not None and cfg.tuned.fit_gain:  # not in the paper: section 9
            gain, report.low_check = fit_group0_gain(block, layers, X_dense, Y, kwargs, cfg,
                                                     forward=forward, chunk=chunk)
        else:
            keep, report.low_check = low_group_check(block, layers, X_dense, Y, kwargs, cfg,
                                                     forward, chunk)
            gain = float(keep)
        report.group0_gain = gain
        report.seconds["low_check"] = lap()
        X_mix, report.mix_sparsities = phase2_mix(block, layers, X_mix, kwargs, cfg, generator,
                                                  gain > 0, forward, chunk)
        report.seconds["phase2"] = lap()
        adapters = {n: (l.A.detach().float().cpu(), l.B.detach().float().cpu())
                    for n, l in layers.items()}
    return adapters, report, X_mix


def optimize(model: nn.Module, windows: torch.Tensor, cfg: EPTSConfig,
             device: str | torch.device = "cpu", forward: Callable = forward_groups,
             wrap_step: Callable | None = None) -> ElasticState:
    """EPTS on the calibration `windows` [N, seqlen] -> the elastic state. Two streams run through
    the blocks: X_dense (the dense model's) and X_mix (Eq. 4's). Only the current block is on
    `device`, in fp32. forward, wrap_step: phase1_train's seams for faster code."""
    names = arch_of(model)[1]
    X_dense, kwargs = capture_block_inputs(model.eval(), windows, device)
    X_mix = X_dense.clone()  # block 0: both streams are the embeddings' output
    state = ElasticState(list(cfg.groups), list(cfg.mixer), cfg.rank, cfg.tuned)
    for i, block in blocks_on(model, device):
        Y, norms = dense_targets_and_norms(block, names, X_dense, kwargs)
        adapters, report, X_mix = optimize_block(block, i, norms, X_dense, X_mix, Y, kwargs, cfg,
                                                 forward, wrap_step)
        state.add_block(i, adapters, norms, report)
        X_dense = Y
    if cfg.tuned is not None and cfg.tuned.distill_epochs:  # not in the paper: section 9
        distill(model, state, windows, cfg, device)
    return state


# 8. Deploy: one elastic state -> an ordinary transformers model at any sparsity -----------------

def snapshot_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every pruned linear's dense weight: deploy and every baseline start there."""
    return {k: lin.weight.detach().to("cpu", copy=True) for k, lin in pruned_linears(model).items()}


def per_block_sparsities(sparsity: float | str | Sequence[float], n_blocks: int
                         ) -> list[float | str]:
    """One sparsity per block, from one number or N:M pattern (uniform) or a list (e.g. OWL)."""
    if isinstance(sparsity, (int, float, str)):
        return [sparsity if isinstance(sparsity, str) else float(sparsity)] * n_blocks
    sparsity = [float(s) for s in sparsity]
    if len(sparsity) != n_blocks:
        raise EPTSError(f"got {len(sparsity)} per-block sparsities for a model with {n_blocks} "
                        "blocks")
    return sparsity


def deployed_group(state: ElasticState, block: int, sparsity: float) -> int | None:
    """The group whose adapters deploy sums at s: group_of(s); None (the mask alone) at s = 0,
    above the trained range, and in group 0 where the low-group check dropped the adapter."""
    if sparsity > state.groups[-1][1]:
        return None  # as the authors' code
    k = group_of(sparsity, state.groups)
    return None if k == 0 and state.reports[block].group0_gain == 0 else k


@torch.no_grad()
def deploy(model: nn.Module, state: ElasticState, sparsity: float | str | Sequence[float],
           dense: dict[str, torch.Tensor], device: str | torch.device | None = None) -> nn.Module:
    """Write W_s of Eq. 2 into every pruned linear, in place. `sparsity`: a number, an N:M pattern
    ("2:4": the N:M mask of the same scores, with the adapters of the group of N/M), or one number
    per block. `dense`: snapshot_linears(model), taken before the first deploy. The result is a
    plain transformers model with exactly floor(s * in) zeros per row."""
    per_block = per_block_sparsities(sparsity, len(decoder_blocks(model)))
    for key, lin in pruned_linears(model).items():
        i = block_of(key)
        s = pattern(per_block[i])[0]
        W = dense[key].to(device or lin.weight.device, torch.float32)
        A, B = (t.to(W.device) for t in state.adapters[key])
        k = deployed_group(state, i, s)
        if state.tuned is not None:  # not in the paper: section 9
            B = tuned_group0(B, s, k, gain=state.reports[i].group0_gain, top0=state.groups[0][1],
                             ramp=state.tuned.group0_ramp)
        ranks = ranks_for(wanda_scores(W, state.act_norms[key].to(W.device)), per_block[i])
        lin.weight.copy_(elastic_weight(W, ranks, A, B, s, k).to(lin.weight.dtype))
    return model


# 9. The tuned recipe: not in the paper ----------------------------------------------------------
#
# Four switches on top of the paper's recipe, all about group 0's adapter, which the paper's
# low-group check keeps in only 1 of 30 blocks of SmolLM2-135M. bench/RESULTS.md measures each
# alone. recipe_config("tuned") or `--recipe tuned` turns them on, with rank 32. An optional
# end-to-end distillation stage closes the section (off unless asked for).

@dataclass
class TunedRecipe:
    """The tuned recipe's switches; each is off in the paper's recipe."""

    group0_dense_input: bool = True  # group 0's Phase-1 slice reads X_dense, the stream it serves
    stop_chain_grad: bool = True     # groups >= 1 use sg(B_0): B_0 learns from group 0's loss only
    group0_ramp: bool = True         # B_0 A_0 scaled by s / hi_0 inside group 0
    fit_gain: bool = True            # a fitted gain on B_0 A_0 in [0, 1] instead of the check
    distill_epochs: int = 0          # end-to-end distillation after the block-wise pass (off)
    distill_lr: float = 1e-4         # its Adam rate, cosine-annealed to 0


def recipe_config(recipe: str = "paper", **overrides) -> EPTSConfig:
    """The config of a named recipe: "paper" (EPTSConfig's defaults) or "tuned" (rank 32 and the
    four switches); keyword arguments override any field."""
    if recipe == "tuned":
        return EPTSConfig(**{"rank": 32, "tuned": TunedRecipe(), **overrides})
    if recipe != "paper":
        raise EPTSError(f"unknown recipe '{recipe}'; paper or tuned")
    return EPTSConfig(**overrides)


def tuned_group0(B: torch.Tensor, sparsity: float | torch.Tensor, k: int | None, *, gain: float,
                 top0: float, ramp: bool, stop_chain_grad: bool = False) -> torch.Tensor:
    """The B of Eq. 2 under the tuned recipe. In group 0, B_0 A_0 is scaled by

        g(s) = gain * s / hi_0   (ramp)   or   gain

    so that the correction fades with the weights removed (s -> 0: the dense model), and gain is the
    block's fitted gain (fit_group0_gain; 1 in Phase 1). In groups >= 1, with stop_chain_grad,
    sg(B_0): those groups' losses do not train group 0's adapter."""
    if k == 0:
        g = gain * (sparsity / top0 if ramp else 1.0)
        return torch.cat([B[:1] * g, B[1:]])
    if k is not None and stop_chain_grad:
        return torch.cat([B[:1].detach(), B[1:]])
    return B


class TunedHiLoRALinear(HiLoRALinear):
    """A HiLoRALinear whose group-0 adapter follows the tuned recipe (tuned_group0). `gain` is the
    block's gain on B_0 A_0 in group 0: 1 in Phase 1, then the one fit_group0_gain chose."""

    def __init__(self, *args, recipe: TunedRecipe, top0: float):
        super().__init__(*args)
        self.recipe, self.top0, self.gain = recipe, top0, 1.0

    def weight(self) -> torch.Tensor:
        s, k, nm = self.setting
        B = tuned_group0(self.B, s, k, gain=self.gain, top0=self.top0,
                         ramp=self.recipe.group0_ramp, stop_chain_grad=self.recipe.stop_chain_grad)
        return elastic_weight(self.base.weight, self.nm_ranks if nm else self.ranks, self.A, B,
                              s, k)


@torch.no_grad()
def fit_group0_gain(block: nn.Module, layers: dict[str, TunedHiLoRALinear], X_dense: torch.Tensor,
                    Y: torch.Tensor, kwargs: dict, cfg: EPTSConfig,
                    forward: Callable = forward_groups, chunk: int = 8, gains: int = 5,
                    points: int = 4) -> tuple[float, dict[str, list[float]]]:
    """In place of the low-group check: the block's gain on B_0 A_0 in group 0,

        gain = argmin_{gain in {0, 1/4, .., 1}}  sum_s l(f(X_dense; W_s(gain)), Y) / l(f(X_dense;
               W * M(s)), Y),     s = hi_0/4, 2 hi_0/4, .., hi_0

    relative losses, so low sparsities count as much as high ones. Gain 0 is the mask alone, so the
    fitted loss is never above the mask's. The layers keep the chosen gain."""
    top0 = cfg.groups[0][1]
    s = torch.arange(1, points + 1, dtype=torch.float64, device=device_of(block)) * top0 / points
    settings = [Setting(s[p], 0) for p in range(points)]
    losses = []
    for gain in torch.linspace(0, 1, gains).tolist():
        for layer in layers.values():
            layer.gain = gain
        losses.append(stream_loss(block, layers, X_dense, Y, kwargs, settings, forward, chunk))
    relative = (torch.stack(losses) / losses[0]).sum(1)
    best = int(relative.argmin()) / (gains - 1)
    for layer in layers.values():
        layer.gain = best
    return best, {"relative_loss": relative.tolist(), "mask_only": losses[0].tolist()}


# TunedRecipe's last two fields add a stage, off by default (--distill-epochs): after the block-wise
# pass, all adapters of all blocks learn together from the dense model's next-token distribution.
# The block-wise loss sees one block at a time; this stage sees what all their errors do together.

def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_s), averaged over tokens: sum_v p_dense(v) (log p_dense(v) - log p_s(v))."""
    teacher = teacher_logits.float().log_softmax(-1)
    student = student_logits.float().log_softmax(-1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean()


@contextlib.contextmanager
def elastic_model(model: nn.Module, state: ElasticState, cfg: EPTSConfig,
                  generator: torch.Generator):
    """The whole model with every block as hilora_attached makes it (masks as deploy ranks
    them), each elastic layer holding the state's adapters and its block's gain; only the
    adapters trainable. Yields the layers by key; everything is back afterwards."""
    trainable = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)  # embeddings, norms, head: outside the blocks
    try:
        with contextlib.ExitStack() as stack:
            layers = {}
            for i, block in enumerate(decoder_blocks(model)):
                norms = {n: state.act_norms[f"{i}.{n}"].to(device_of(block))
                         for n in arch_of(model)[1]}
                attached = stack.enter_context(hilora_attached(block, norms, cfg, generator))
                for name, layer in attached.items():
                    A, B = state.adapters[f"{i}.{name}"]
                    layer.A.data.copy_(A)
                    layer.B.data.copy_(B)
                    layer.gain = state.reports[i].group0_gain
                    layers[f"{i}.{name}"] = layer
            yield layers
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)


def logits_at(model: nn.Module, layers: dict[str, HiLoRALinear], window: torch.Tensor,
              setting: Setting) -> torch.Tensor:
    """The model's next-token logits with every elastic layer at `setting`."""
    for layer in layers.values():
        layer.setting = setting
    return model(window, use_cache=False).logits


def distill_step(model: nn.Module, layers: dict[str, HiLoRALinear], window: torch.Tensor,
                 setting: Setting, opt: torch.optim.Optimizer, lr: float) -> torch.Tensor:
    """One Adam step at rate lr on KL(p(x; W) || p(x; W_s)) for one window, W_s at `setting`."""
    with torch.no_grad():
        teacher = logits_at(model, layers, window, Setting(0.0, None))
    opt.param_groups[0]["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss = distill_loss(logits_at(model, layers, window, setting), teacher)
    loss.backward()
    opt.step()
    return loss.detach()


def distill(model: nn.Module, state: ElasticState, windows: torch.Tensor, cfg: EPTSConfig,
            device: str | torch.device = "cpu", on_step: Callable | None = None,
            step: Callable = distill_step) -> list[float]:
    """End-to-end distillation of every adapter at once, in place in `state`. Step t takes one
    calibration window (a new order every epoch) and the Phase-1 slices in turn (group k, or
    --nm-train's N:M slice), draws s in that slice as Phase 1 does, and takes an Adam step on

        KL(p(x; W) || p(x; W_s))      (the dense model's distribution is the target)

    at the cosine-annealed rate, on `device`; on_step() after each (a progress bar). The seam:
    `step` takes the step (epts_scale.py: a CUDA graph). Returns the mean loss per epoch."""
    epochs, device = cfg.tuned.distill_epochs, torch.device(device)
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + 99_991)
    slices, total = phase1_slices(cfg), epochs * len(windows)
    draws = phase1_draws(cfg, total, generator)
    home, windows = next(model.parameters()).device, windows.to(device)
    model.to(device).eval()
    with elastic_model(model, state, cfg, generator) as layers:
        params = [p for layer in layers.values() for p in (layer.A, layer.B)]
        opt = torch.optim.Adam(params, lr=cfg.tuned.distill_lr)
        history = []
        for epoch in range(epochs):
            order, epoch_loss = torch.randperm(len(windows), generator=generator), 0.0
            for t, w in enumerate(order.tolist(), start=epoch * len(windows)):
                g = t % len(slices)
                setting = Setting(float(draws[t, g]), *slices[g])
                lr = cosine_lr(t, total, cfg.tuned.distill_lr)
                epoch_loss += step(model, layers, windows[w:w + 1], setting, opt, lr)
                if on_step:
                    on_step()
            history.append(float(epoch_loss) / len(windows))
        state.adapters.update({key: (l.A.detach().float().cpu(), l.B.detach().float().cpu())
                               for key, l in layers.items()})
    model.to(home)
    return history


# ===== harness: nothing below changes the math =====

import argparse  # noqa: E402 - the harness's imports: the method above needs none of them
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from dataclasses import asdict, replace  # noqa: E402

from tqdm.auto import tqdm  # noqa: E402

# 10. Checks: a config the method can run with ----------------------------------------------------

def validate_config(cfg: EPTSConfig) -> None:
    """Reject hyper-parameters the method cannot run with, one line each. The groups tile
    (0, hi_last] without gaps or overlaps: 0 = lo_0 < hi_0 = lo_1 < hi_1 = ... <= 1."""
    groups = cfg.groups
    if not groups:
        raise EPTSError("at least one sparsity group is needed")
    if groups[0][0] != 0:
        raise EPTSError(f"the first group must start at 0, got {groups[0]}")
    for k, (lo, hi) in enumerate(groups):
        if not lo < hi <= 1:
            raise EPTSError(f"group {k} = ({lo}, {hi}] is empty or above 1: groups must be "
                            "contiguous and increasing")
        if k and lo != groups[k - 1][1]:
            raise EPTSError(f"groups must be contiguous and increasing: group {k - 1} ends at "
                            f"{groups[k - 1][1]} but group {k} starts at {lo}")
    if len(cfg.mixer) != len(groups):
        raise EPTSError(f"mixer has {len(cfg.mixer)} weights but there are {len(groups)} groups")
    if not all(math.isfinite(w) and w >= 0 for w in cfg.mixer) or abs(sum(cfg.mixer) - 1) > 1e-6:
        raise EPTSError(f"mixer weights must be non-negative and sum to 1, got {list(cfg.mixer)}")
    if cfg.rank <= 0:
        raise EPTSError(f"--rank must be positive, got {cfg.rank}")
    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise EPTSError("--epochs and --batch-size must be positive, got "
                        f"{cfg.epochs}, {cfg.batch_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise EPTSError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.nm_train is not None:
        group_of(pattern(cfg.nm_train)[0], groups)  # N/M must lie in a trained group
    if cfg.tuned is not None and (cfg.tuned.distill_epochs < 0 or not (
            cfg.tuned.distill_lr > 0 and math.isfinite(cfg.tuned.distill_lr))):
        raise EPTSError("--distill-epochs must be 0 or more and --distill-lr a positive number, "
                        f"got {cfg.tuned.distill_epochs}, {cfg.tuned.distill_lr}")
    (lo, hi), low = groups[0], cfg.low_check_sparsity
    if low is not None and not lo < low <= hi:
        raise EPTSError(f"the low-group check sparsity {low} must lie in group 0 = ({lo}, {hi}]")


def check_windows(model: nn.Module, windows: torch.Tensor) -> None:
    """Calibration windows the model can read: no longer than its positions."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos is not None and windows.shape[-1] > max_pos:
        raise EPTSError(f"windows of {windows.shape[-1]} tokens are longer than the model's "
                        f"max_position_embeddings {max_pos}")


def measured_sparsity(model: nn.Module) -> float:
    """The fraction of exact zeros over all pruned linears."""
    lins = pruned_linears(model).values()
    zeros = sum(int((lin.weight == 0).sum()) for lin in lins)
    return zeros / sum(lin.weight.numel() for lin in lins)


# 11. Baselines in the same harness: magnitude, Wanda, SparseGPT, dedicated runs, OWL ------------

@torch.no_grad()
def restore_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> nn.Module:
    """Put the dense weights of snapshot_linears back."""
    for key, lin in pruned_linears(model).items():
        lin.weight.copy_(dense[key])
    return model


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float | str | Sequence[float]) -> nn.Module:
    """Magnitude pruning, the baseline of the Wanda and SparseGPT repositories: in every matrix the
    floor(s * numel) weights of smallest |W_ij| go (one threshold per matrix, no data). Their code
    prunes |W| <= the threshold, one weight more; this removes exactly floor(s * numel)."""
    per_block = per_block_sparsities(sparsity, len(decoder_blocks(model)))
    for key, lin in pruned_linears(model).items():
        W, (s, m) = lin.weight, pattern(per_block[block_of(key)])
        scores = W.detach().abs().float()
        # one ranking over the whole matrix; N:M: the N smallest of every M inputs of a row
        ranks = row_ranks(scores.view(1, -1)) if m is None else nm_ranks(scores, m)
        W.mul_(mask_from_ranks(ranks, s).view_as(W).to(W.dtype))
    return model


def wanda_prune(W: torch.Tensor, sum_sq: torch.Tensor, n_tokens: int, sparsity: float | str,
                name: str = "") -> torch.Tensor:
    """Wanda for one layer: W * M(s) with the row-wise (or N:M) mask of Eq. 1, no weight update.
    prune_sequential's rule: it takes sum_j x_j^2; n_tokens and name are unused."""
    ranks = ranks_for(wanda_scores(W, sum_sq.sqrt()), sparsity)
    return W * mask_from_ranks(ranks, pattern(sparsity)[0])


def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X over a batch's tokens: SparseGPT's Hessian H = 2 X X^T / n accumulates it."""
    return x.T @ x


def sparsegpt_prune(W: torch.Tensor, xtx: torch.Tensor, n_tokens: int, sparsity: float | str,
                    name: str = "", blocksize: int = 128, percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023) for one layer: OBS pruning with weight updates. With
    H = 2 X X^T / n (+ 1% of its mean diagonal) and U the upper Cholesky factor of H^-1, columns
    are visited left to right in blocks of 128; in each block the mask drops the weights of lowest
    saliency w_ij^2 / U_jj^2 (over the block's rows and columns jointly; N:M: the N lowest of every
    M columns of a row, chosen on reaching them). Visiting column j, the pruned weights' error
    e = (w_j - q_j) / U_jj moves onto the columns not yet visited: W[:, j:] -= e U[j, j:]."""
    s, m = pattern(sparsity)
    W = W.float().clone()
    H = 2 * xtx.float() / n_tokens
    dead = torch.diag(H) == 0  # inputs that are always zero: their weights are irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(len(H), device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, err = W[:, i1:i2].clone(), torch.zeros_like(W[:, i1:i2])
        d = torch.diag(U[i1:i2, i1:i2])
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if m is None:  # the block's lowest saliencies, over its rows and columns jointly
            saliency = (W1 ** 2 / d ** 2).flatten()
            lowest = torch.topk(saliency, prune_count(s, saliency.numel()), largest=False)
            pruned.view(-1)[lowest.indices] = True
        for j in range(i2 - i1):
            if m is not None and j % m == 0:  # N:M: this group's N lowest, on the updated weights
                sal = W1[:, j:j + m] ** 2 / d[j:j + m].view(1, -1) ** 2
                lowest = torch.topk(sal, round(s * m), dim=1, largest=False)
                pruned[:, j:j + m].scatter_(1, lowest.indices, True)
            e = W1[:, j] * pruned[:, j] / d[j]
            W1[:, j:] -= e.unsqueeze(1) * U[i1 + j, i1 + j:i2].unsqueeze(0)  # 0 where pruned
            err[:, j] = e
        W[:, i1:i2] = W1.masked_fill(pruned, 0.0)
        W[:, i2:] -= err @ U[i1:i2, i2:]  # the whole block's error onto the columns to its right
    return W


@torch.no_grad()
def prune_sequential(model: nn.Module, windows: torch.Tensor,
                     sparsity: float | str | Sequence[float], prune_layer: Callable,
                     stat: Callable = sum_of_squares, device: str | torch.device = "cpu",
                     chunk: int = 8, desc: str = "", verbose: bool = True) -> nn.Module:
    """The sequential loop of Wanda and SparseGPT: block by block, the statistics come from the
    *pruned* stream. For each block one forward accumulates stat(inputs) of every linear, each
    linear becomes prune_layer(W, stat, n_tokens, s, name), and the pruned block's outputs feed
    the next block."""
    _, names = arch_of(model)
    per_block = per_block_sparsities(sparsity, len(decoder_blocks(model)))
    X, kwargs = capture_block_inputs(model.eval(), windows, device)
    blocks = tqdm(blocks_on(model, device), desc=desc, unit="block", total=len(per_block),
                  disable=not verbose)
    for i, block in blocks:
        _, stats = block_outputs_and_stats(block, names, X, kwargs, chunk, stat)
        for n in names:
            lin = block.get_submodule(n)
            lin.weight.copy_(prune_layer(lin.weight, stats[n], windows.numel(), per_block[i], n))
        X = block_forward(block, X, kwargs, chunk)
    return model


def dedicated_config(cfg: EPTSConfig, sparsity: float | str) -> EPTSConfig:
    """The "one optimization per sparsity" baseline that EPTS replaces: the same block
    reconstruction with one adapter trained at one fixed sparsity S (or N:M pattern, on N:M
    masks) on its own pruned stream: one group (0, S], no mixer, no low-group check, the paper's
    recipe, and the rank of EPTS's chain at S, r * (group(S) + 1)."""
    k = group_of(pattern(sparsity)[0], cfg.groups)
    if k is None:
        raise EPTSError("a dedicated run needs a sparsity > 0")
    return replace(cfg, groups=((0.0, pattern(sparsity)[0]),), mixer=(1.0,),
                   rank=cfg.rank * (k + 1), low_check_sparsity=None, fixed_sparsity=sparsity,
                   nm_train=None, tuned=None)


@torch.no_grad()
def dense_act_norms(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu",
                    chunk: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every pruned linear's inputs on the dense model (what EPTS stores)."""
    _, names = arch_of(model)
    X, kwargs = capture_block_inputs(model.eval(), windows, device)
    norms = {}
    for i, block in blocks_on(model, device):
        X, block_norms = dense_targets_and_norms(block, names, X, kwargs, chunk)
        norms.update({f"{i}.{n}": v.cpu() for n, v in block_norms.items()})
    return norms


def outlier_ratios(dense: dict[str, torch.Tensor], act_norms: dict[str, torch.Tensor],
                   M: float) -> torch.Tensor:
    """OWL's D_i: the share of a block's Wanda scores (all its linears pooled) above M x their
    mean -> float64 [blocks]."""
    n_blocks = 1 + max(block_of(k) for k in dense)
    ratios = []
    for i in range(n_blocks):
        scores = torch.cat([wanda_scores(W, act_norms[k]).flatten()
                            for k, W in dense.items() if block_of(k) == i])
        ratios.append(float((scores > M * scores.mean()).float().mean()))
    return torch.tensor(ratios, dtype=torch.float64)


def owl_sparsities(dense: dict[str, torch.Tensor], act_norms: dict[str, torch.Tensor],
                   target: float, lam: float = 0.08, M: float = 5.0,
                   limits: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """OWL (Yin et al., 2023): outlier-weighted layer-wise sparsity, one sparsity per block. With
    the outlier ratios D normalized to [0, 1], s_i = target - 2 lam (D_i - mean D): more outliers,
    fewer pruned weights, every s_i within target +- lam. Each s_i is then clamped to `limits`
    (for an elastic model: the trained range), keeping the mean at the target where possible."""
    D = outlier_ratios(dense, act_norms, M)
    D = (D - D.min()) / (D.max() - D.min()) if D.max() > D.min() else torch.zeros_like(D)
    s, (lo, hi) = target - 2 * lam * (D - D.mean()), limits
    for _ in range(100):  # clamp, then spread what clamping removed over the blocks free to move
        s = s.clamp(lo, hi)
        gap = target * len(s) - float(s.sum())
        free = (s > lo) & (s < hi) if gap else None
        if abs(gap) < 1e-9 or not bool(free.any()):
            break
        s[free] += gap / int(free.sum())
    return s.clamp(lo, hi).tolist()


def load_schedule(schedule: str, n_blocks: int) -> list[float] | None:
    """--schedule PATH: a JSON list of per-block sparsities (None for uniform and owl)."""
    if schedule in ("uniform", "owl"):
        return None
    try:
        with open(schedule) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise EPTSError("--schedule must be uniform, owl or a JSON file of per-block "
                        f"sparsities: {e}") from e
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise EPTSError(f"--schedule file '{schedule}' must hold a JSON list of numbers")
    return per_block_sparsities(values, n_blocks)


METHODS = ("epts", "dedicated", "wanda", "sparsegpt", "magnitude")


def sparsify(model: nn.Module, method: str, sparsity: float | str | Sequence[float],
             dense: dict[str, torch.Tensor], windows: torch.Tensor | None = None,
             state: ElasticState | None = None, cfg: EPTSConfig | None = None,
             device: str | torch.device = "cpu", verbose: bool = False,
             optimizer: Callable = optimize) -> nn.Module:
    """`method`'s model at `sparsity` (one number or pattern, or one per block), written into
    `model` from `dense`: epts deploys the elastic `state`; dedicated runs one optimization at that
    sparsity (`cfg`, with `optimizer`); wanda and sparsegpt prune sequentially on the calibration
    `windows`, as in their papers; magnitude needs no data."""
    restore_dense(model, dense)  # every method starts from the dense weights
    if method == "epts":
        return deploy(model, state, sparsity, dense, device)
    if method == "dedicated":
        if not isinstance(sparsity, (int, float, str)):
            raise EPTSError("--method dedicated trains one uniform sparsity; use --schedule "
                            "uniform")
        single = optimizer(model, windows, dedicated_config(cfg, sparsity), device)
        return deploy(model, single, sparsity, dense, device)
    if method in ("wanda", "sparsegpt"):
        rule, stat = (wanda_prune, sum_of_squares) if method == "wanda" else (sparsegpt_prune, gram)
        return prune_sequential(model, windows, sparsity, rule, stat, device, desc=method,
                                verbose=verbose)
    if method == "magnitude":
        return prune_magnitude(model, sparsity)
    raise EPTSError(f"unknown method '{method}'; one of {', '.join(METHODS)}")


def sweep(model: nn.Module, method: str, targets: Sequence[float | str],
          dense: dict[str, torch.Tensor], evaluate: Callable[[float | str], dict[str, float]],
          schedule: Callable | None = None, **how):
    """The method x sparsity loop of the command line, the benchmarks and the tutorial: for every
    target, sparsify (at schedule(target), one number or one per block; default the target) and
    yield a row {sparsity, achieved_sparsity, seconds, ppl: evaluate(target)}. The dense weights
    are back at the end."""
    try:
        for target in targets:
            sparsity = schedule(target) if schedule is not None else target
            lap = stopwatch(torch.device(how.get("device", "cpu")))
            sparsify(model, method, sparsity, dense, **how)
            row = {"sparsity": target, "achieved_sparsity": measured_sparsity(model),
                   "seconds": lap()}
            row["ppl"] = evaluate(target)
            if not isinstance(sparsity, (int, float, str)):
                row["per_block"] = list(sparsity)
            yield row
    finally:
        restore_dense(model, dense)


# 12. Data and evaluation ------------------------------------------------------------------------

def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """A whole corpus tokenized once (verbose=False: the length warning is for model inputs)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


OFFLINE_HINT = ("or work offline: HF_HUB_OFFLINE=1 for models and data already in the hub cache, "
                "a local model folder or .gguf file for --model, text files for --calib/--eval")


def check_hub(what: str, timeout: float = 5.0) -> None:
    """Fail in one line within `timeout` seconds when the hub cannot be reached, instead of after
    the hub client's retries; nothing to check with HF_HUB_OFFLINE=1."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return
    import socket
    import threading
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    reached = []

    def connect():  # in a thread: the name lookup itself can hang longer than any socket timeout
        with contextlib.suppress(OSError), socket.create_connection((host, 443), timeout):
            reached.append(True)
    probe = threading.Thread(target=connect, daemon=True)
    probe.start()
    probe.join(timeout + 1)
    if not reached:
        raise EPTSError(f"{what} comes from the Hugging Face hub, but {host} cannot be reached; "
                        f"check the network, {OFFLINE_HINT}")


def _hub_dataset(*args, **kwargs):
    """A dataset from the hub; any failure (no `datasets`, offline, no access) is one line."""
    offline = "or pass a local text file instead (e.g. --calib train.txt --eval test.txt)"
    try:
        from datasets import load_dataset  # lazy: only hub datasets need it
    except ImportError as e:
        raise EPTSError(f"hub datasets need the `datasets` package (pip install datasets), "
                        f"{offline}") from e
    check_hub(f"the dataset '{args[0]}'")
    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- network, authentication, missing files: one way out
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EPTSError(f"cannot load the hub dataset '{args[0]}' ({type(e).__name__}: {first}); "
                        f"{offline}") from e


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise EPTSError(f"'{path}' is neither a known dataset (c4, wikitext2) nor a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise EPTSError(f"'{path}' is not UTF-8 text (byte {e.start}); pass a plain text "
                        "file") from e


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, name: str
                   ) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from one token stream -> [nsamples, seqlen]."""
    if tokens.numel() < nsamples * seqlen:
        raise EPTSError(f"calibration text '{name}' has {tokens.numel()} tokens, fewer than "
                        f"nsamples x seqlen = {nsamples} x {seqlen}; use a longer text or smaller "
                        "values")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[i:i + seqlen] for i in starts])


def c4_windows(tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """C4 calibration as the Wanda and SparseGPT loaders draw it: random documents longer than
    seqlen from the first train shard, one random window each."""
    docs = _hub_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"},
                        split="train")
    rng, windows = random.Random(seed), []
    while len(windows) < nsamples:
        ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
        if ids.numel() > seqlen:
            start = rng.randint(0, ids.numel() - seqlen - 1)
            windows.append(ids[start:start + seqlen])
    return torch.stack(windows)


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int
                        ) -> torch.Tensor:
    """Calibration data -> LongTensor [nsamples, seqlen]. c4 and wikitext2: token for token the
    loaders of the Wanda and SparseGPT repositories (wikitext2: the raw train split joined by " ",
    windows starting in [0, n - seqlen - 1]); anything else: random windows of a local text file."""
    if nsamples <= 0:
        raise EPTSError(f"--nsamples must be positive, got {nsamples}")
    if source == "c4":
        return c4_windows(tokenizer, nsamples, seqlen, seed)
    if source == "wikitext2":
        train = _hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="train")
        ids = _tokenize(tokenizer, " ".join(train["text"]))
        return random_windows(ids[:-1], nsamples, seqlen, seed, source)
    return random_windows(_tokenize(tokenizer, _read_text(source)), nsamples, seqlen, seed, source)


def eval_tokens(tokenizer, source: str, seqlen: int) -> torch.Tensor:
    """Evaluation text tokenized once -> LongTensor [n_tokens] (the papers' protocol). wikitext2:
    the raw test split joined by "\\n\\n"; c4: the first 1100 validation documents joined by " ",
    cut to 256 windows (as SparseGPT); anything else: a local text file, whole."""
    if source == "c4":
        files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
        docs = _hub_dataset("allenai/c4", data_files=files, split="validation")
        return _tokenize(tokenizer, " ".join(docs[:1100]["text"]))[: 256 * seqlen]
    if source == "wikitext2":
        test = _hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split="test")
        return _tokenize(tokenizer, "\n\n".join(test["text"]))
    return _tokenize(tokenizer, _read_text(source))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int,
               device: str | torch.device | None = None, batch_size: int = 8,
               verbose: bool = False, desc: str = "ppl") -> float:
    """ppl = exp(mean token NLL) over the non-overlapping windows of `seqlen` tokens (the remainder
    is dropped). A non-finite result (NaN or inf weights) is an error, never a number in a table."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise EPTSError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of "
                        f"{seqlen}")
    windows = tokens[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not verbose,
                  leave=False):
        ids = windows[i:i + batch_size].to(device or model.device)
        logits = model(ids, use_cache=False).logits.float()
        nll += float(nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                 ids[:, 1:].reshape(-1), reduction="sum"))
        count += ids[:, 1:].numel()
    if not math.isfinite(nll):
        raise EPTSError(f"perplexity is not finite ({desc}): the model's weights hold NaN or inf")
    return math.exp(nll / count)


# 13. The elastic artifact: safetensors with a JSON header; no pickle, no base weights -----------

FORMAT_VERSION = 2  # 2: reports keep group0_gain, `tuned` replaces group0_ramp (1 still loads)


def fingerprint(model: nn.Module) -> dict:
    """Identify the base weights: a hash of the pruned linears' shapes and a few weight statistics
    (not a byte hash: the same model loaded in fp32, fp16 or bf16 matches)."""
    lins = pruned_linears(model)
    shapes = json.dumps({k: list(v.weight.shape) for k, v in lins.items()}, sort_keys=True)
    probes = sorted(lins)[:: max(1, len(lins) // 8)]
    probe = [float(lins[k].weight.detach().float().abs().mean()) for k in probes]
    return {"shapes": hashlib.sha256(shapes.encode()).hexdigest()[:16], "probe": probe}


def weight_dtype(model: nn.Module) -> str:
    return str(next(iter(pruned_linears(model).values())).weight.dtype)


def check_fingerprint(state: ElasticState, model: nn.Module, model_name: str) -> None:
    fp, saved = fingerprint(model), state.fingerprint
    same_probe = len(fp["probe"]) == len(saved.get("probe", [])) and all(
        math.isclose(a, b, rel_tol=1e-2) for a, b in zip(fp["probe"], saved["probe"]))
    if not (fp["shapes"] == saved.get("shapes") and same_probe):
        raise EPTSError(f"the elastic state was made for base model '{state.base_model}', "
                        f"but '{model_name}' has different weights")


def state_tensors(state: ElasticState, dtype: torch.dtype = torch.float32
                  ) -> dict[str, torch.Tensor]:
    """The tensors of an elastic state: A and B in `dtype`, the norms in fp32."""
    tensors = {f"{key}.{n}": t.to(dtype).contiguous()
               for key, AB in state.adapters.items() for n, t in zip("AB", AB)}
    norms = {f"{key}.act_norm": v.float().contiguous() for key, v in state.act_norms.items()}
    return {**tensors, **norms}


def state_header(state: ElasticState) -> dict:
    """Every ElasticState field but the tensors, as JSON: what state_from reads back."""
    fields = {k: v for k, v in vars(state).items() if k not in ("adapters", "act_norms")}
    fields["tuned"] = None if state.tuned is None else asdict(state.tuned)
    fields["reports"] = [asdict(r) for r in state.reports]
    return {"format": "epts", "version": FORMAT_VERSION, **fields}


def reports_v1(header: dict) -> list[BlockReport]:
    """The reports of a version-1 header: the gain was low_gain, 0 where the check dropped it
    (the first version-1 files have no low_gain: 1 where the check kept the adapter)."""
    gains = header.get("group0_gains") or [r.get("low_gain", 1.0) * r["low_group_enabled"]
                                          for r in header["reports"]]
    keep = ("loss_history", "low_check", "mix_sparsities", "seconds")
    return [BlockReport(**{k: r[k] for k in keep}, group0_gain=g)
            for r, g in zip(header["reports"], gains)]


def state_from(tensors: dict[str, torch.Tensor], header: dict) -> ElasticState:
    """The ElasticState of an artifact's tensors and header (version 1 or 2)."""
    if header["version"] == 1:
        reports = reports_v1(header)
        fitted = any(r.group0_gain not in (0.0, 1.0) for r in reports)
        tuned = TunedRecipe(group0_ramp=header["group0_ramp"]) if header.get(
            "group0_ramp") or fitted else None
    else:
        reports = [BlockReport(**r) for r in header["reports"]]
        tuned = None if header["tuned"] is None else TunedRecipe(**header["tuned"])
    names = ("groups", "mixer", "rank", "base_model", "fingerprint", "base_dtype")
    state = ElasticState(**{k: header[k] for k in names if k in header}, tuned=tuned,
                         reports=reports)
    state.groups = [tuple(g) for g in state.groups]
    for name in tensors:
        if name.endswith(".act_norm"):
            key = name[: -len(".act_norm")]
            state.act_norms[key] = tensors[name]
            state.adapters[key] = (tensors[f"{key}.A"].float(), tensors[f"{key}.B"].float())
    return state


def write_safetensors(path: str, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """safetensors with a JSON header in its metadata, written to a temporary file and renamed:
    a crash never leaves half a file behind."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tensors, path + ".tmp", metadata={"epts": json.dumps(header)})
    os.replace(path + ".tmp", path)


def read_safetensors(path: str, header_only: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON header) of an artifact or checkpoint, checked; no tensors with header_only."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise EPTSError(f"no elastic state at '{path}'")
    try:
        with safe_open(path, framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("epts", "{}"))
            tensors = {} if header_only else {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 -- any parse failure means "not an artifact"
        raise EPTSError(f"'{path}' is not an EPTS elastic state ({str(e).splitlines()[0]})") from e
    if header.get("format") != "epts":
        raise EPTSError(f"'{path}' is not an EPTS elastic state")
    if header.get("version", 0) > FORMAT_VERSION:
        raise EPTSError(f"'{path}' has format version {header['version']}, newer than this epts.py "
                        f"reads ({FORMAT_VERSION}); update epts.py")
    bad = next((k for k, t in tensors.items()
                if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise EPTSError(f"'{path}' is damaged: tensor '{bad}' holds non-finite values")
    return tensors, header


def save_elastic(state: ElasticState, path: str, dtype: torch.dtype = torch.float32,
                 seqlen: int | None = None) -> None:
    """The elastic artifact: the adapters (in `dtype`), the activation norms and a JSON header, as
    safetensors. No base weights and no masks (re-derived from the base weights and the norms).
    `seqlen`, the calibration windows' length, is recorded for --load to evaluate at."""
    write_safetensors(path, state_tensors(state, dtype), {**state_header(state), "seqlen": seqlen})


def artifact_header(path: str) -> dict:
    """The JSON header of an elastic state, without its tensors; the checkpoint of an unfinished
    run is refused in one line, naming --resume."""
    header = read_safetensors(path, header_only=True)[1]
    if "next_block" in header:
        raise EPTSError(f"'{path}' is a checkpoint of an unfinished run, not an elastic state; "
                        "continue it with --resume (the interrupted command again, plus --resume)")
    return header


def load_elastic(path: str) -> ElasticState:
    """The elastic state save_elastic wrote."""
    artifact_header(path)
    return state_from(*read_safetensors(path))


# 14. Command line -------------------------------------------------------------------------------

def warn(message: str) -> None:
    """A one-line warning on stderr (the command line's way; the library raises instead)."""
    print(f"warning: {message}", file=sys.stderr)


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch device that exists here; else a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("no GPU found: running on the CPU (slow for real models)")
        return torch.device("cpu")
    head, _, index = name.partition(":")
    if name != "cpu" and (head != "cuda" or (index and not index.isdigit())):
        raise EPTSError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if head == "cuda" and not torch.cuda.is_available():
        raise EPTSError(f"--device {name} was asked for, but torch sees no CUDA GPU; use --device "
                        "cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise EPTSError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA "
                        "GPU(s)")
    return torch.device(name)


def gguf_source(name: str) -> tuple[str, str]:
    """A .gguf model -> (local folder or hub repo, file name). A local path (one that exists,
    starts with . / ~, or has other than two slashes) must be a GGUF file; 'org/repo/file.gguf'
    is a hub file."""
    if os.path.isfile(name):
        with open(name, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EPTSError(f"'{name}' is not a GGUF file (it does not start with the GGUF "
                                "magic bytes)")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    parts = name.split("/")
    if os.path.exists(name) or name.startswith((".", "/", "~")) or len(parts) != 3:
        raise EPTSError(f"no such file: '{name}' (a hub GGUF is named 'org/repo/file.gguf')")
    return "/".join(parts[:2]), parts[2]


def load_gguf(name: str, trust_remote_code: bool = False, verbose: bool = True):
    """(model, tokenizer) from a .gguf file: transformers de-quantizes it to fp32, then the weights
    go into a plain model of the same class, which saves, prunes and exports like one loaded from
    a folder (a model loaded from GGUF refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, file = gguf_source(name)
    if not verbose:  # transformers' GGUF reader draws its own bar, which quiet_loading misses
        with contextlib.suppress(ImportError):
            from transformers import modeling_gguf_pytorch_utils as reader
            reader.tqdm = functools.partial(tqdm, disable=True)
    if not os.path.isdir(folder):
        check_hub(f"--model {name}")
    try:
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file,
                                                  trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise EPTSError(f"reading '{name}' needs the gguf package: pip install gguf "
                        f"({str(e).splitlines()[0]})") from e
    except Exception as e:  # a damaged file fails deep inside the gguf reader, with any error
        raise EPTSError(f"cannot read the GGUF file '{name}': {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}") from e
    del gguf.config.quantization_config
    model = type(gguf)(gguf.config).to(torch.float32)
    model.load_state_dict(gguf.state_dict())
    return model, tokenizer


def load_model(name: str, dtype: str, device: torch.device, trust_remote_code: bool = False,
               verbose: bool = True):
    """(model, tokenizer) from the hub, a local folder or a .gguf file; a failure is one line.
    dtype auto: fp32 on the CPU, the checkpoint's own (usually fp16/bf16) on a GPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    quiet_loading(not verbose)
    torch_dtype = (getattr(torch, dtype) if dtype != "auto"
                   else torch.float32 if device.type == "cpu" else "auto")
    if name.endswith(".gguf"):
        model, tokenizer = load_gguf(name, trust_remote_code, verbose)
        model.to(torch.float32 if torch_dtype == "auto" else torch_dtype)  # GGUF: fp32
    else:
        if not os.path.exists(name):
            check_hub(f"--model {name}")
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise EPTSError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            raise EPTSError(f"cannot load the tokenizer of '{name}': "
                            f"{str(e).splitlines()[0]}") from e
    if len(tokenizer) <= 1 or not tokenizer("a b c")["input_ids"]:
        raise EPTSError(f"the tokenizer of '{name}' has no vocabulary: the model folder lacks its "
                        "tokenizer files (tokenizer.json / tokenizer_config.json / vocab files)")
    arch_of(model)
    return model.eval(), tokenizer


def quiet_loading(quiet: bool) -> None:
    """--quiet: no progress bars from transformers and the hub client either."""
    if quiet:
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        disable_progress_bars()


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, like every other input error
        self.exit(2, f"error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default shown, except None (those flags say in words what happens)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def sparsity_arg(text: str, kinds: str = "a number or N:M") -> float | str:
    """A command-line sparsity of the `kinds` its flag takes: a number, or N:M kept as text."""
    try:
        value = text if ":" in text else float(text)
        pattern(value)  # an N:M pattern: 0 < N < M
    except EPTSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sparsity '{text}': expected {kinds}") from None
    if isinstance(value, str) and "N:M" not in kinds:
        raise argparse.ArgumentTypeError(f"'{text}' is an N:M pattern: use --pattern {text} (this "
                                         f"flag takes {kinds})")
    if not isinstance(value, str) and "number" not in kinds:
        raise argparse.ArgumentTypeError(f"expected {kinds} (e.g. 2:4), got '{text}'")
    return value


def pattern_arg(text: str) -> str:
    """--pattern: unstructured, or an N:M pattern."""
    return text if text == "unstructured" else sparsity_arg(text, "unstructured or N:M")


def add_data_args(p: argparse.ArgumentParser) -> None:
    """The flags of the model and the data: what is pruned, calibrated on and evaluated."""
    p.add_argument("--model", required=True, help="hub name (e.g. facebook/opt-125m), local "
                   "folder, or .gguf file (local, or org/repo/file.gguf on the hub); OPT or LLaMA")
    p.add_argument("--calib", default="c4", help="calibration data: c4 | wikitext2 | a text file")
    p.add_argument("--eval", nargs="+", help="wikitext2 | c4 | text files | none (default: "
                   "wikitext2; none with --load and --export-sparsity)")
    p.add_argument("--eval-tokens", type=int, help="evaluate on the first N tokens of each --eval "
                   "text only (default: all)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per calibration and evaluation window "
                   "(perplexity depends on it); default: a --load state's own, else min(2048, "
                   "max_position_embeddings)")


def add_method_args(p: argparse.ArgumentParser) -> None:
    """The flags of the method's hyper-parameters (EPTSConfig's defaults)."""
    d = EPTSConfig()
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of Phase 1 per block")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate, cosine-annealed")
    p.add_argument("--recipe", choices=["paper", "tuned"], default="paper", help="paper (the "
                   "authors') or tuned (not in the paper: group 0 trained on the dense stream, "
                   "ramped and fitted gain, rank 32; see README)")
    p.add_argument("--rank", type=int, help=f"LoRA rank of every adapter pair (default: {d.rank}; "
                   "32 with --recipe tuned)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="calibration windows per Phase-1 step")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the windows and every draw")
    p.add_argument("--nm-train", type=functools.partial(sparsity_arg, kinds="N:M"), metavar="N:M",
                   help="not in the paper: train the group holding N/M also on N:M masks (one "
                        "more Phase-1 slice, ~1/7 more time), for deployment at N:M; the "
                        "table gets an N:M row after --sparsities")
    p.add_argument("--distill-epochs", type=int, default=0, help="with --recipe tuned (not in "
                   "the paper): epochs of end-to-end distillation of all adapters against the "
                   "dense model's next-token distribution, after the block-wise pass (0: off; "
                   "SmolLM2-135M: --epochs 5 --distill-epochs 18, bench/RESULTS.md)")
    p.add_argument("--distill-lr", type=float, default=TunedRecipe().distill_lr,
                   help="Adam learning rate of --distill-epochs, cosine-annealed")
    p.add_argument("--groups", type=float, nargs="+", default=[hi for _, hi in d.groups],
                   metavar="HI", help="upper ends of the sparsity groups; group k is "
                   "(HI_{k-1}, HI_k], starting at 0")
    p.add_argument("--mixer", type=float, nargs="+", default=list(d.mixer),
                   help="MSFM weights, one per group")


def add_speed_args(p: argparse.ArgumentParser) -> None:
    """The flags of epts_scale.py: how the method runs, never what it computes."""
    p.add_argument("--no-amp", action="store_true",
                   help="optimize in fp32 instead of bf16 autocast (CUDA)")
    p.add_argument("--low-memory", action="store_true", help="keep the calibration streams in "
                   "pinned host memory and recompute Phase 1's activations group by group (same "
                   "math; needs epts_scale.py)")
    p.add_argument("--reference-loop", action="store_true",
                   help="one block call per group instead of all groups in one")
    p.add_argument("--no-cuda-graph", action="store_true", help="run Phase-1 steps eagerly on CUDA")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The flags of what a run writes and reads back: the elastic state, the export, results."""
    p.add_argument("--save", help="write the elastic state (safetensors) here; with epts_scale.py, "
                   "also a checkpoint after every block, for --resume")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved adapters: bfloat16 is half of float32's size and moved "
                        "no perplexity on SmolLM2-135M by more than 0.022%%; the run evaluates "
                        "the state as saved")
    p.add_argument("--checkpoint-dir", help="write a checkpoint after every block here (default: "
                   "--save's folder; needs epts_scale.py)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint after the "
                   "last finished block (needs epts_scale.py)")
    p.add_argument("--load", help="load an elastic state instead of optimizing")
    p.add_argument("--export-sparsity", type=sparsity_arg, help="save the model at this sparsity "
                   "or N:M pattern (any --method) to --export-dir as a plain transformers model")
    p.add_argument("--export-dir", help="an empty or new folder for --export-sparsity")
    p.add_argument("--export-dtype", default="auto", choices=["auto", "float32", "float16",
                   "bfloat16"], help="dtype of the exported weights (auto: the checkpoint's own)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing --save / "
                   "--json-out files, and an --export-dir holding an earlier export: its files "
                   "(config, weights, tokenizer) are removed before the new one is written; any "
                   "other file there is refused. Never the model's own folder")
    p.add_argument("--json-out", help="write the results as JSON here")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's flags; --eval's default is none when a --load state is only exported."""
    p = _Parser(description="EPTS: optimize once, deploy at any sparsity in [0, 1) (trained for "
                "(0, 0.7]; above that, the mask alone).", formatter_class=_Help)
    add_data_args(p)
    add_method_args(p)
    p.add_argument("--sparsities", nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7],
                   type=functools.partial(sparsity_arg, kinds="a number such as 0.5"),
                   help="sparsities to deploy and evaluate")
    p.add_argument("--pattern", default="unstructured", type=pattern_arg, help="unstructured, or "
                   "N:M (e.g. 2:4: N of every M consecutive inputs pruned, what GPU sparse tensor "
                   "cores run); N:M evaluates that pattern instead of --sparsities")
    p.add_argument("--sparse24", action="store_true", help="with --pattern 2:4 on CUDA: evaluate "
                   "the 2:4 row with the linears that cuSPARSELt runs faster swapped in "
                   "(epts_scale.sparse24) and print its report")
    p.add_argument("--method", choices=METHODS, default="epts", help="epts: one elastic run for "
                   "all sparsities; dedicated: one EPTS-style run per sparsity; wanda, sparsegpt, "
                   "magnitude: one pruning per sparsity")
    p.add_argument("--schedule", default="uniform", help="uniform | owl | PATH to a JSON list of "
                   "per-block sparsities (then --sparsities is ignored)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the model's dtype (auto: fp32 on CPU, the checkpoint's on GPU); blocks "
                   "optimize in fp32")
    add_speed_args(p)
    add_output_args(p)
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per evaluation forward")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.eval is None:  # exporting a saved state needs no evaluation unless one is asked for
        args.eval = ["none"] if args.load and args.export_sparsity is not None else ["wikitext2"]
    return args


def config_from_args(args: argparse.Namespace) -> EPTSConfig:
    """The method's hyper-parameters, and every plain number checked."""
    groups = tuple(zip([0.0] + args.groups[:-1], args.groups))
    low = EPTSConfig().low_check_sparsity
    if not groups[0][0] < low <= groups[0][1]:  # other --groups: 0.3 is 3/4 of group 0 = (0, 0.4]
        low = 0.75 * groups[0][1]
    extra = {} if args.rank is None else {"rank": args.rank}
    if args.distill_epochs:
        if args.recipe != "tuned":
            raise EPTSError("--distill-epochs is part of the tuned recipe: add --recipe tuned")
        extra["tuned"] = TunedRecipe(distill_epochs=args.distill_epochs, distill_lr=args.distill_lr)
    cfg = recipe_config(args.recipe, groups=groups, mixer=tuple(args.mixer), epochs=args.epochs,
                        lr=args.lr, batch_size=args.batch_size, seed=args.seed,
                        low_check_sparsity=low, nm_train=args.nm_train, **extra)
    validate_config(cfg)
    for flag, value, least in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2),
                               ("--eval-batch-size", args.eval_batch_size, 1),
                               ("--eval-tokens", args.eval_tokens, 2)):
        if value is not None and value < least:
            raise EPTSError(f"{flag} must be at least {least}, got {value}")
    return cfg


def scale_module():
    """The companion module epts_scale, if it lies beside this file (or on the path), else None."""
    try:
        import epts_scale
        return epts_scale
    except ModuleNotFoundError as e:
        if e.name != "epts_scale":
            raise
        return None


def companion(args: argparse.Namespace):
    """epts_scale for this command: without it the plain paths run, and a flag that needs it is
    one line naming it."""
    scale = scale_module()
    if scale is not None:
        return scale
    needs = [("--low-memory", args.low_memory), ("--resume", args.resume),
             ("--checkpoint-dir", args.checkpoint_dir), ("--sparse24", args.sparse24),
             ("torchrun", int(os.environ.get("WORLD_SIZE", 1)) > 1)]
    for flag, asked in needs:
        if asked:
            raise EPTSError(f"{flag} needs epts_scale.py, the companion of epts.py (low memory, "
                            "torchrun, checkpoints, 2:4 kernels): put it beside epts.py")
    return None


def targets_of(args: argparse.Namespace) -> list[float | str]:
    """The table's rows: --sparsities, then the N:M that --nm-train trained for; --pattern N:M
    alone."""
    if args.pattern != "unstructured":
        return [args.pattern]
    trained_nm = [args.nm_train] if args.nm_train and args.method == "epts" else []
    return [*args.sparsities, *trained_nm]


def check_sparsities(args: argparse.Namespace, groups: Sequence[tuple[float, float]],
                     schedule: Sequence[float] | None = None, warn_above: bool = True) -> None:
    """Every sparsity the run will apply lies in [0, 1); a dedicated run's in the trained groups.
    EPTS above its top group deploys the mask alone (as the authors' code), with a warning."""
    if args.pattern != "unstructured" and args.schedule != "uniform":
        raise EPTSError("--pattern N:M puts one pattern in every block: use it with --schedule "
                        "uniform")
    if args.sparse24 and args.pattern != "2:4":
        raise EPTSError("--sparse24 runs the 2:4 row through the 2:4 kernels: use it with "
                        "--pattern 2:4 (an exported 2:4 model: --method magnitude --pattern 2:4 "
                        "keeps it)")
    export = [args.export_sparsity] if args.export_sparsity is not None else []
    asked = [pattern(s)[0] for s in list(schedule or targets_of(args)) + export]
    for s in asked:
        if not (math.isfinite(s) and 0 <= s < 1):
            raise EPTSError(f"sparsity {s} is outside [0, 1)")
        if args.method == "dedicated":
            group_of(s, groups)
    above = sorted({s for s in asked if s > groups[-1][1]})
    if args.method == "epts" and above and warn_above:
        warn(f"sparsities {above} lie above the trained range (0, {groups[-1][1]}]: the mask alone "
             "is deployed there")


def check_patterns(args: argparse.Namespace, model: nn.Module) -> None:
    """An N:M pattern needs every pruned linear's input size divisible by M."""
    for s in targets_of(args) + [args.export_sparsity]:
        m = pattern(s)[1] if s is not None else None
        bad = [k for k, lin in pruned_linears(model).items() if m and lin.in_features % m]
        if bad:
            raise EPTSError(f"pattern {s}: '{bad[0]}' has "
                            f"{pruned_linears(model)[bad[0]].in_features} inputs, not a multiple "
                            f"of {m}")


def check_inputs(args: argparse.Namespace, device: torch.device) -> dict:
    """Before the model loads: --save where nothing is optimized; a --model, --eval or --calib
    path that does not exist; a folder holding a GGUF file; a --load that is no elastic state; a
    warning for fp16 on the CPU. Returns --load's header ({} without --load)."""
    if args.save and (args.method != "epts" or args.load):
        why = ("with --load nothing is optimized" if args.load
               else f"--method {args.method} has none")
        raise EPTSError(f"--save writes the elastic state that --method epts optimizes; {why}")
    name = args.model
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or (
        "/" in name and os.path.exists(name.split("/")[0]))
    if name.endswith(".gguf"):
        gguf_source(name)  # a missing or foreign local file, now
    elif looks_local and not os.path.exists(os.path.expanduser(name)):
        raise EPTSError(f"--model '{name}': no such folder (a hub model is named owner/name)")
    elif os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        ggufs = sorted(f for f in os.listdir(name) if f.endswith(".gguf"))
        if ggufs:  # transformers would say only "Unrecognized model"
            raise EPTSError(f"--model '{name}' has no config.json but holds {ggufs[0]}: pass that "
                            "file as --model")
    sources = [("--eval", e, ("wikitext2", "c4", "none")) for e in args.eval]
    calib = [] if args.load else [("--calib", args.calib, ("c4", "wikitext2"))]
    for flag, source, known in sources + calib:
        if source not in known and not os.path.isfile(source):
            raise EPTSError(f"{flag} '{source}' is neither {', '.join(known)} nor a text file")
    if args.dtype == "float16" and device.type == "cpu":
        warn("--dtype float16 on the CPU is very slow (few CPU kernels are fast in fp16): float32, "
             "the CPU's default, takes a fraction of the time")
    return artifact_header(args.load) if args.load else {}


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both made absolute, links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def writable_folder(folder: str, flag: str) -> None:
    """Prove `folder` writable with a temporary file, creating nothing (a new folder is made when
    its output is written, so the nearest existing folder above is tried); else one line."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise EPTSError(f"{flag}: cannot write to '{folder}': '{existing}' is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        why = e.strerror or str(e)
        if isinstance(e, FileNotFoundError):  # e.g. /proc: it exists but takes no new files
            why = (f"the folder exists, but creating a file in it fails: {why}; not a writable "
                   "file system")
        raise EPTSError(f"{flag}: cannot write to '{folder}' ({why})") from e


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors",
                "model-*-of-*.safetensors", "model.safetensors.index.json", "tokenizer.json",
                "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def earlier_export(folder: str) -> list[str]:
    """The files of an earlier export in `folder` (EXPORT_FILES), which --overwrite removes before
    the new export is written; any other file there is refused by name: nothing else is deleted."""
    import fnmatch
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    other = [n for n in names if not (os.path.isfile(os.path.join(folder, n))
                                      and any(fnmatch.fnmatchcase(n, p) for p in EXPORT_FILES))]
    if other:
        raise EPTSError(f"--export-dir '{folder}' holds {', '.join(other[:3])}"
                        f"{' ...' if len(other) > 3 else ''}, which no export writes: --overwrite "
                        "replaces an earlier export only; remove them or choose a new folder")
    return names


def check_files(args: argparse.Namespace, model_dir: str | None) -> None:
    """--save and --json-out: new files (or --overwrite), in writable folders, outside the model
    folder and --export-dir, and not the same file."""
    files = {flag: p for flag, p in (("--save", args.save), ("--json-out", args.json_out)) if p}
    if len(files) == 2 and os.path.realpath(args.save) == os.path.realpath(args.json_out):
        raise EPTSError("--save and --json-out name the same file")
    for flag, path in files.items():
        if model_dir and inside(path, model_dir):
            raise EPTSError(f"{flag} '{path}' lies inside the model folder '{args.model}': "
                            "refusing to write there")
        if args.export_dir and inside(path, args.export_dir):
            raise EPTSError(f"{flag} '{path}' lies inside --export-dir '{args.export_dir}'")
        if os.path.isdir(path):
            raise EPTSError(f"{flag} '{path}' exists as a folder; choose a new file name")
        if os.path.exists(path) and not args.overwrite:
            raise EPTSError(f"{flag} '{path}' exists; choose a new file name or pass --overwrite")
        writable_folder(os.path.dirname(os.path.abspath(path)), flag)


def check_outputs(args: argparse.Namespace) -> None:
    """Before any work: refuse every output that would destroy data (the model's own folder,
    another output, an existing file or non-empty folder without --overwrite) or that could not
    be written."""
    model_dir = args.model if os.path.exists(args.model) else None  # a folder or a .gguf file
    check_files(args, model_dir)
    path = args.export_dir
    if bool(path) != (args.export_sparsity is not None):
        raise EPTSError("--export-sparsity and --export-dir go together")
    if path:  # a new or empty folder (non-empty with --overwrite), never the model's own folder
        if model_dir and (inside(path, model_dir) or inside(model_dir, path)):
            raise EPTSError(f"--export-dir '{path}' would overwrite the model folder "
                            f"'{args.model}'")
        if os.path.isdir(path) and os.listdir(path) and not args.overwrite:
            raise EPTSError(f"--export-dir '{path}' is not empty; choose a new folder or pass "
                            "--overwrite")
        earlier_export(path)
        writable_folder(path, "--export-dir")


def load_artifact(args: argparse.Namespace, model: nn.Module) -> ElasticState:
    """--load: the elastic state, checked against the model (its weights; its dtype: a warning)."""
    state = load_elastic(args.load)
    if state.fingerprint:
        check_fingerprint(state, model, args.model)
    else:
        warn(f"the elastic state records no fingerprint of its base model: not checked against "
             f"'{args.model}'")
    if state.base_dtype and state.base_dtype != weight_dtype(model):
        warn(f"the elastic state was optimized on {state.base_dtype} weights, this model holds "
             f"{weight_dtype(model)}: a few mask positions may differ; load with --dtype "
             f"{state.base_dtype.replace('torch.', '')} for the same masks")
    return state


def counting_steps(bar) -> Callable:
    """A phase1_train step wrapper that advances the progress bar `bar` by one per step."""
    def wrap(step: Callable, opt: torch.optim.Optimizer) -> Callable:
        def counted(*args):
            per_group = step(*args)
            bar.update()
            return per_group
        return counted
    return wrap


def optimize_with_progress(model: nn.Module, windows: torch.Tensor, cfg: EPTSConfig,
                           device: torch.device, verbose: bool = True) -> ElasticState:
    """optimize on the plain paths, with a progress bar over all Phase-1 steps."""
    steps = cfg.epochs * math.ceil(len(windows) / cfg.batch_size) * len(decoder_blocks(model))
    with tqdm(total=steps, desc="EPTS", unit="step", disable=not verbose) as bar:
        return optimize(model, windows, cfg, device, wrap_step=counting_steps(bar))


def optimizer_for(args: argparse.Namespace, scale, checkpoint: str | None = None) -> Callable:
    """optimize(model, windows, cfg, device) as this command runs it: epts_scale's (batched, bf16,
    CUDA graphs, checkpoints) when it is there, else the plain paths."""
    if scale is None:
        return functools.partial(optimize_with_progress, verbose=not args.quiet)
    options = scale.options_from_args(args, checkpoint)
    return lambda model, windows, cfg, device: scale.optimize(model, windows, cfg, device, options)


def optimize_and_save(args: argparse.Namespace, model: nn.Module, windows: torch.Tensor,
                      cfg: EPTSConfig, device: torch.device, optimizer: Callable,
                      writer: bool = True, checkpoint: str | None = None
                      ) -> tuple[ElasticState, float]:
    """The elastic state, optimized; --save writes it (the `writer` process only) and removes the
    then finished run's `checkpoint`, and the run goes on with the saved state: --load prints the
    same numbers. Returns (state, seconds)."""
    lap = stopwatch(device)
    state = optimizer(model, windows, cfg, device)
    state.base_model, state.fingerprint = args.model, fingerprint(model)
    state.base_dtype = weight_dtype(model)
    seconds = lap()
    if args.save and writer:
        save_elastic(state, args.save, getattr(torch, args.save_dtype), seqlen=windows.shape[-1])
        state = load_elastic(args.save)
        if checkpoint and os.path.isfile(checkpoint):
            os.remove(checkpoint)  # the run is complete: the artifact replaces the checkpoint
    return state, seconds


def checkpoint_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (config.json), whatever it was loaded in."""
    from transformers import AutoConfig
    if name.endswith(".gguf"):  # de-quantized GGUF weights are exact in fp32 only
        return torch.float32
    saved = getattr(AutoConfig.from_pretrained(name), "dtype", None)
    return getattr(torch, saved) if isinstance(saved, str) else (saved or fallback)


def export(args: argparse.Namespace, model: nn.Module, tokenizer, dense: dict[str, torch.Tensor],
           how: dict) -> None:
    """--export-sparsity: --method's model at that sparsity as a plain transformers model, in the
    checkpoint's own dtype unless --export-dtype says otherwise; checked before and after."""
    sparsify(model, args.method, args.export_sparsity, dense, **how)
    if not all(bool(torch.isfinite(lin.weight).all()) for lin in pruned_linears(model).values()):
        raise EPTSError("the model to export holds non-finite weights; nothing was written")
    home = next(model.parameters()).dtype
    dtype = (getattr(torch, args.export_dtype) if args.export_dtype != "auto"
             else checkpoint_dtype(args.model, home))
    for name in earlier_export(args.export_dir):  # --overwrite: nothing of the earlier one stays
        os.remove(os.path.join(args.export_dir, name))
    model.to(dtype)  # and back below: fp16/bf16 -> fp32 -> fp16/bf16 is exact
    try:
        model.save_pretrained(args.export_dir)
        tokenizer.save_pretrained(args.export_dir)
    finally:
        model.to(home)
    written = os.listdir(args.export_dir)
    if "config.json" not in written or not any(f.endswith(".safetensors") for f in written):
        raise EPTSError(f"the export to '{args.export_dir}' was not written completely (found "
                        f"{sorted(written)})")
    print(f"exported {args.method} at sparsity {args.export_sparsity} (achieved "
          f"{measured_sparsity(model):.4f}, {str(dtype).replace('torch.', '')}) to "
          f"{args.export_dir}", flush=True)
    restore_dense(model, dense)


def sparsity_plan(args: argparse.Namespace, model: nn.Module, dense: dict[str, torch.Tensor],
                  schedule_file: list[float] | None, how: dict
                  ) -> tuple[list[float | str], Callable | None]:
    """(targets, schedule) for sweep: the --sparsities, an OWL schedule around each, or one file."""
    state = how["state"]
    if schedule_file is not None:
        return [sum(schedule_file) / len(schedule_file)], lambda target: schedule_file
    if args.schedule == "owl":
        norms = (state.act_norms if state is not None
                 else dense_act_norms(model, how["windows"], how["device"]))
        limits = (0.0, state.groups[-1][1]) if state is not None else (0.0, 1.0)
        return args.sparsities, lambda target: owl_sparsities(dense, norms, target, limits=limits)
    return targets_of(args), None


def eval_seqlen(args: argparse.Namespace, model: nn.Module, header: dict) -> int:
    """--seqlen; else the seqlen a loaded state was optimized at (none recorded: a warning), else
    min(2048, max_position_embeddings); never above the model's positions."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seqlen = args.seqlen or header.get("seqlen") or min(2048, max_pos or 2048)
    if args.load and not (args.seqlen or header.get("seqlen")):
        warn(f"--load: the elastic state does not record its --seqlen; evaluating at {seqlen} "
             "tokens per window (perplexity depends on it: pass --seqlen)")
    if max_pos is not None and seqlen > max_pos:
        raise EPTSError(f"--seqlen {seqlen} is above the model's max_position_embeddings {max_pos}")
    return seqlen


def load_eval_tokens(args: argparse.Namespace, tokenizer, seqlen: int) -> dict[str, torch.Tensor]:
    """Every --eval text, tokenized (and cut to --eval-tokens); each holds at least one window."""
    tokens = {}
    for e in (e for e in args.eval if e != "none"):
        tokens[e] = eval_tokens(tokenizer, e, seqlen)[: args.eval_tokens]
        if tokens[e].numel() < seqlen:
            raise EPTSError(f"--eval '{e}' has {tokens[e].numel()} tokens, fewer than one window "
                            f"of {seqlen}")
    return tokens


def table_row(r: dict, names: Sequence[str]) -> str:
    """sparsity, achieved sparsity, one perplexity per --eval text, deploy seconds."""
    s = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.2f}"
    ppl = " ".join(f"{r['ppl'][e]:>14.3f}" for e in names)
    return f"{s:>8} {r['achieved_sparsity']:>9.4f} {ppl} {r['seconds']:>8.1f}"


def evaluate_and_report(args: argparse.Namespace, model: nn.Module,
                        tokens: dict[str, torch.Tensor], seqlen: int,
                        dense: dict[str, torch.Tensor], schedule_file: list[float] | None,
                        how: dict, result: dict, scale=None) -> None:
    """The dense perplexity, then the method at every sparsity; each row printed when ready."""
    short = {e: os.path.basename(e.rstrip("/")) or e for e in tokens}

    def evaluate(sparsity: float | str) -> dict[str, float]:
        model.to(how["device"])
        if args.sparse24 and sparsity == "2:4":  # for this row only: the next sparsify rewrites
            report = scale.sparse24(model, args.eval_batch_size * seqlen)
            result["sparse24"] = asdict(report)
            print(report.summary(), flush=True)
        ppl = {e: perplexity(model, t, seqlen, how["device"], args.eval_batch_size, not args.quiet,
                             desc=f"ppl {short[e]} s={sparsity}") for e, t in tokens.items()}
        if scale is not None:
            scale.unsparse24(model)
        if args.method != "epts":
            model.cpu()  # the pruning loops move one block at a time to the device
        return ppl

    targets, schedule = sparsity_plan(args, model, dense, schedule_file, how)
    result["dense"] = evaluate(0.0)
    print(f"\n{args.method} on {args.model} (seqlen {seqlen}, schedule {args.schedule}"
          f"{result['made']})")
    # `deploy s`: the time to set a row's weights (to prune, for a baseline), not to evaluate
    head = (f"{'sparsity':>8} {'achieved':>9} " + " ".join(f"{short[e][:14]:>14}" for e in tokens)
            + f" {'deploy s':>8}")
    print(head + "\n" + "-" * len(head))
    dense_row = {"sparsity": 0.0, "achieved_sparsity": 0.0, "ppl": result["dense"], "seconds": 0.0}
    print(table_row(dense_row, list(tokens)), flush=True)
    for row in sweep(model, args.method, targets, dense, evaluate, schedule, **how):
        result["results"].append(row)
        print(table_row(row, list(tokens)), flush=True)


def prepare(args: argparse.Namespace, scale) -> dict:
    """Everything that can be checked, checked before any work; the model, data and state loaded.
    Returns the run's parts by name."""
    cfg = config_from_args(args)
    check_sparsities(args, cfg.groups, warn_above=False)  # the groups may come from --load
    device = pick_device(args.device)
    if scale is not None:
        device = scale.start_ranks(args, device, cfg)  # torchrun: this rank's GPU; else as is
    header = check_inputs(args, device)
    check_outputs(args)
    checkpoint = scale.checkpoint_path(args) if scale is not None else None
    model, tokenizer = load_model(args.model, args.dtype, device, args.trust_remote_code,
                                  not args.quiet)
    check_patterns(args, model)
    schedule_file = load_schedule(args.schedule, len(decoder_blocks(model)))
    seqlen = eval_seqlen(args, model, header)
    state = load_artifact(args, model) if args.load else None
    check_sparsities(args, state.groups if state is not None else cfg.groups, schedule_file)
    calibrate = not (args.method == "epts" and state is not None) and not (
        args.method == "magnitude" and args.schedule != "owl")
    windows = (calibration_windows(tokenizer, args.calib, args.nsamples, seqlen, args.seed)
               if calibrate else None)
    if windows is not None:
        check_windows(model, windows)
    tokens = load_eval_tokens(args, tokenizer, seqlen)  # a bad --eval fails before optimizing
    return dict(cfg=cfg, device=device, checkpoint=checkpoint, model=model, tokenizer=tokenizer,
                schedule_file=schedule_file, seqlen=seqlen, state=state, windows=windows,
                tokens=tokens)


def run(args: argparse.Namespace) -> dict:
    """The command line's job: check and load everything, optimize (or load), optionally export,
    and sweep the sparsities, printing each row as soon as it is evaluated."""
    scale = companion(args)
    r = prepare(args, scale)
    model, state, device = r["model"], r["state"], r["device"]
    config = {**vars(args), "seqlen": r["seqlen"]}
    if state is not None:  # what the loaded artifact was made with, not what the flags say
        config.update(groups=[hi for _, hi in state.groups], mixer=state.mixer, rank=state.rank,
                      recipe="paper" if state.tuned is None else "tuned")
    result = {"model": args.model, "method": args.method, "config": config, "dense": {},
              "results": [], "optimize_seconds": 0.0,
              "made": f"; loaded {args.load}" if args.load else ""}
    if args.method == "epts" and state is None:
        optimizer = optimizer_for(args, scale, r["checkpoint"])
        state, seconds = optimize_and_save(args, model, r["windows"], r["cfg"], device, optimizer,
                                           writer=scale is None or scale.process_rank() == 0,
                                           checkpoint=r["checkpoint"])
        result.update(optimize_seconds=seconds, made=f"; optimized in {seconds:.1f} s")
        if scale is not None and scale.end_ranks(r["cfg"], result):
            return result  # torchrun: ranks > 0 stop here; rank 0 evaluates and writes
    if state is not None:
        result["group0_gains"] = [rep.group0_gain for rep in state.reports]
    dense = snapshot_linears(model)
    how = dict(windows=r["windows"], state=state, cfg=r["cfg"], device=device,
               verbose=not args.quiet, optimizer=optimizer_for(args, scale))
    if args.export_sparsity is not None:
        export(args, model, r["tokenizer"], dense, how)
    if r["tokens"]:
        evaluate_and_report(args, model, r["tokens"], r["seqlen"], dense, r["schedule_file"], how,
                            result, scale)
    report_outputs(args, state, result)
    return result


def report_outputs(args: argparse.Namespace, state: ElasticState | None, result: dict) -> None:
    """--json-out written, and one closing line per output naming where it went."""
    if args.json_out:  # also without --eval: the optimization's seconds and the gains
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "made"}, f, indent=2, default=str)
    if args.load and not result["dense"] and args.export_sparsity is None:
        print(f"loaded {args.load}: {len(state.reports)} blocks, {len(state.groups)} groups, rank "
              f"{state.rank}, {'paper' if state.tuned is None else 'tuned'} recipe, made for "
              f"'{state.base_model}'; nothing evaluated (--eval none)")
    if args.save and not args.load:
        print(f"saved the elastic state to {args.save} "
              f"({os.path.getsize(args.save) / 2**20:.1f} MiB); --load it to deploy again")
    if args.json_out:
        print(f"wrote the results to {args.json_out}")


def main(argv: Sequence[str] | None = None) -> int:
    scale = scale_module()
    if scale is not None:
        scale.quiet_other_ranks()  # torchrun: ranks > 0 print nothing but a crash
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, one line printed)
        return int(e.code or 0)
    started = time.time()
    try:
        run(args)
    except EPTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted_hint(args, started)}", file=sys.stderr)
        return 130
    return 0


def interrupted_hint(args: argparse.Namespace, started: float) -> str:
    """After Ctrl-C: what survived, and how to continue or keep work next time."""
    scale = scale_module()
    hint = scale.resume_hint(args, started) if scale is not None else None
    if hint:
        return hint
    if args.save and os.path.isfile(args.save) and os.path.getmtime(args.save) >= started:
        return (f"the elastic state is saved in '{args.save}'; the same command with --load "
                f"{args.save} instead of --save continues from it without optimizing again")
    if args.method == "epts" and not args.load:
        return ("the optimization so far is lost; with --save FILE (and epts_scale.py beside "
                "epts.py) a checkpoint is written after every block, and the same command with "
                "--resume continues from it")
    return "nothing was written"


if __name__ == "__main__":
    sys.modules["epts"] = sys.modules[__name__]  # epts_scale's `import epts` is this very module
    sys.exit(main())
