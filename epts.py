"""EPTS: Elastic Post-Training Sparsity (Xu et al., KDD 2026, arXiv 2606.25285) -- a single-file reference.

One short block-wise optimization turns a pretrained causal LM (OPT, LLaMA) into a single *elastic* model, trained
for every unstructured sparsity s in (0, 0.7] and deployable at any s in [0, 1) (above 0.7: the mask alone).
MS-HiLoRA (Eq. 2) gives every linear W one LoRA pair (B_k, A_k) per sparsity group k, chained low -> high; MSFM
(Eq. 4) trains the next block on a mix of this block's outputs at several sparsities. The whole algorithm:

  optimize(model, windows, cfg):
    X_dense = X_mix = capture_block_inputs(model, windows)           # two streams into block 0
    for every decoder block f:
      Y, norms = dense_targets_and_norms(f, X_dense)                  # dense targets, Wanda's ||X_j||
      M(s) = mask_from_ranks(row_ranks(wanda_scores(W, norms)), s)    # Eq. 1, nested in s
      W_s = (W + sum_{j<=group(s)} B_j A_j) * M(s)                    # Eq. 2: elastic_weight, HiLoRALinear
      phase1_train: every step draws s_k in each group k, loss = phase1_objective(f(X_mix; W_{s_k}), Y)  # Eq. 3
      keep_0 = low_group_check(f, X_dense, Y)                         # group 0's adapter only if it helps
      X_mix = phase2_mix: sum_k w_k f(X_mix; W_{s_k})                  # Eq. 4: mix_features
      X_dense = Y
  deploy(model, state, s): W <- W_s                                   # any s, one number or one per block

The method (sections 0-8) comes first, in the paper's order; after the "harness" banner come checks and speed,
baselines (magnitude, Wanda, SparseGPT, dedicated runs, OWL), artifacts, data and evaluation, the command line.

Run:   python epts.py --model facebook/opt-125m
Test:  python -m pytest -q test_epts.py
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn


class EPTSError(Exception):
    """A user-facing error: the command line prints its message on one line and exits with status 2."""


# 0. Configuration: the paper's hyper-parameters ---------------------------------------------------------------

# The seven sparsity groups (lo, hi]: group 0 covers the easy low sparsities, the others are narrow because the
# reconstruction gets hard quickly above 40%. A sparsity of exactly 0 means "dense".
GROUPS: tuple[tuple[float, float], ...] = ((0.00, 0.40), (0.40, 0.45), (0.45, 0.50), (0.50, 0.55), (0.55, 0.60),
                                           (0.60, 0.65), (0.65, 0.70))
# MSFM weights w_k (Eq. 4): high-sparsity outputs drift furthest from the dense stream, so they weigh more.
MIXER_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.1, 0.1, 0.2, 0.2, 0.2)


@dataclass
class EPTSConfig:
    """The hyper-parameters of an EPTS run; defaults follow the paper and the authors' code."""

    groups: tuple[tuple[float, float], ...] = GROUPS
    mixer: tuple[float, ...] = MIXER_WEIGHTS
    rank: int = 8                               # LoRA rank r of every adapter pair (B_k, A_k)
    epochs: int = 10
    lr: float = 1e-3                            # Adam, cosine-annealed to 0 over epochs x steps
    batch_size: int = 1
    low_check_sparsity: float | None = 0.3      # where the low-group check compares adapter vs. mask only
    seed: int = 0
    fixed_sparsity: float | str | None = None   # train at this one sparsity or N:M (dedicated baseline)
    nm_train: str | None = None                 # "N:M": also train the group of N/M on N:M masks (not in the paper)
    # The tuned recipe (`recipe_config("tuned")`, not in the paper; RESULTS.md measures every switch alone):
    group0_input: str = "mix"                   # "dense": group 0's Phase-1 slice sees X_dense, the stream it serves
    stop_chain_grad: bool = False               # groups >= 1 use sg(B_0 A_0): B_0 learns from group 0's loss only
    group0_ramp: bool = False                   # B_0 A_0 scaled by s / hi_0 inside group 0 (tuned_slices)
    low_gain: str = "check"                     # "fit": a fitted gain in [0, 1] (fit_low_gain), not on/off
    recipe: str = "paper"


RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "tuned": dict(group0_input="dense", stop_chain_grad=True, group0_ramp=True, low_gain="fit", rank=32),
}


def recipe_config(recipe: str = "paper", **overrides) -> EPTSConfig:
    """The config of a named recipe: "paper" (the defaults) or "tuned"; keyword arguments override fields."""
    return EPTSConfig(**{**RECIPES[recipe], "recipe": recipe, **overrides})


# 1. Architecture map: which modules are the decoder blocks, which linears get pruned --------------------------

# model_type -> (attribute path of the decoder blocks, the linears of one block that get pruned).
# Embeddings, norms and lm_head are never pruned. To support another decoder-only family, add a row here.
ARCHS: dict[str, tuple[str, tuple[str, ...]]] = {
    "opt": ("model.decoder.layers",
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2")),
    "llama": ("model.layers",
              ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
}


def arch_of(model: nn.Module) -> tuple[str, tuple[str, ...]]:
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in ARCHS:
        raise EPTSError(f"unsupported architecture '{model_type}'; supported: {', '.join(sorted(ARCHS))}. "
                        "To add one, put its decoder-block path and linear names in ARCHS in epts.py")
    return ARCHS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(arch_of(model)[0])


def pruned_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every pruned linear, keyed "<block index>.<name in block>" (e.g. "3.self_attn.q_proj")."""
    names = arch_of(model)[1]
    return {f"{i}.{n}": block.get_submodule(n) for i, block in enumerate(decoder_blocks(model)) for n in names}


def block_of(key: str) -> int:
    return int(key.split(".", 1)[0])


def swap_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` at the dotted path `name` inside `root` (get_submodule("") is root itself)."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent), child, new)


# 2. Masks (Eq. 1): Wanda score, ranked once per row, so the masks at all sparsities are nested ----------------

def wanda_scores(weight: torch.Tensor, act_norm: torch.Tensor) -> torch.Tensor:
    """Eq. 1: S_ij = |W_ij| * ||X_j||_2, with ||X_j||_2 the L2 norm of input feature j over calibration tokens."""
    return weight.abs().float() * act_norm.float().view(1, -1)


def row_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every weight inside its output row: 0 = lowest score, ties broken by column (stable sort). One
    ranking per layer yields the mask at any sparsity, and makes the masks nested by construction."""
    order = torch.argsort(scores, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return ranks.to(torch.int16 if scores.shape[1] < 2 ** 15 else torch.int32)  # a quarter of int64's memory


def prune_count(sparsity: float | torch.Tensor, in_features: int) -> int | torch.Tensor:
    """Weights removed per row: floor(s * in). The 1e-6 guards against 0.29 * 100 = 28.999999999999996."""
    if isinstance(sparsity, torch.Tensor):
        return torch.floor(sparsity.double() * in_features + 1e-6).long()
    return math.floor(sparsity * in_features + 1e-6)


def nm_ranks(scores: torch.Tensor, m: int) -> torch.Tensor:
    """Ranks for N:M masks (GPU sparse tensor cores): mask_from_ranks(nm_ranks(S, M), N / M) drops the N
    lowest-scoring weights of every M consecutive inputs of a row, nested in N. Rank j inside its group becomes
    j * in/M + the group's index, so a row's lowest N * in/M ranks are exactly the N lowest of every group."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise EPTSError(f"an N:M pattern with M = {m} needs input sizes divisible by {m}, got {in_f}")
    within = row_ranks(scores.reshape(-1, m)).long().view(out_f, in_f // m, m)
    ranks = within * (in_f // m) + torch.arange(in_f // m, device=scores.device).view(1, -1, 1)
    return ranks.view(out_f, in_f).to(torch.int16 if in_f < 2 ** 15 else torch.int32)


def mask_from_ranks(ranks: torch.Tensor, sparsity: float | torch.Tensor) -> torch.Tensor:
    """M(s): keep the weights whose row rank is >= floor(s * in), i.e. drop each row's lowest-scoring ones.
    ranks [out, in]; one sparsity -> [out, in]; a tensor of G sparsities -> G masks [G, out, in]."""
    n = prune_count(sparsity, ranks.shape[-1])
    return ranks >= (n.view(-1, 1, 1) if isinstance(n, torch.Tensor) else n)


def pattern(sparsity: float | str) -> tuple[float, int | None]:
    """A sparsity as (fraction pruned, M): 0.5 -> (0.5, None) unstructured; "2:4" -> (0.5, 4), N of every M."""
    if isinstance(sparsity, str):
        n, _, m = sparsity.partition(":")
        if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
            raise EPTSError(f"a sparsity pattern is a number or N:M with 0 < N < M (e.g. 2:4), got '{sparsity}'")
        return int(n) / int(m), int(m)
    return float(sparsity), None


def ranks_for(scores: torch.Tensor, sparsity: float | str | None) -> torch.Tensor:
    m = pattern(sparsity)[1] if sparsity is not None else None
    return row_ranks(scores) if m is None else nm_ranks(scores, m)


def snapshot_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of every pruned linear's dense weight: deploy and every baseline start from these."""
    return {k: lin.weight.detach().to("cpu", copy=True) for k, lin in pruned_linears(model).items()}


# 3. MS-HiLoRA (Eq. 2): W_s = (W + sum_{j<=k} B_j A_j) * M(s) for s in group k ---------------------------------

NO_ADAPTER = -1  # a "group" index meaning: the mask alone, no adapter (dense s = 0, or a switched-off group 0)


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


def chained_delta(A: torch.Tensor, B: torch.Tensor, chain: torch.Tensor, frozen: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """sum_j c_gj B_j A_j for G slices at once -> [G, out, in], as one matmul [c_g0 B_0 .. c_g(K-1) B_(K-1)] @
    [A_0; ..; A_(K-1)]. A [K, r, in], B [K, out, r], chain [G, K] (slices_of). frozen [G, K] (tuned recipe only):
    the terms that pass no gradient to B_j, sg(B_j)."""
    K, out_f, r = B.shape
    B_k = B.permute(1, 0, 2).unsqueeze(0)                                                    # [1, out, K, r]
    if frozen is not None:
        B_k = torch.where(frozen.view(-1, 1, K, 1), B_k.detach(), B_k)
    return (B_k * chain.view(-1, 1, K, 1)).reshape(-1, out_f, K * r) @ A.reshape(K * r, -1)


def elastic_weight(weight: torch.Tensor, ranks: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                   sparsity: torch.Tensor, chain: torch.Tensor, frozen: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 2 for G slices at once -> [G, out, in]:

        W_g = (W + sum_{j<=group_g} B_j A_j) * M(sparsity_g)

    weight [out, in], ranks [out, in] or [G, out, in], sparsity [G], chain [G, K] (slices_of). The sum
    over j <= k is the inheritance chain: a group reuses the adapters of every lower group and adds its own.
    Masking the delta keeps W_g exactly as sparse as M(s)."""
    delta = chained_delta(A, B, chain, frozen)
    return ((weight + delta) * mask_from_ranks(ranks, sparsity)).to(delta.dtype)  # bf16 under autocast: the bmm's


@dataclass
class Slices:
    """G slices of one block call, as data: slice g runs every pruned linear with its own W_g (elastic_weight)."""

    sparsity: torch.Tensor                     # [G] float64
    group: torch.Tensor                        # [G] long; NO_ADAPTER: the mask alone
    chain: torch.Tensor                        # [G, K] coefficients of B_j A_j
    nm: torch.Tensor | None = None             # [G] bool: the N:M mask instead (cfg.nm_train's extra slice)
    frozen: torch.Tensor | None = None         # [G, K] bool: sg(B_j) in slice g (tuned recipe)
    dense_input: tuple[bool, ...] | None = None  # slice g reads X_dense instead of X_mix (tuned recipe)

    def __len__(self) -> int:
        return len(self.sparsity)

    def __getitem__(self, g: int | slice) -> Slices:  # slice g alone, or the slices a Python slice picks
        g = g if isinstance(g, slice) else slice(g, g + 1)
        return Slices(**{k: None if v is None else v[g] for k, v in vars(self).items()})


def slices_of(sparsity: torch.Tensor, group: torch.Tensor, n_groups: int, nm: torch.Tensor | None = None) -> Slices:
    """The paper's slices: slice g at sparsity[g] with the inheritance chain of Eq. 2 as data, c_gj = 1 if
    adapter j is in slice g's sum (j <= group[g]), else 0. A row of zeros (NO_ADAPTER) is the mask alone."""
    chain = (torch.arange(n_groups, device=group.device).view(1, -1) <= group.view(-1, 1)).float()
    return Slices(sparsity, group, chain, nm)


class HiLoRALinear(nn.Module):
    """A frozen linear layer with K chained LoRA pairs and a nested Wanda mask (MS-HiLoRA). For the G slices in
    `.slices`, the input's leading batch dimension is split into G equal parts and part g is multiplied by W_g
    (Eq. 2). `weight_fn` computes W_g: elastic_weight, or a runtime's tested-equal faster version of it."""

    def __init__(self, base: nn.Linear, ranks: torch.Tensor, n_groups: int, rank: int,
                 generator: torch.Generator | None = None, nm_ranks: torch.Tensor | None = None,
                 weight_fn: Callable = elastic_weight):
        super().__init__()
        self.base = base  # kept so the block can be restored; its parameters stay frozen
        out_f, in_f = base.weight.shape
        self.register_buffer("ranks", ranks, persistent=False)
        self.register_buffer("nm_ranks", nm_ranks, persistent=False)  # N:M ranks for cfg.nm_train's slice
        A = torch.empty(n_groups, rank, in_f)
        for k in range(n_groups):  # Kaiming-uniform(a=sqrt(5)) per A_k, as LoRA; fan_in is in_f
            nn.init.kaiming_uniform_(A[k], a=math.sqrt(5), generator=generator)
        self.A = nn.Parameter(A.to(base.weight.device))
        self.B = nn.Parameter(torch.zeros(n_groups, out_f, rank, device=base.weight.device))  # B = 0: no-op at init
        self.weight_fn, self.slices = weight_fn, None  # set by the caller before every forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sl = self.slices
        ranks = self.ranks if sl.nm is None else torch.where(sl.nm.view(-1, 1, 1), self.nm_ranks, self.ranks)
        W = self.weight_fn(self.base.weight, ranks, self.A, self.B, sl.sparsity, sl.chain, sl.frozen)
        G, (out_f, in_f) = W.shape[0], self.base.weight.shape
        y = torch.bmm(x.reshape(G, -1, in_f), W.transpose(1, 2))  # slice g of the batch times W_g^T
        if self.base.bias is not None:
            y = y + self.base.bias
        return y.reshape(*x.shape[:-1], out_f)


def attach_hilora(block: nn.Module, names: Sequence[str], norms: dict[str, torch.Tensor], cfg: EPTSConfig,
                  generator: torch.Generator, weight_fn: Callable = elastic_weight) -> dict[str, HiLoRALinear]:
    """Replace each pruned linear of `block` by a HiLoRALinear; its masks rank the dense Wanda scores (Eq. 1).
    A dedicated run (cfg.fixed_sparsity N:M) ranks N:M; cfg.nm_train adds N:M ranks for its extra slice."""
    layers = {}
    for n in names:
        base = block.get_submodule(n)
        scores = wanda_scores(base.weight, norms[n])
        extra = None if cfg.nm_train is None else nm_ranks(scores, pattern(cfg.nm_train)[1])
        layers[n] = HiLoRALinear(base, ranks_for(scores, cfg.fixed_sparsity), len(cfg.groups), cfg.rank, generator,
                                 extra, weight_fn)
        swap_module(block, n, layers[n])
    return layers


# 4. Objective (Eq. 3): block reconstruction, guided by the lowest-sparsity output -----------------------------

def recon_loss(P: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """l(P, T) = ((P - T)^2).sum(over tokens).mean() -- the authors' scale. P, T: [..., batch, tokens, hidden];
    the result keeps the leading dims (one loss per group when stacked)."""
    return (P.float() - T.float()).pow(2).sum(dim=-2).mean(dim=(-2, -1))


def phase1_objective(outputs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 3 over the K group outputs O_k = f(X_mix; W_{s_k}) stacked as [K, batch, tokens, hidden]:

        L_0 = l(O_0, Y),   L_k = 1/2 l(O_k, sg(O_0)) + 1/2 l(O_k, Y)  for k >= 1,   loss = sum_k L_k

    sg is stop-gradient: the lowest-sparsity output guides the others without being pulled towards them.
    Returns (loss, per-group losses detached)."""
    to_target = recon_loss(outputs, target.unsqueeze(0))
    to_guide = recon_loss(outputs[1:], outputs[:1].detach())
    per_group = torch.cat([to_target[:1], 0.5 * to_guide + 0.5 * to_target[1:]])
    return per_group.sum(), per_group.detach()


# 5. MSFM (Eq. 4): the next block learns from a mix of this block's outputs at several sparsities --------------

def mix_features(outputs: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Eq. 4: X_mix = sum_k w_k * O_k, outputs stacked as [K, ...]."""
    w = torch.tensor(weights, dtype=outputs.dtype, device=outputs.device)
    return torch.tensordot(w, outputs, dims=1)


# 6. Calling one block: capture what block 0 is called with, then call any block on any stream -----------------

def device_of(block: nn.Module) -> torch.device:
    """Where the block computes; its streams may live elsewhere (host memory, Runtime.low_memory)."""
    return next(block.parameters()).device


def empty_stream_like(X: torch.Tensor) -> torch.Tensor:
    """An empty stream where X lives: on its device, or in pinned host memory if X is pinned (fast copies)."""
    return torch.empty(X.shape, dtype=X.dtype, device=X.device, pin_memory=X.is_pinned())


def blocks_on(model: nn.Module, device: torch.device, start: int = 0):
    """Yield (index, block) for blocks >= start, each moved to `device` in fp32 while it is worked on and moved
    back to where (and in the dtype) it was loaded afterwards: only one block is on the accelerator at a time."""
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
def capture_block_inputs(model: nn.Module, windows: torch.Tensor, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, dict]:
    """Run the model (where it is) up to block 0 for every window -> (hidden states [N, seqlen, hidden], block 0's
    keyword arguments: attention mask, `position_embeddings`, ... whatever the installed transformers passes),
    both on `device` in `dtype`. Captured with batch 1, the kwargs broadcast over any batch."""
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
    cast = lambda t: t.to(device, dtype if t.is_floating_point() else None) if torch.is_tensor(t) else t  # noqa: E731
    return torch.cat(hidden), torch.utils._pytree.tree_map(cast, kwargs)


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder block with captured kwargs on its device; older transformers return a tuple, 5.x a tensor."""
    out = block(x.to(device_of(block), non_blocking=True), **kwargs)
    return out[0] if isinstance(out, tuple) else out


def in_chunks(X: torch.Tensor, chunk: int) -> list[slice]:
    """Slices of `chunk` samples along X's first dimension: no-grad passes over a stream in bounded memory."""
    return [slice(i, i + chunk) for i in range(0, len(X), chunk)]


@torch.no_grad()
def block_forward(block: nn.Module, X: torch.Tensor, kwargs: dict, chunk: int) -> torch.Tensor:
    """f(X) for every sample of a stream, `chunk` samples at a time."""
    Y = empty_stream_like(X)
    for sl in in_chunks(X, chunk):
        Y[sl] = call_block(block, X[sl], kwargs)
    return Y


def forward_groups(block: nn.Module, layers: dict[str, HiLoRALinear], x: torch.Tensor, kwargs: dict,
                   slices: Slices, x_dense: torch.Tensor | None = None) -> torch.Tensor:
    """O_g = f(x; W_g) for the G slices -> [G, *x.shape], one block call per slice (a slice with dense_input
    reads x_dense instead: the tuned recipe's group 0)."""
    outs = []
    for g in range(len(slices)):
        for layer in layers.values():
            layer.slices = slices[g]
        reads_dense = slices.dense_input is not None and slices.dense_input[g]
        outs.append(call_block(block, x_dense if reads_dense else x, kwargs))
    return torch.stack(outs)


def sum_of_squares(x: torch.Tensor) -> torch.Tensor:
    """Per input feature sum_t x_tj^2 over the tokens of a batch: ||X_j||_2^2 accumulates it (Wanda)."""
    return x.pow(2).sum(0)


@torch.no_grad()
def block_outputs_and_stats(block: nn.Module, names: Sequence[str], X: torch.Tensor, kwargs: dict, chunk: int,
                            stat=sum_of_squares) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """f(X) for every sample, and stat(inputs) of every pruned linear, summed over all calibration tokens."""
    acc: dict[str, Any] = {n: 0.0 for n in names}
    name_of = {block.get_submodule(n): n for n in names}

    def hook(module, args):
        x, n = args[0].detach().float(), name_of[module]
        acc[n] = acc[n] + stat(x.reshape(-1, x.shape[-1]))

    handles = [module.register_forward_pre_hook(hook) for module in name_of]
    try:
        Y = block_forward(block, X, kwargs, chunk)
    finally:
        for h in handles:
            h.remove()
    return Y, acc


def dense_targets_and_norms(block: nn.Module, names: Sequence[str], X: torch.Tensor, kwargs: dict,
                            chunk: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Y = f(X; W) for the dense block, and ||X_j||_2 of the inputs of every pruned linear (Wanda's statistic)."""
    Y, sq = block_outputs_and_stats(block, names, X, kwargs, chunk, sum_of_squares)
    return Y, {n: v.sqrt() for n, v in sq.items()}


# 7. The two-phase block loop: Phase 1 (adapters), low-group check, Phase 2 (mixed features), block by block ---

def draw_sparsities(cfg: EPTSConfig, steps: int, generator: torch.Generator) -> torch.Tensor:
    """s_k for `steps` steps and every group k -> float64 [steps, K], stratified: group k = (lo, hi] is cut into
    `steps` equal sub-intervals and each step draws uniformly inside another one, in random order (one step, as in
    Phase 2: one uniform draw per group). A dedicated run (cfg.fixed_sparsity) always uses its one sparsity."""
    if cfg.fixed_sparsity is not None:
        return torch.full((steps, len(cfg.groups)), pattern(cfg.fixed_sparsity)[0], dtype=torch.float64)
    cols = []
    for lo, hi in cfg.groups:
        slot = torch.randperm(steps, generator=generator).double()  # randperm(1) draws no random number
        u = torch.rand(steps, generator=generator, dtype=torch.float64)
        cols.append(hi - (slot + u) / steps * (hi - lo))  # in (lo, hi]
    return torch.stack(cols, dim=1)


def phase1_groups(cfg: EPTSConfig, steps: int, generator: torch.Generator, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The slices of every Phase-1 step: (group [G], sparsity [steps, G], N:M flag [G] or None). The paper: one
    slice per group k at its drawn s_k. cfg.nm_train = "N:M" (not in the paper) adds a slice training the group
    holding N/M on the N:M mask at exactly N/M, for deployment at N:M."""
    groups, draws = torch.arange(len(cfg.groups)), draw_sparsities(cfg, steps, generator)
    if cfg.nm_train is None:
        return groups.to(device), draws.to(device), None
    s = pattern(cfg.nm_train)[0]
    groups = torch.cat([groups, torch.tensor([group_of(s, cfg.groups)])])
    draws = torch.cat([draws, torch.full((steps, 1), s, dtype=torch.float64)], dim=1)
    return groups.to(device), draws.to(device), (torch.arange(len(groups)) == len(groups) - 1).to(device)


def tuned_slices(sl: Slices, top0: float, ramp: bool = False, gamma: float = 1.0, stop_chain_grad: bool = False,
                 group0_dense: bool = False) -> Slices:
    """The tuned recipe (not in the paper), as one step on the paper's slices; with the defaults it changes
    nothing. ramp, gamma: in the slices of group 0 (only), B_0 A_0 is scaled by

        g(s) = gamma * s / hi_0  (ramp)   or   gamma,      gamma = the block's gain (0/1: the check; fit_low_gain)

    The ramp lets the correction fade with the weights removed (s -> 0: the dense model); gamma 0 is the mask
    alone, also the paper's switched-off adapter. stop_chain_grad: slices of groups >= 1 use sg(B_0).
    group0_dense: group 0's Phase-1 slice reads X_dense, the stream it serves at deploy."""
    if ramp or gamma != 1.0:
        g = gamma * (sl.sparsity / top0 if ramp else torch.ones_like(sl.sparsity))
        g = torch.where(sl.group == 0, g, torch.ones_like(g)).float()
        sl = replace(sl, chain=torch.cat([sl.chain[:, :1] * g.view(-1, 1), sl.chain[:, 1:]], dim=1))
    if stop_chain_grad:
        first = torch.arange(sl.chain.shape[1], device=sl.group.device) == 0
        sl = replace(sl, frozen=first.view(1, -1) & (sl.group.view(-1, 1) > 0))
    if group0_dense:
        sl = replace(sl, dense_input=tuple(g == 0 for g in range(len(sl))))  # group 0 is slice 0
    return sl


def cosine_lr(step: int, total: int, base: float) -> float:
    """lr_t = base * (1 + cos(pi * t / T)) / 2: cosine annealing from `base` to 0 over T steps."""
    return base * (1 + math.cos(math.pi * step / total)) / 2


class PlainRuntime:
    """How the loop runs on the hardware: the plain paths, one slice at a time, as the paper reads. The harness's
    Runtime (below the banner) replaces each hook with a faster one tested equal to it, or with what its comment
    says (checks, progress, timing, checkpoints); the method never names it. None of this is a hyper-parameter."""

    infer_chunk = 8  # samples per no-grad block call (targets, check, Phase 2)
    dense_targets = staticmethod(dense_targets_and_norms)
    weight_fn = staticmethod(elastic_weight)
    forward_groups = staticmethod(forward_groups)
    blocks = staticmethod(blocks_on)                                   # a progress bar
    autocast = staticmethod(lambda device: contextlib.nullcontext())   # bf16 on CUDA
    compile_step = staticmethod(lambda step, *args: step)              # a CUDA graph
    epoch_done = staticmethod(lambda mean, *args: mean.tolist())       # a finite check, progress
    start = lap = block_done = staticmethod(lambda *args: None)  # checks; seconds per stage; a checkpoint per block

    def phase1_backward(self, block, layers, x, y, kwargs, slices, x_dense=None) -> torch.Tensor:
        """Eq. 3's loss of one step, backward; returns the per-group losses."""
        loss, per_group = phase1_objective(self.forward_groups(block, layers, x, kwargs, slices, x_dense), y)
        loss.backward()
        return per_group

    def restore(self, model, windows, cfg, state, X_dense):  # host streams, resume a checkpoint
        return 0, state, X_dense, X_dense.clone()  # block 0: both streams are the embeddings' output


def phase1_train(block: nn.Module, layers: dict[str, HiLoRALinear], X_mix: torch.Tensor, Y: torch.Tensor,
                 kwargs: dict, cfg: EPTSConfig, generator: torch.Generator, runtime: PlainRuntime | None = None,
                 block_index: int = 0, X_dense: torch.Tensor | None = None) -> list[list[float]]:
    """Phase 1: learn all adapters of one block with Eq. 3 on the mixed stream X_mix against dense targets Y. Every
    step draws s_k in each group k, runs O_k = f(X_mix; W_{s_k}) for all groups, sums the guided losses and takes
    one Adam step at the cosine-annealed rate -> mean loss per group, per epoch. X_dense: the tuned group 0's input."""
    rt, device = runtime or PlainRuntime(), device_of(block)
    streams = [S for S in (X_mix, Y, X_dense) if S is not None]
    batches = in_chunks(X_mix, cfg.batch_size)
    total = cfg.epochs * len(batches)
    groups, draws, nm = phase1_groups(cfg, total, generator, device)  # s_k for every step, drawn up front
    opt = torch.optim.Adam([p for l in layers.values() for p in (l.A, l.B)], lr=cfg.lr, fused=device.type == "cuda")

    def step(s: torch.Tensor, lr: float | torch.Tensor, x: torch.Tensor, y: torch.Tensor, x_dense=None):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        slices = tuned_slices(slices_of(s, groups, len(cfg.groups), nm), cfg.groups[0][1], cfg.group0_ramp, 1.0,
                              cfg.stop_chain_grad, cfg.group0_input == "dense")  # the tuned recipe's switches last
        per_group = rt.phase1_backward(block, layers, x, y, kwargs, slices, x_dense)
        opt.step()
        return per_group

    step = rt.compile_step(step, opt, streams, draws, cfg.batch_size)
    history = []
    for epoch in range(cfg.epochs):
        epoch_loss = torch.zeros(len(groups), device=device)
        for t, batch in enumerate(batches, start=epoch * len(batches)):
            epoch_loss += step(draws[t], cosine_lr(t, total, cfg.lr), *(S[batch].to(device) for S in streams))
        history.append(rt.epoch_done(epoch_loss / len(batches), block_index, epoch))  # one host sync per epoch
    return history


@torch.no_grad()
def stream_loss(block: nn.Module, layers: dict[str, HiLoRALinear], X: torch.Tensor, Y: torch.Tensor, kwargs: dict,
                slices: Slices, runtime: PlainRuntime | None = None) -> torch.Tensor:
    """l(f(X; W_g), Y) over a whole stream for the G slices, a chunk of samples at a time -> float64 [G]."""
    rt, loss = runtime or PlainRuntime(), torch.zeros(len(slices), dtype=torch.float64, device=slices.sparsity.device)
    for sl in in_chunks(X, rt.infer_chunk):
        out = rt.forward_groups(block, layers, X[sl], kwargs, slices)
        loss += recon_loss(out, Y[sl].to(out.device).unsqueeze(0)).double() * len(out[0])  # a mean over samples
    return loss / len(X)


@torch.no_grad()
def low_group_check(block: nn.Module, layers: dict[str, HiLoRALinear], X_dense: torch.Tensor, Y: torch.Tensor,
                    kwargs: dict, cfg: EPTSConfig, runtime: PlainRuntime | None = None
                    ) -> tuple[bool, dict[str, float]]:
    """Keep the group-0 adapter only if it lowers l(f(X_dense; W_s), Y) at s = 0.3 compared to the mask alone."""
    if cfg.low_check_sparsity is None:
        return True, {}
    s = torch.full((2,), cfg.low_check_sparsity, dtype=torch.float64, device=device_of(block))
    slices = slices_of(s, torch.tensor([0, NO_ADAPTER], device=s.device), len(cfg.groups))  # adapter 0 / mask only
    with_adapter, mask_only = stream_loss(block, layers, X_dense, Y, kwargs, slices, runtime).tolist()
    return with_adapter < mask_only, {"with_adapter": with_adapter, "mask_only": mask_only}


@torch.no_grad()
def fit_low_gain(block: nn.Module, layers: dict[str, HiLoRALinear], X_dense: torch.Tensor, Y: torch.Tensor,
                 kwargs: dict, cfg: EPTSConfig, runtime: PlainRuntime | None = None, gammas: int = 5,
                 points: int = 4) -> tuple[float, dict[str, list[float]]]:
    """Tuned recipe, in place of the on/off check: the block's gain gamma on B_0 A_0 in group 0 (tuned_slices),

        gamma = argmin_{gamma in {0, 1/4, .., 1}}  sum_s  l(f(X_dense; W_s(gamma)), Y) / l(f(X_dense; W * M(s)), Y)

    over s = hi_0/4, 2 hi_0/4, .., hi_0 (relative losses, so low sparsities count as much as high ones);
    gamma = 0 is the mask alone, so the block's fitted loss is never above the mask's."""
    dev, top0 = device_of(block), cfg.groups[0][1]
    s = torch.arange(1, points + 1, dtype=torch.float64, device=dev) * top0 / points
    paper = slices_of(s, torch.zeros(points, dtype=torch.long, device=dev), len(cfg.groups))
    loss = torch.stack([stream_loss(block, layers, X_dense, Y, kwargs,
                                    tuned_slices(paper, top0, cfg.group0_ramp, gamma), runtime)
                        for gamma in torch.linspace(0, 1, gammas).tolist()])  # [gammas, points]
    relative = (loss / loss[:1]).sum(1)
    return int(relative.argmin()) / (gammas - 1), {"relative_loss": relative.tolist(), "mask_only": loss[0].tolist()}


@torch.no_grad()
def phase2_mix(block: nn.Module, layers: dict[str, HiLoRALinear], X_mix: torch.Tensor, kwargs: dict,
               cfg: EPTSConfig, generator: torch.Generator, low_gain: float = 1.0,
               runtime: PlainRuntime | None = None) -> tuple[torch.Tensor, list[float]]:
    """Phase 2 (MSFM): draw one s_k per group, X_mix <- sum_k w_k f(X_mix; W_{s_k}) (Eq. 4). low_gain: group 0's
    adapter as deploy will use it: 1 kept, 0 switched off by the check (the mask alone), the fitted gain (tuned)."""
    rt = runtime or PlainRuntime()
    s = draw_sparsities(cfg, 1, generator)[0].to(device_of(block))
    group = torch.arange(len(cfg.groups), device=s.device)
    slices = tuned_slices(slices_of(s, group, len(cfg.groups)), cfg.groups[0][1], cfg.group0_ramp, low_gain)
    mixed = empty_stream_like(X_mix)
    for sl in in_chunks(X_mix, rt.infer_chunk):
        outputs = rt.forward_groups(block, layers, X_mix[sl], kwargs, slices)
        mixed[sl] = mix_features(outputs.float(), cfg.mixer).to(X_mix.dtype)
    return mixed, s.tolist()


@dataclass
class BlockReport:
    """What happened while optimizing one block (kept in the elastic state, shown by the CLI)."""

    loss_history: list[list[float]] = field(default_factory=list)  # per epoch, mean Phase-1 loss per group
    low_group_enabled: bool = True
    low_check: dict[str, Any] = field(default_factory=dict)        # l at s=0.3: with / without adapter
    low_gain: float = 1.0            # B_0 A_0's scale in group 0 as deploy uses it: the check's 1 / 0, or fitted
    mix_sparsities: list[float] = field(default_factory=list)      # the s_k Phase 2 drew
    seconds: dict[str, float] = field(default_factory=dict)        # wall time of each stage


@dataclass
class ElasticState:
    """The elastic model minus its base weights: everything needed to deploy at any sparsity. adapters[key] =
    (A [K, r, in], B [K, out, r]), act_norms[key] = ||X_j||_2 [in] of the dense inputs, key "<block>.<linear>";
    the masks are re-derived from the base weights and the norms."""

    groups: list[tuple[float, float]]
    mixer: list[float]
    rank: int
    base_model: str = ""
    fingerprint: dict = field(default_factory=dict)
    base_dtype: str = ""  # harness: the base weights' dtype during optimize (masks are ranked on these values)
    group0_ramp: bool = False  # tuned recipe: B_0 A_0 scaled by s / hi_0 inside group 0
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    act_norms: dict[str, torch.Tensor] = field(default_factory=dict)
    group0_gains: list[float] = field(default_factory=list)  # block i's BlockReport.low_gain
    reports: list[BlockReport] = field(default_factory=list)

    @property
    def low_group_enabled(self) -> list[bool]:
        return [g > 0 for g in self.group0_gains]


def optimize_block(block: nn.Module, names: Sequence[str], X_dense: torch.Tensor, X_mix: torch.Tensor,
                   kwargs: dict, cfg: EPTSConfig, block_index: int, runtime: PlainRuntime | None = None
                   ) -> tuple[dict, dict, BlockReport, torch.Tensor, torch.Tensor]:
    """Both phases for one block (on the compute device, in fp32) -> (adapters, act_norms, report,
    next X_dense = f(X_dense; W), next X_mix = sum_k w_k f(X_mix; W_{s_k}))."""
    rt, report = runtime or PlainRuntime(), BlockReport()
    # A generator per block: the result of block i does not depend on how blocks < i were run (resume).
    generator = torch.Generator().manual_seed(cfg.seed * 100_003 + block_index)
    Y, norms = rt.dense_targets(block, names, X_dense, kwargs, rt.infer_chunk)
    rt.lap(report, "targets")
    trainable = {p: p.requires_grad for p in block.parameters()}
    block.requires_grad_(False)  # only the adapters learn; norms, biases and base weights stay frozen
    layers = attach_hilora(block, names, norms, cfg, generator, rt.weight_fn)
    try:
        report.loss_history = phase1_train(block, layers, X_mix, Y, kwargs, cfg, generator, rt, block_index,
                                           X_dense if cfg.group0_input == "dense" else None)
        rt.lap(report, "phase1")
        with rt.autocast(device_of(block)):  # the elastic no-grad passes in Phase 1's precision
            if cfg.low_gain == "fit":  # the tuned recipe: a fitted gain instead of the on/off check
                report.low_gain, report.low_check = fit_low_gain(block, layers, X_dense, Y, kwargs, cfg, rt)
            else:
                kept, report.low_check = low_group_check(block, layers, X_dense, Y, kwargs, cfg, rt)
                report.low_gain = float(kept)
            report.low_group_enabled = report.low_gain > 0
            rt.lap(report, "low_check")
            X_mix, report.mix_sparsities = phase2_mix(block, layers, X_mix, kwargs, cfg, generator, report.low_gain, rt)
        rt.lap(report, "phase2")
        adapters = {n: (l.A.detach().float().cpu(), l.B.detach().float().cpu()) for n, l in layers.items()}
    finally:
        for n, layer in layers.items():  # the original linears back
            swap_module(block, n, layer.base)
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    return adapters, {n: v.cpu() for n, v in norms.items()}, report, Y, X_mix


def optimize(model: nn.Module, windows: torch.Tensor, cfg: EPTSConfig, device: str | torch.device = "cpu",
             base_model: str = "", runtime: PlainRuntime | None = None) -> ElasticState:
    """EPTS: capture block 0's inputs, then for every block run Phase 1, the low-group check and Phase 2. Only
    the current block is moved to `device` (in fp32). runtime: how it runs (PlainRuntime: the plain paths)."""
    rt, device = runtime or PlainRuntime(), torch.device(device)
    rt.start(model, windows, cfg, device)
    _, names = arch_of(model)
    model.eval()
    X_dense, kwargs = capture_block_inputs(model, windows, device)
    state = ElasticState(groups=[tuple(g) for g in cfg.groups], mixer=list(cfg.mixer), rank=cfg.rank,
                         base_model=base_model, group0_ramp=cfg.group0_ramp)
    start, state, X_dense, X_mix = rt.restore(model, windows, cfg, state, X_dense)
    for i, block in rt.blocks(model, device, start):
        adapters, norms, report, X_dense, X_mix = optimize_block(block, names, X_dense, X_mix, kwargs, cfg, i, rt)
        state.adapters.update({f"{i}.{n}": v for n, v in adapters.items()})
        state.act_norms.update({f"{i}.{n}": v for n, v in norms.items()})
        state.group0_gains.append(report.low_gain)
        state.reports.append(report)
        rt.block_done(state, cfg, i + 1, X_dense, X_mix, windows)
    return state


# 8. Deploy: one elastic state -> an ordinary transformers model at any sparsity -------------------------------

def per_block_sparsities(sparsity: float | str | Sequence[float], n_blocks: int) -> list[float | str]:
    """One sparsity for every block, from one number or N:M pattern (uniform) or a list (e.g. OWL)."""
    if isinstance(sparsity, (int, float, str)):
        return [sparsity if isinstance(sparsity, str) else float(sparsity)] * n_blocks
    sparsity = [float(s) for s in sparsity]
    if len(sparsity) != n_blocks:
        raise EPTSError(f"got {len(sparsity)} per-block sparsities for a model with {n_blocks} blocks")
    return sparsity


@torch.no_grad()
def deploy(model: nn.Module, state: ElasticState, sparsity: float | Sequence[float],
           dense: dict[str, torch.Tensor], device: str | torch.device | None = None) -> nn.Module:
    """Write W_s = (W + sum_{j<=group(s)} B_j A_j) * M(s) into every pruned linear, in place (Eq. 2). `sparsity`: a
    number, an N:M pattern ("2:4": the N:M mask of the same scores, the adapters of the group of N/M), or one number
    per block; `dense` = `snapshot_linears(model)` taken before the first deploy. The result is a plain transformers
    model with exactly floor(s * in) zeros per row; above the trained range, the mask alone (as the authors' code)."""
    per_block, K = per_block_sparsities(sparsity, len(decoder_blocks(model))), len(state.groups)
    for key, lin in pruned_linears(model).items():
        i = block_of(key)
        s = pattern(per_block[i])[0]
        k = NO_ADAPTER if s > state.groups[-1][1] else group_of(s, state.groups)
        W = dense[key].to(device or lin.weight.device, torch.float32)
        if k is not None:
            A, B = (t.to(W.device) for t in state.adapters[key])
            ranks = ranks_for(wanda_scores(W, state.act_norms[key].to(W.device)), per_block[i])
            s_k = torch.tensor([s], dtype=torch.float64, device=W.device)
            one = tuned_slices(slices_of(s_k, torch.tensor([k], device=W.device), K), state.groups[0][1],
                               state.group0_ramp, state.group0_gains[i])  # gain 0: group 0's mask alone
            W = elastic_weight(W, ranks, A, B, one.sparsity, one.chain)[0]
        lin.weight.copy_(W.to(lin.weight.dtype))
    return model


# ===== harness: nothing below changes the math =====

import argparse  # noqa: E402 - the harness's imports: the method above needs none of them
import functools  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402

from tqdm.auto import tqdm  # noqa: E402 - progress bars are the harness's

# 9. Checks, speed and plumbing: validation, runtime options, the CUDA-graph step, one block at a time ---------

def validate_config(cfg: EPTSConfig) -> None:
    """Reject hyper-parameters the method cannot run with, in one line each. The groups tile (0, hi_last] without
    gaps or overlaps: 0 = lo_0 < hi_0 = lo_1 < hi_1 = ... <= 1."""
    groups = cfg.groups
    if not groups:
        raise EPTSError("at least one sparsity group is needed")
    if groups[0][0] != 0:
        raise EPTSError(f"the first group must start at 0, got {groups[0]}")
    for k, (lo, hi) in enumerate(groups):
        if not lo < hi <= 1:
            raise EPTSError(f"group {k} = ({lo}, {hi}] is empty or above 1: groups must be contiguous and increasing")
        if k and lo != groups[k - 1][1]:
            raise EPTSError(f"groups must be contiguous and increasing: group {k - 1} ends at "
                            f"{groups[k - 1][1]} but group {k} starts at {lo}")
    if len(cfg.mixer) != len(cfg.groups):
        raise EPTSError(f"mixer has {len(cfg.mixer)} weights but there are {len(cfg.groups)} groups")
    if not all(math.isfinite(w) and w >= 0 for w in cfg.mixer) or abs(sum(cfg.mixer) - 1.0) > 1e-6:
        raise EPTSError(f"mixer weights must be non-negative and sum to 1, got {list(cfg.mixer)}")
    if cfg.rank <= 0:
        raise EPTSError(f"--rank must be positive, got {cfg.rank}")
    if cfg.epochs <= 0 or cfg.batch_size <= 0:
        raise EPTSError(f"--epochs and --batch-size must be positive, got {cfg.epochs}, {cfg.batch_size}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise EPTSError(f"--lr must be a positive number, got {cfg.lr}")
    if cfg.nm_train is not None:
        group_of(pattern(cfg.nm_train)[0], cfg.groups)  # N/M must lie in a trained group
    if cfg.group0_input not in ("mix", "dense") or cfg.low_gain not in ("check", "fit"):
        raise EPTSError(f"group0_input must be 'mix' or 'dense' and low_gain 'check' or 'fit', got "
                        f"{cfg.group0_input!r}, {cfg.low_gain!r}")
    (lo, hi), low = cfg.groups[0], cfg.low_check_sparsity
    if low is not None and not lo < low <= hi:
        raise EPTSError(f"the low-group check sparsity {low} must lie in group 0 = ({lo}, {hi}]")


def check_adapter_memory(model: nn.Module, cfg: EPTSConfig, device: torch.device) -> None:
    """Refuse a rank whose adapters cannot fit, in one line, instead of being killed for memory. Per block on
    `device`: A, B with gradients and Adam's two moments (4 copies, fp32) plus the chained B of every group in
    the forward (K x out x K*r); on the host: the elastic state of all blocks (fp32)."""
    K, r = len(cfg.groups), cfg.rank
    on_device, on_host = {}, 0
    for key, lin in pruned_linears(model).items():
        adapters = K * r * (lin.in_features + lin.out_features) * 4
        on_device[block_of(key)] = on_device.get(block_of(key), 0) + 4 * adapters + K * lin.out_features * K * r * 4
        on_host += adapters
    for need, where, name in ((max(on_device.values()), device, str(device)), (on_host, torch.device("cpu"), "host")):
        free = free_memory(where)
        if need > free:
            raise EPTSError(f"--rank {r}: the adapters need about {need / 2**30:.1f} GiB of {name} memory, but "
                            f"{free / 2**30:.1f} GiB are free; use a smaller --rank")


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` (CUDA: the driver's count; CPU: MemAvailable, or all memory if unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))
    except (OSError, StopIteration, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def measured_sparsity(model: nn.Module) -> float:
    """Fraction of exact zeros over all pruned linears."""
    lins = pruned_linears(model).values()
    return sum(int((lin.weight == 0).sum()) for lin in lins) / sum(lin.weight.numel() for lin in lins)


@dataclass
class Runtime(PlainRuntime):
    """The harness's runtime for `optimize`: the same math as PlainRuntime, faster, with checks, a progress bar
    and checkpoints. Every fast path is tested equal to the plain one it replaces (test_epts.py)."""

    amp: bool = True              # bf16 autocast for the elastic passes, not the dense targets (CUDA; fp32 on CPU)
    cuda_graph: bool = True       # on CUDA, record the Phase-1 step once and replay it (same math, less overhead)
    reference_loop: bool = False  # the plain loop, one forward per slice, instead of all slices in one batch
    infer_chunk: int = 8          # samples per no-grad forward (targets, check, Phase 2); 2 with --low-memory
    low_memory: bool = False      # streams in (pinned) host memory, Phase 1 one group at a time
    verbose: bool = False         # a progress bar
    checkpoint: str | None = None  # save the state and both streams after every block
    resume: bool = False          # continue after the checkpoint's last block: the result of a straight run
    base_model: str = ""          # the model's name, checked against a checkpoint's
    progress: Any = field(default=None, repr=False)
    clock: Any = field(default_factory=lambda: Stopwatch("cuda" if torch.cuda.is_available() else "cpu"), repr=False)

    def forward_groups(self, block, layers, x, kwargs, slices, x_dense=None) -> torch.Tensor:
        """Speed: all G slices in one block call (x repeated G times along the batch) instead of G calls.
        Attention, norms and activations act per sample, so this equals the plain loop."""
        if self.reference_loop:
            return forward_groups(block, layers, x, kwargs, slices, x_dense)
        x, G = x.to(device_of(block), non_blocking=True), len(slices)
        for layer in layers.values():
            layer.slices = slices
        inputs = [x_dense.to(x.device, non_blocking=True) if d else x for d in slices.dense_input or (False,) * G]
        return call_block(block, torch.cat(inputs), kwargs).view(G, *x.shape)

    def phase1_backward(self, block, layers, x, y, kwargs, slices, x_dense=None) -> torch.Tensor:
        """Eq. 3 under bf16 autocast on CUDA (amp). Memory: with low_memory the same gradient one group at a time,
        O_0 first and each other group guided by sg(O_0) (the detached guide's L_0 passes no gradient): one group's
        activations and masked weights in memory instead of K. Returns the losses of this process's slices (`share`)."""
        (mine, has_0), losses, guide = self.share(slices), [], None
        for part in [mine[g] for g in range(len(mine))] if self.low_memory else [mine]:
            with self.autocast(device_of(block)):
                out = Runtime.forward_groups(self, block, layers, x, kwargs, part, x_dense)  # this process's slices
                guide = self.guide(out[:1]) if guide is None else guide
                lead = has_0 and not losses  # the part that starts with slice 0: O_0 is its own guide
                loss, per_group = phase1_objective(out if lead else torch.cat([guide, out]), y)
            loss.backward()  # outside autocast, as torch recommends: the backward runs in the forward's dtypes
            losses.append(per_group if lead else per_group[1:])
        return torch.cat(losses)

    def share(self, slices: Slices) -> tuple[Slices, bool]:  # the slices this process runs; whether slice 0 is one
        return slices, True

    def guide(self, O_0: torch.Tensor) -> torch.Tensor:  # sg(O_0)
        return O_0.detach()

    def weight_fn(self, weight, ranks, A, B, sparsity, chain, frozen=None) -> torch.Tensor:
        """elastic_weight with its masked merge fused in Phase 1 on the GPU (fused_merge)."""
        from torch.utils._triton import has_triton  # torch.compile's GPU backend
        training = torch.is_grad_enabled() and B.requires_grad and B.is_cuda and torch.is_autocast_enabled()
        if not (training and has_triton() and not weight.requires_grad):
            return elastic_weight(weight, ranks, A, B, sparsity, chain, frozen)
        n = prune_count(sparsity, ranks.shape[-1]).view(-1, 1, 1)  # mask_from_ranks(ranks, s) = ranks >= n
        return fused_merge()(weight.detach(), chained_delta(A, B, chain, frozen), ranks, n)

    def compile_step(self, step, opt, streams, draws, batch_size) -> Callable:
        return maybe_cuda_graph(step, opt, self, streams, draws, batch_size)

    def autocast(self, device: torch.device) -> torch.autocast:
        """bf16 autocast of the elastic passes (Phase 1, the low-group check, Phase 2) on CUDA with amp; the dense
        targets stay fp32, so the reference every block is fitted to is exact. A no-op on the CPU."""
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp and device.type == "cuda")

    def start(self, model, windows, cfg, device) -> None:
        """What optimize checks before any work: the config, the window length, and the adapters' memory."""
        validate_config(cfg)
        max_pos = getattr(model.config, "max_position_embeddings", None)
        if max_pos is not None and windows.shape[-1] > max_pos:
            raise EPTSError(f"windows of {windows.shape[-1]} tokens are longer than the model's "
                            f"max_position_embeddings {max_pos}")
        check_adapter_memory(model, cfg, device)
        self.epochs, self.steps = cfg.epochs, cfg.epochs * math.ceil(len(windows) / cfg.batch_size)  # per block
        self.clock = Stopwatch(device)

    def restore(self, model, windows, cfg, state, X_dense):
        """A --resume checkpoint's state and streams; with low_memory the streams in (pinned) host memory, moved to
        the device a batch or chunk at a time (the same numbers, less device memory)."""
        state.fingerprint, state.base_dtype, start, X_mix = fingerprint(model), weight_dtype(model), 0, None
        pin, where = self.low_memory and torch.cuda.is_available(), "cpu" if self.low_memory else X_dense.device
        if self.resume and self.checkpoint and os.path.isfile(self.checkpoint):
            state, start, X_dense, X_mix = load_checkpoint(self.checkpoint, model, cfg, windows, self.base_model)
        X_dense = X_dense.to(where).pin_memory() if pin else X_dense.to(where)
        X_mix = empty_stream_like(X_dense).copy_(X_dense if X_mix is None else X_mix)  # block 0: X_mix = X_dense
        return start, state, X_dense, X_mix

    def blocks(self, model, device, start):
        with tqdm(total=self.steps * len(decoder_blocks(model)), initial=self.steps * start, desc="EPTS", unit="step",
                  disable=not self.verbose) as self.progress:
            for i, block in blocks_on(model, device, start):
                self.clock.lap()
                yield i, block
        self.progress = None

    def lap(self, report, stage: str) -> None:
        report.seconds[stage] = self.clock.lap()

    def epoch_done(self, mean, block_index, epoch) -> list[float]:
        """The epoch's losses, an error naming block and group if one is not finite; the progress bar advances."""
        losses = mean.tolist()
        bad = [k for k, v in enumerate(losses) if not math.isfinite(v)]
        if bad:
            raise EPTSError(f"Phase-1 loss became {losses[bad[0]]} in block {block_index}, group {bad[0]} "
                            f"(epoch {epoch}); try a lower --lr or --no-amp (fp32)")
        if self.progress is not None:
            self.progress.update(self.steps // self.epochs)
            self.progress.set_postfix(block=block_index, epoch=epoch, loss=f"{sum(losses):.4g}")
        return losses

    def block_done(self, state, cfg, next_block, X_dense, X_mix, windows) -> None:
        state.reports[-1].seconds["total"] = sum(state.reports[-1].seconds.values())
        if self.checkpoint:
            save_checkpoint(self.checkpoint, state, cfg, next_block, X_dense, X_mix, windows)


def plain_merge(weight: torch.Tensor, delta: torch.Tensor, ranks: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """elastic_weight's last line, (W + delta) * M with M = ranks >= n, for torch.compile."""
    return ((weight + delta) * (ranks >= n)).to(delta.dtype)


@functools.cache
def fused_merge() -> Callable:
    """Speed: at 7B the ~8 eager memory passes over [G, out, in] of a Phase-1 step's merge cost more than the
    block's matmuls; compiled once per process, it is one kernel for the forward and one for the backward. Same
    numbers: the sum is fp32, rounded once, and * M is exact (only the gradient's memory layout may differ)."""
    return torch.compile(plain_merge, dynamic=True)


class Stopwatch:
    """Wall-clock laps that wait for the GPU to finish (one sync per lap, never inside a training step)."""

    def __init__(self, device: torch.device | str):
        self.device, self.t = torch.device(device), time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t, self.t = self.t, time.perf_counter()
        return self.t - t


def maybe_cuda_graph(step: Callable, opt: torch.optim.Optimizer, runtime: Runtime, streams: Sequence[torch.Tensor],
                     draws: torch.Tensor, batch_size: int) -> Callable:
    """Record the Phase-1 `step(s, lr, *batch of every stream)` once as a CUDA graph; return a replay function.
    Speed only: a step launches hundreds of small kernels, a replay launches one graph. The graph reads its
    inputs from fixed buffers, so Adam must be capturable and its lr a tensor. The warm-up that CUDA graphs
    need runs the step at lr 0 (no weight moves) and then resets Adam's moments and step counter, so training
    is unchanged. On the CPU, with the reference loop, or with a smaller last batch the step runs eagerly."""
    if not (runtime.cuda_graph and draws.device.type == "cuda" and not runtime.reference_loop
            and len(streams[0]) % batch_size == 0):
        return step
    batch, s = [S[:batch_size].to(draws.device, copy=True) for S in streams], draws[0].clone()
    lr = torch.zeros((), device=draws.device)
    opt.param_groups[0]["capturable"] = True  # phase1_train's Adam has one parameter group
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(s, lr, *batch)
        for moments in opt.state.values():
            for v in moments.values():
                v.zero_()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        per_group = step(s, lr, *batch)

    def replay(s_new: torch.Tensor, lr_new: float, *batch_new: torch.Tensor) -> torch.Tensor:
        for buffer, new in zip(batch, batch_new):
            buffer.copy_(new)
        s.copy_(s_new)
        lr.fill_(lr_new)
        graph.replay()
        return per_group

    return replay


# 9b. Many GPUs (torchrun): the sparsity groups split over ranks, the same adapters -----------------------------

def world_size() -> int:
    """torchrun's WORLD_SIZE; 1 (no process group) for `python epts.py`."""
    return int(os.environ.get("WORLD_SIZE", 1))


def process_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def groups_by_rank(n_slices: int, world: int) -> list[list[int]]:
    """The Phase-1 slices (slice k: group k; --nm-train's N:M slice last) that each rank runs: r, r+W, r+2W, ..."""
    return [list(range(r, n_slices, world)) for r in range(world)]


def start_ranks(device: torch.device, n_slices: int) -> torch.device:
    """Under torchrun (WORLD_SIZE > 1): a bad world size in one line, then the process group (NCCL on GPUs, gloo on
    the CPU) and this rank's device, cuda:LOCAL_RANK. Nothing for one process."""
    world, local = world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
    if world > n_slices:
        raise EPTSError(f"torchrun started {world} ranks, but Phase 1 has {n_slices} group slices to split: "
                        f"use --nproc-per-node {n_slices} or fewer")
    if world > 1 and device.type == "cuda":
        if local > torch.cuda.device_count():
            raise EPTSError(f"torchrun started {local} ranks on this machine, but it has {torch.cuda.device_count()}"
                            " GPU(s): one GPU per rank, so --nproc-per-node at most that")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if world > 1:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             device_id=device if device.type == "cuda" else None)
    return device


def end_ranks() -> int:
    """After the optimization: the process group ends; returns the rank (ranks > 0 then stop, rank 0 goes on)."""
    r = process_rank()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return r


class DistributedRuntime(Runtime):
    """Runtime under torchrun: rank r runs the slices r, r+W, r+2W, ... of every block call, with the same math.
    Phase 1: rank 0 broadcasts sg(O_0), each rank backprops its slices' losses of Eq. 3, and one all-reduce sums
    the adapters' gradients (one process's gradient, summed in another order) and the losses. The no-grad passes
    all-reduce the outputs: every rank ends each block with the same streams. The dense targets deal out their
    chunks of samples. Eager steps: no CUDA graph (collectives inside one are untested here)."""

    def dense_targets(self, block, names, X, kwargs, chunk):
        """Chunk c of `chunk` samples runs on rank c mod W, the others' rows stay zero; one all-reduce per tensor
        adds them in (+ 0 is exact), and each linear's per-chunk sums of squares are added in chunk order, as one
        process adds them: the same Y and Wanda norms, bit for bit. Streams in host memory (low_memory on CUDA: no
        NCCL there): every rank computes them all."""
        if X.device != device_of(block):
            return super().dense_targets(block, names, X, kwargs, chunk)
        rows, Y = in_chunks(X, chunk), torch.zeros_like(X)
        sq = {n: X.new_zeros(len(rows), block.get_submodule(n).in_features) for n in names}  # a row per chunk
        for c in range(process_rank(), len(rows), world_size()):
            Y[rows[c]], sums = block_outputs_and_stats(block, names, X[rows[c]], kwargs, chunk)
            for n in names:
                sq[n][c] = sums[n]
        for t in (Y, *sq.values()):
            torch.distributed.all_reduce(t)
        return Y, {n: functools.reduce(torch.add, s.unbind()).sqrt() for n, s in sq.items()}

    def forward_groups(self, block, layers, x, kwargs, slices, x_dense=None) -> torch.Tensor:
        """This rank's slices r, r+W, ..., the others' zero until one all-reduce adds them in (fp32, as the method
        reads them)."""
        mine = slice(process_rank(), None, world_size())
        part = super().forward_groups(block, layers, x, kwargs, slices[mine], x_dense) if len(slices[mine]) else 0
        out = torch.zeros(len(slices), *x.shape, device=device_of(block))  # made after the forward: a lower peak
        out[mine] = part
        torch.distributed.all_reduce(out)
        return out

    def share(self, slices: Slices) -> tuple[Slices, bool]:
        return slices[process_rank()::world_size()], process_rank() == 0  # rank r: slices r, r+W, ...

    def guide(self, O_0: torch.Tensor) -> torch.Tensor:
        """Rank 0's sg(O_0), broadcast: slice 0 is rank 0's first."""
        guide = O_0.detach().clone() if process_rank() == 0 else torch.empty_like(O_0)
        torch.distributed.broadcast(guide, 0)
        return guide

    def phase1_backward(self, block, layers, x, y, kwargs, slices, x_dense=None) -> torch.Tensor:
        """Eq. 3 for this rank's slices (Runtime's), then one all-reduce of the gradients and losses -> losses [G]."""
        mine = super().phase1_backward(block, layers, x, y, kwargs, slices, x_dense)
        params = [p for layer in layers.values() for p in (layer.A, layer.B)]
        flat = torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).flatten() for p in params]
                         + [torch.zeros(len(slices), device=mine.device)])
        flat[len(flat) - len(slices) + process_rank()::world_size()] = mine
        torch.distributed.all_reduce(flat)
        *grads, per_group = flat.split([p.numel() for p in params] + [len(slices)])
        for p, g in zip(params, grads):
            p.grad = g.view_as(p)
        return per_group

    compile_step = staticmethod(PlainRuntime.compile_step)  # eager steps: no CUDA graph

    def blocks(self, model, device, start):
        """A finished block gets back the very tensors it was loaded as (blocks_on would copy it): on GPUs, mmap'd
        views of the safetensors files, shared by all ranks through the page cache -- one model in host memory."""
        home = {p: p.data for p in model.parameters()}
        for i, block in super().blocks(model, device, start):
            yield i, block
            for p in block.parameters():
                p.data = home[p]

    def block_done(self, state, cfg, next_block, X_dense, X_mix, windows) -> None:
        if process_rank() == 0:  # only rank 0 writes the checkpoint; every rank reads it to --resume
            super().block_done(state, cfg, next_block, X_dense, X_mix, windows)


# 10. Sparsity patterns (N:M), dense weights, 2:4 kernels where they are faster -------------------------------------

@torch.no_grad()
def restore_dense(model: nn.Module, dense: dict[str, torch.Tensor]) -> nn.Module:
    """Put the dense weights of `snapshot_linears` back."""
    for key, lin in pruned_linears(model).items():
        lin.weight.copy_(dense[key])
    return model


# 2:4 kernels: cuSPARSELt where a timed probe finds it faster, the dense weight everywhere else.

class Sparse24Linear(nn.Linear):
    """An nn.Linear with a 2:4 weight that runs inputs of at least `min_tokens` rows through cuSPARSELt. It holds the
    original weight and bias Parameters (same state_dict) plus `packed`, cuSPARSELt's compressed copy (`unsparse24`
    before changing the weight). Fewer rows (decode steps), other dtypes or devices, strided inputs, autograd and any
    call cuSPARSELt refuses run F.linear on the dense weight, exactly the unswapped module. `calls` counts both."""

    def __init__(self, linear: nn.Linear, min_tokens: int, config: dict | None = None):
        super().__init__(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        self.weight, self.bias = linear.weight, linear.bias  # the same Parameters, no copy
        self.register_buffer("packed", torch._cslt_compress(linear.weight.detach().contiguous()), persistent=False)
        self.min_tokens, self.config, self.calls = min_tokens, dict(config or {}), {"2:4": 0, "dense": 0}

    def sparse_mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """x2d [tokens, in] -> x2d W^T + b in one cuSPARSELt call, written row-major (transpose_result: a strided
        (W x^T)^T sends every later op onto slow paths). Rows padded to a multiple of 8, as cuSPARSELt needs."""
        tokens, pad = x2d.shape[0], -x2d.shape[0] % 8
        xt = (nn.functional.pad(x2d, (0, 0, 0, pad)) if pad else x2d).t()
        return torch._cslt_sparse_mm(self.packed, xt, self.bias, transpose_result=True, **self.config)[:tokens]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() >= self.min_tokens * self.in_features and x.shape[-1] == self.in_features and x.is_contiguous()
                and x.dtype == self.packed.dtype and x.device == self.packed.device
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            with contextlib.suppress(RuntimeError):  # a size or config cuSPARSELt has no kernel for: dense below
                y = self.sparse_mm(x.view(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
                self.calls["2:4"] += 1
                return y
        self.calls["dense"] += 1
        return super().forward(x)


@dataclass
class Sparse24Report:
    """What `sparse24` did to each pruned linear ("<block index>.<name in block>")."""

    tokens: int                                                 # the tokens per forward the probes timed
    swapped: dict[str, float] = field(default_factory=dict)     # -> measured speed-up over dense at `tokens`
    min_tokens: dict[str, int] = field(default_factory=dict)    # -> break-even: fewer tokens per call run dense
    kept: dict[str, str] = field(default_factory=dict)          # -> why it stays a dense nn.Linear
    fallback_bytes: int = 0  # the dense weights the swapped linears keep for the fallback
    packed_bytes: int = 0    # their compressed copies, on top

    def summary(self) -> str:
        s, m, kept = self.swapped.values(), self.min_tokens.values(), list(self.kept.values())
        text = f"sparse24 at {self.tokens} tokens per forward: {len(s)} of {len(s) + len(kept)} linears swapped"
        if s:
            text += (f" ({min(s):.2f}-{max(s):.2f}x; 2:4 from {min(m)}-{max(m)} tokens per call, dense below), keeping "
                     f"{self.fallback_bytes / 2**20:.1f} MiB of dense weights for the fallback "
                     f"(+{self.packed_bytes / 2**20:.1f} MiB packed)")
        return text + "".join(f"\nkept dense: {kept.count(r)} x {r}" for r in dict.fromkeys(kept))


def cusparselt_missing(device: torch.device) -> str | None:
    """Why cuSPARSELt cannot run on `device` (a CUDA GPU of compute capability 8.0+, a torch built with it), or None."""
    if device.type != "cuda":
        return f"the model is on {device.type}; the 2:4 kernels run on CUDA GPUs"
    if not torch.backends.cusparselt.is_available():
        return "this torch has no cuSPARSELt"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{torch.cuda.get_device_name(device)} has no sparse tensor cores (compute capability < 8.0)"
    return None


def sparse24_refusal(lin: nn.Linear, device: torch.device) -> str | None:
    """Why cuSPARSELt cannot hold this linear, or None: fp16/bf16 only (fp32 would run as TF32), sizes multiples of
    16, at most 2 non-zeros in every 4 consecutive inputs of a row (compression would drop the others)."""
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
    """sparse24's timer: the median of 3 runs of `calls` back-to-back calls of fn() after 3 warm-ups, so host and
    GPU time overlap as inside a forward (cuSPARSELt plans on every call). `label` says what is timed (unused)."""
    clock, runs = Stopwatch(device), []
    for _ in range(3):
        fn()
    for _ in range(3):
        clock.lap()
        for _ in range(calls):
            fn()
        runs.append(clock.lap() / calls)
    return sorted(runs)[1]


@torch.no_grad()
def probe24(lin: nn.Linear, tokens: int, timer: Callable, tol: float = 2e-2) -> dict:
    """One linear alone on `tokens` random rows -> {dense_seconds, min_tokens, config} or {refused: why}. The config
    is the one cuSPARSELt's own GPU-timed search picks (from the host, its per-call planning hides the differences),
    the default {} where this torch cannot search; the result must be within `tol` of dense relative to max |dense|
    (both round to bf16/fp16, in other orders); the break-even: rows halved while 2:4 alone stays faster."""
    out, inp = lin.weight.shape
    gen = torch.Generator(lin.weight.device).manual_seed(0)  # a generator of its own: the caller's RNG is untouched
    x = torch.randn(tokens, inp, generator=gen, device=lin.weight.device, dtype=lin.weight.dtype)

    def dense(n: int) -> float:
        return timer(lambda: nn.functional.linear(x[:n], lin.weight, lin.bias), ("dense", out, inp, n))
    try:
        layer, ref = Sparse24Linear(lin, tokens), nn.functional.linear(x, lin.weight, lin.bias)
        try:  # mm_search -> (alg_id, split_k, split_k_mode, max alg_id); kept only if the call then takes it
            alg, split_k, mode, _ = torch._C._cusparselt.mm_search(layer.packed, x.t(), lin.bias, None, None, True)
            layer.config = dict(alg_id=int(alg), split_k=int(split_k), split_k_mode=int(mode))
            layer.sparse_mm(x)
        except (AttributeError, RuntimeError, TypeError, ValueError):
            layer.config = {}
        err = float((layer.sparse_mm(x) - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    except RuntimeError as e:
        return dict(refused=f"cuSPARSELt refused {out}x{inp}: {str(e).strip().splitlines()[0][:80]}")
    if not err <= tol:
        return dict(refused=f"wrong results from cuSPARSELt (rel. error {err:.1e})")
    smallest = tokens
    with contextlib.suppress(RuntimeError):  # refused at a size: the break-even lies above it
        while (n := smallest // 2) >= 16 and timer(lambda: layer.sparse_mm(x[:n]), ("2:4", out, inp, n)) < dense(n):
            smallest = n
    return dict(dense_seconds=dense(tokens), min_tokens=smallest, config=layer.config)


@torch.no_grad()
def speedup_in_block(model: nn.Module, keys: Sequence[str], probe: dict, x: torch.Tensor, kwargs: dict,
                     timer: Callable) -> float:
    """The speed-up of the m linears `keys` (one block, one shape) as a forward sees it: their block timed with them
    on 2:4 (T_24) and dense (T), interleaved, the faster of 2 rounds each, the saving spread over them:

        speed-up = t / (t - (T - T_24) / m),    t = probe["dense_seconds"], one linear's dense matmul alone

    cuSPARSELt plans every call on the host: alone that time shows, inside a forward it overlaps the GPU's work."""
    linears, prefix, times = pruned_linears(model), arch_of(model)[0], {}
    swapped = {k: Sparse24Linear(linears[k], probe["min_tokens"], probe["config"]) for k in keys}
    block, (out, inp) = decoder_blocks(model)[block_of(keys[0])], linears[keys[0]].weight.shape
    try:
        for kind in ("block dense", "block 2:4") * 2:
            for k in keys:
                swap_module(model, f"{prefix}.{k}", swapped[k] if kind == "block 2:4" else linears[k])
            label = (kind, out, inp, x.shape[0] * x.shape[1], len(keys))
            times[kind] = min(times.get(kind, math.inf), timer(lambda: call_block(block, x, kwargs), label))
    finally:
        for k in keys:  # the dense linears back, whatever happened
            swap_module(model, f"{prefix}.{k}", linears[k])
    t, saved = probe["dense_seconds"], (times["block dense"] - times["block 2:4"]) / len(keys)
    return t / max(t - saved, 1e-3 * t)


def sparse24(model: nn.Module, tokens: int, timer: Callable | None = None, margin: float = 1.05) -> Sparse24Report:
    """Swap, in place, every pruned linear of a 2:4 model that cuSPARSELt runs faster for a Sparse24Linear: one it
    can hold (`sparse24_refusal`, `probe24`) whose 2:4 matmul is `margin` times as fast as dense inside a block
    forward on `tokens` tokens, the tokens per forward you will run, e.g. prefill 8 x 2048 (`speedup_in_block`).
    Below `probe24`'s break-even (decode steps) it runs dense. One probe per weight shape, in the first block that
    has it; `timer(fn, label)` -> seconds per call. On the CPU or without cuSPARSELt: no change, one warning. Run
    under torch.no_grad() (with autograd every call runs dense); `unsparse24` undoes it."""
    if tokens < 16:
        raise EPTSError(f"sparse24: tokens is the token count of a prefill forward (at least 16), got {tokens}")
    linears, report = pruned_linears(model), Sparse24Report(tokens)
    W = next(iter(linears.values())).weight
    if missing := cusparselt_missing(W.device):
        warnings.warn(f"sparse24: {missing}; the model is unchanged", stacklevel=2)
        report.kept = dict.fromkeys(linears, missing)
        return report
    timer, by_shape, probes = timer or functools.partial(seconds_per_call, device=W.device), {}, {}
    prefix = arch_of(model)[0]
    for key, lin in linears.items():
        if why := sparse24_refusal(lin, W.device):
            report.kept[key] = why
        else:
            by_shape.setdefault((*lin.weight.shape, lin.weight.dtype, lin.bias is not None), []).append(key)
    seqlen = min(tokens, 2048, getattr(model.config, "max_position_embeddings", 2048))
    ids = torch.randint(model.config.vocab_size, (-(-tokens // seqlen), seqlen),  # at least `tokens` tokens
                        generator=torch.Generator().manual_seed(0))
    x, kwargs = capture_block_inputs(model, ids, W.device, W.dtype) if by_shape else (None, {})
    for shape, keys in by_shape.items():  # every shape probed and timed before anything is swapped
        probe = probes[shape] = probe24(linears[keys[0]], tokens, timer)
        if "refused" not in probe:
            probe["speedup"] = speedup_in_block(model, [k for k in keys if block_of(k) == block_of(keys[0])], probe,
                                                x, kwargs, timer)
            if probe["speedup"] < margin:
                probe["refused"] = (f"not {margin:.2f}x faster in a forward at {tokens} tokens "
                                    f"({shape[0]}x{shape[1]}: {probe['speedup']:.2f}x)")
    for shape, keys in by_shape.items():
        for key in keys:
            if "refused" in probes[shape]:
                report.kept[key] = probes[shape]["refused"]
                continue
            layer = Sparse24Linear(linears[key], probes[shape]["min_tokens"], probes[shape]["config"])
            swap_module(model, f"{prefix}.{key}", layer)
            report.swapped[key], report.min_tokens[key] = probes[shape]["speedup"], layer.min_tokens
            report.fallback_bytes += layer.weight.numel() * layer.weight.element_size()
            report.packed_bytes += layer.packed.numel() * layer.packed.element_size()
    return report


def unsparse24(model: nn.Module) -> nn.Module:
    """Undo `sparse24`: every Sparse24Linear back to a plain nn.Linear holding the same weight and bias."""
    prefix = arch_of(model)[0]
    for key, lin in pruned_linears(model).items():
        if isinstance(lin, Sparse24Linear):
            plain = nn.Linear(lin.in_features, lin.out_features, lin.bias is not None, device="meta")
            plain.weight, plain.bias = lin.weight, lin.bias
            swap_module(model, f"{prefix}.{key}", plain)
    return model


# 11. Baselines in the same harness: magnitude, Wanda, SparseGPT, dedicated runs, OWL layer-wise sparsity ------

def gram(x: torch.Tensor) -> torch.Tensor:
    """X^T X over the tokens of a batch: the Hessian H = 2 X X^T / n accumulates it (SparseGPT)."""
    return x.T @ x


@torch.no_grad()
def prune_magnitude(model: nn.Module, sparsity: float | Sequence[float]) -> nn.Module:
    """Magnitude pruning, the baseline of the Wanda and SparseGPT repositories: in every matrix, the
    floor(s * numel) weights of smallest |W_ij| are removed (one threshold per matrix, not per row; no data).
    Their code prunes |W| <= the threshold, i.e. one weight more; we remove exactly floor(s * numel)."""
    per_block = per_block_sparsities(sparsity, len(decoder_blocks(model)))
    for key, lin in pruned_linears(model).items():
        W, (s, m) = lin.weight, pattern(per_block[block_of(key)])
        scores = W.detach().abs().float()  # one ranking over the whole matrix; N:M: the N smallest of every M
        ranks = row_ranks(scores.view(1, -1)) if m is None else nm_ranks(scores, m)  # consecutive inputs of a row
        W.mul_(mask_from_ranks(ranks, s).view_as(W).to(W.dtype))
    return model


def wanda_prune(W: torch.Tensor, sum_sq: torch.Tensor, n_tokens: int, sparsity: float | str) -> torch.Tensor:
    """Wanda for one layer: W * M(s) with the row-wise (or N:M) mask of Eq. 1 (no weight update). Takes sum_j
    x_j^2 and n_tokens (unused: ranking ignores scale) to plug into prune_sequential as sparsegpt_prune does."""
    return W * mask_from_ranks(ranks_for(wanda_scores(W, sum_sq.sqrt()), sparsity), pattern(sparsity)[0])


def sparsegpt_prune(W: torch.Tensor, xtx: torch.Tensor, n_tokens: int, sparsity: float | str, blocksize: int = 128,
                    percdamp: float = 0.01) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023) for one layer: OBS pruning with weight updates.
    With H = 2 X X^T / n (+ 1% of its mean diagonal for stability) and U the upper Cholesky factor of H^-1,
    columns are visited left to right in blocks of 128. In each block the mask drops the weights of lowest
    saliency w_ij^2 / U_jj^2 (jointly over the block's rows and columns). Visiting column j, the pruned
    weights' error e = (w_j - q_j) / U_jj is pushed onto the not-yet-visited columns,
        W[:, j:] -= e U[j, j:],
    which is the optimal (OBS) compensation given the columns already fixed. For an N:M pattern the mask is
    chosen adaptively too: on reaching each group of M columns, the N of lowest saliency in every row."""
    s, m = pattern(sparsity)
    W = W.float().clone()
    H = 2 * xtx.float() / n_tokens
    dead = torch.diag(H) == 0          # inputs that are always zero: their weights are irrelevant
    H[dead, dead] = 1
    W[:, dead] = 0
    H += percdamp * torch.diag(H).mean() * torch.eye(len(H), device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    for i1 in range(0, W.shape[1], blocksize):
        i2 = min(i1 + blocksize, W.shape[1])
        W1, U1, err = W[:, i1:i2].clone(), U[i1:i2, i1:i2], torch.zeros_like(W[:, i1:i2])
        d = torch.diag(U1)
        pruned = torch.zeros_like(W1, dtype=torch.bool)
        if m is None:  # the block's lowest saliencies, over its rows and columns jointly
            saliency = (W1 ** 2 / d ** 2).flatten()
            pruned.view(-1)[torch.topk(saliency, prune_count(s, saliency.numel()), largest=False).indices] = True
        for j in range(i2 - i1):
            if m is not None and j % m == 0:  # N:M: this group's N lowest saliencies, on the updated weights
                sal = W1[:, j:j + m] ** 2 / d[j:j + m].view(1, -1) ** 2
                pruned[:, j:j + m].scatter_(1, torch.topk(sal, round(s * m), dim=1, largest=False).indices, True)
            e = W1[:, j] * pruned[:, j] / d[j]
            W1[:, j:] -= e.unsqueeze(1) * U1[j, j:].unsqueeze(0)  # column j becomes exactly 0 where pruned
            err[:, j] = e
        W[:, i1:i2] = W1.masked_fill(pruned, 0.0)
        W[:, i2:] -= err @ U[i1:i2, i2:]  # the whole block's error onto the columns to its right
    return W


@torch.no_grad()
def prune_sequential(model: nn.Module, windows: torch.Tensor, sparsity: float | Sequence[float], prune_layer,
                     stat=sum_of_squares, device: str | torch.device = "cpu", chunk: int = 8, desc: str = "",
                     verbose: bool = True) -> nn.Module:
    """The sequential loop of Wanda and SparseGPT: block by block, statistics come from the *pruned* stream.
    For each block: one forward on the current stream accumulates stat(inputs) of every linear, every linear
    is replaced by prune_layer(W, stat, n_tokens, s), and the pruned block's outputs feed the next block."""
    device = torch.device(device)
    _, names = arch_of(model)
    per_block = per_block_sparsities(sparsity, len(decoder_blocks(model)))
    model.eval()
    X, kwargs = capture_block_inputs(model, windows, device)
    for i, block in tqdm(blocks_on(model, device), desc=desc, unit="block", total=len(per_block), disable=not verbose):
        _, stats = block_outputs_and_stats(block, names, X, kwargs, chunk, stat)
        for n in names:
            lin = block.get_submodule(n)
            lin.weight.copy_(prune_layer(lin.weight, stats[n], windows.numel(), per_block[i]))
        X = block_forward(block, X, kwargs, chunk)
    return model


def dedicated_config(cfg: EPTSConfig, sparsity: float | str) -> EPTSConfig:
    """The "one optimization per sparsity" baseline that EPTS replaces: the same block reconstruction with a single
    adapter trained at one fixed sparsity S (or N:M pattern, trained on N:M masks) on its own pruned stream: one
    group (0, S], no mixer (weight 1), no low-group check, and the rank of EPTS's chain at S: r * (group(S) + 1)."""
    k = group_of(pattern(sparsity)[0], cfg.groups)
    if k is None:
        raise EPTSError("a dedicated run needs a sparsity > 0")
    paper = {f: getattr(EPTSConfig(), f) for f in RECIPES["tuned"] if f != "rank"}  # group-0 switches off
    return replace(cfg, groups=((0.0, pattern(sparsity)[0]),), mixer=(1.0,), rank=cfg.rank * (k + 1),
                   low_check_sparsity=None, fixed_sparsity=sparsity, nm_train=None, **paper)


@torch.no_grad()
def dense_act_norms(model: nn.Module, windows: torch.Tensor, device: str | torch.device = "cpu",
                    chunk: int = 8) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every pruned linear's inputs on the dense model (what EPTS stores in its state)."""
    device = torch.device(device)
    _, names = arch_of(model)
    X, kwargs = capture_block_inputs(model, windows, device)
    norms = {}
    for i, block in blocks_on(model, device):
        X, block_norms = dense_targets_and_norms(block, names, X, kwargs, chunk)
        norms.update({f"{i}.{n}": v.cpu() for n, v in block_norms.items()})
    return norms


def owl_sparsities(dense: dict[str, torch.Tensor], act_norms: dict[str, torch.Tensor], target: float,
                   lam: float = 0.08, M: float = 5.0, limits: tuple[float, float] = (0.0, 1.0)) -> list[float]:
    """OWL (Yin et al., 2023): outlier-weighted layer-wise sparsity, one sparsity per block. A block's outlier
    ratio D_i is the share of its Wanda scores (all its linears pooled) above M times their mean. With D
    normalized to [0, 1], s_i = target - 2 lam (D_i - mean D): more outliers, fewer pruned weights, every s_i
    within target +- lam (the OWL paper's range). Each s_i is then clamped to `limits` (for an elastic model:
    the trained range) while the mean is kept at the target where that is possible."""
    n_blocks = 1 + max(block_of(k) for k in dense)
    ratios = []
    for i in range(n_blocks):
        scores = torch.cat([wanda_scores(W, act_norms[k]).flatten() for k, W in dense.items() if block_of(k) == i])
        ratios.append(float((scores > M * scores.mean()).float().mean()))
    D = torch.tensor(ratios, dtype=torch.float64)
    D = (D - D.min()) / (D.max() - D.min()) if D.max() > D.min() else torch.zeros_like(D)
    s = target - 2 * lam * (D - D.mean())
    lo, hi = limits
    for _ in range(100):  # clamp, then spread what clamping removed over the blocks still free to move
        s = s.clamp(lo, hi)
        gap = target * n_blocks - float(s.sum())
        free = (s > lo) & (s < hi) if gap else None
        if abs(gap) < 1e-9 or not bool(free.any()):
            break
        s[free] += gap / int(free.sum())
    return s.clamp(lo, hi).tolist()


def load_schedule(schedule: str, n_blocks: int) -> list[float] | None:
    """--schedule PATH: a JSON list of per-block sparsities (None for 'uniform' / 'owl', computed elsewhere)."""
    if schedule in ("uniform", "owl"):
        return None
    try:
        with open(schedule) as f:
            values = json.load(f)
    except (OSError, ValueError) as e:
        raise EPTSError(f"--schedule must be uniform, owl or a JSON file of per-block sparsities: {e}") from e
    if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
        raise EPTSError(f"--schedule file '{schedule}' must hold a JSON list of numbers")
    return per_block_sparsities(values, n_blocks)


METHODS = ("epts", "dedicated", "wanda", "sparsegpt", "magnitude")


def sparsify(model: nn.Module, method: str, sparsity: float | Sequence[float], dense: dict[str, torch.Tensor],
             windows: torch.Tensor | None = None, state: ElasticState | None = None, cfg: EPTSConfig | None = None,
             device: str | torch.device = "cpu", verbose: bool = False, runtime: Runtime | None = None,
             base_model: str = "") -> nn.Module:
    """`method`'s model at `sparsity` (one number, or one per block), written into `model` from `dense`:
    epts deploys the elastic `state`; dedicated runs one EPTS-style optimization at that sparsity (`cfg`);
    wanda and sparsegpt prune sequentially on the calibration `windows`; magnitude needs no data."""
    restore_dense(model, dense)  # every method starts from the dense weights
    if method == "epts":
        return deploy(model, state, sparsity, dense, device)
    if method == "dedicated":
        if not isinstance(sparsity, (int, float, str)):
            raise EPTSError("--method dedicated trains one uniform sparsity; use --schedule uniform")
        single = optimize(model, windows, dedicated_config(cfg, sparsity), device, base_model,
                          replace(runtime or Runtime(), verbose=verbose))
        return deploy(model, single, sparsity, dense, device)
    if method in ("wanda", "sparsegpt"):  # Sun et al. 2023; Frantar & Alistarh 2023: sequential, as in the papers
        prune, stat = (wanda_prune, sum_of_squares) if method == "wanda" else (sparsegpt_prune, gram)
        return prune_sequential(model, windows, sparsity, prune, stat, device, desc=method, verbose=verbose)
    if method == "magnitude":
        return prune_magnitude(model, sparsity)
    raise EPTSError(f"unknown method '{method}'; one of {', '.join(METHODS)}")


def sweep(model: nn.Module, method: str, targets: Sequence[float], dense: dict[str, torch.Tensor],
          evaluate: Callable[[float], dict[str, float]], schedule: Callable[[float], Any] | None = None, **how):
    """The method x sparsity loop (command line, benchmarks, tutorial): for every target sparsity, sparsify
    (`schedule(target)` -> one number or one per block; default the target itself), then yield a row
    {sparsity, achieved_sparsity, ppl: evaluate(target), seconds}. The dense weights are back at the end."""
    try:
        for target in targets:
            sparsity = schedule(target) if schedule is not None else target
            clock = Stopwatch(how.get("device", "cpu"))
            sparsify(model, method, sparsity, dense, **how)
            row = {"sparsity": target, "achieved_sparsity": measured_sparsity(model), "seconds": clock.lap()}
            row["ppl"] = evaluate(target)
            if not isinstance(sparsity, (int, float, str)):
                row["per_block"] = list(sparsity)
            yield row
    finally:
        restore_dense(model, dense)


# 12. Artifacts and checkpoints: safetensors with a JSON header, no pickle, no base weights --------------------

FORMAT_VERSION = 1


def fingerprint(model: nn.Module) -> dict:
    """Identify the base weights: a hash of the pruned linears' shapes plus a few weight statistics (not a byte
    hash: the same model loaded in fp32, fp16 or bf16 matches)."""
    lins = pruned_linears(model)
    shapes = json.dumps({k: list(v.weight.shape) for k, v in lins.items()}, sort_keys=True)
    probe_keys = sorted(lins)[:: max(1, len(lins) // 8)]
    probe = [float(lins[k].weight.detach().float().abs().mean()) for k in probe_keys]
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


def _state_tensors(state: ElasticState, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    tensors = {f"{key}.{n}": t.to(dtype).contiguous() for key, AB in state.adapters.items() for n, t in zip("AB", AB)}
    return {**tensors, **{f"{key}.act_norm": v.float().contiguous() for key, v in state.act_norms.items()}}


def _state_header(state: ElasticState) -> dict:
    """Every ElasticState field but the tensors, as JSON: what `_state_from` reads back."""
    fields = {k: v for k, v in vars(state).items() if k not in ("adapters", "act_norms", "reports")}
    return {"format": "epts", "version": FORMAT_VERSION, **fields, "reports": [asdict(r) for r in state.reports]}


def _state_from(tensors: dict[str, torch.Tensor], header: dict) -> ElasticState:
    fields = {k: header[k] for k in ElasticState.__dataclass_fields__ if k in header and k != "reports"}
    state = ElasticState(**{**fields, "groups": [tuple(g) for g in header["groups"]]},
                         reports=[BlockReport(**r) for r in header["reports"]])
    if "group0_gains" not in header:  # written before the gains were stored: deploy's gain, from the reports
        state.group0_gains = [r.low_gain * r.low_group_enabled for r in state.reports]
    for name in tensors:
        if name.endswith(".act_norm"):
            key = name[: -len(".act_norm")]
            state.act_norms[key] = tensors[name]
            state.adapters[key] = (tensors[f"{key}.A"].float(), tensors[f"{key}.B"].float())
    return state


def _write(path: str, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """safetensors with a JSON header in its metadata, written to a temporary file and renamed (atomic)."""
    from safetensors.torch import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata={"epts": json.dumps(header)})
    os.replace(tmp, path)  # a crash never leaves half a file behind


def _read(path: str, header_only: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, JSON header) of an artifact or checkpoint, checked; no tensors with `header_only`."""
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
        raise EPTSError(f"'{path}' has format version {header['version']}, newer than this epts.py reads "
                        f"({FORMAT_VERSION}); update epts.py")
    bad = next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
    if bad is not None:
        raise EPTSError(f"'{path}' is damaged: tensor '{bad}' holds non-finite values")
    return tensors, header


def save_elastic(state: ElasticState, path: str, dtype: torch.dtype = torch.float32, seqlen: int | None = None) -> None:
    """The elastic artifact: adapters (in `dtype`) + activation norms + a JSON header, as safetensors. No pickle,
    no base weights, no masks (re-derived from the base weights and the norms). `seqlen`, the calibration
    windows' length, is recorded for --load to evaluate at."""
    _write(path, _state_tensors(state, dtype), {**_state_header(state), "seqlen": seqlen})


def state_header(path: str) -> dict:
    """The JSON header of an elastic state, read without its tensors; the checkpoint of an unfinished run (what an
    interrupted --save leaves) is refused in one line, naming --resume."""
    header = _read(path, header_only=True)[1]
    if "next_block" in header:
        raise EPTSError(f"'{path}' is a checkpoint of an unfinished run, not an elastic state; continue it with "
                        "--resume (the interrupted command again, plus --resume)")
    return header


def load_elastic(path: str) -> ElasticState:
    """The elastic state save_elastic wrote."""
    state_header(path)
    return _state_from(*_read(path))


def run_identity(windows: torch.Tensor, dtype: str) -> dict:
    """What a resumed run must share with the interrupted one besides config and base model: the dtype of the
    base weights and the calibration windows themselves (their shape and a hash of their token ids)."""
    return {"dtype": dtype, "nsamples": len(windows), "seqlen": windows.shape[-1],
            "calib_sha256": hashlib.sha256(windows.cpu().numpy().tobytes()).hexdigest()}


def save_checkpoint(path: str, state: ElasticState, cfg: EPTSConfig, next_block: int, X_dense: torch.Tensor,
                    X_mix: torch.Tensor, windows: torch.Tensor) -> None:
    """The elastic state so far plus both streams at the input of `next_block` (atomic write)."""
    _write(path, {**_state_tensors(state), "stream.dense": X_dense.cpu(), "stream.mix": X_mix.cpu()},
           {**_state_header(state), "next_block": next_block, "config": asdict(cfg),
            "run": run_identity(windows, state.base_dtype)})


def load_checkpoint(path: str, model: nn.Module, cfg: EPTSConfig, windows: torch.Tensor, model_name: str = ""
                    ) -> tuple[ElasticState, int, torch.Tensor, torch.Tensor]:
    """(state so far, next block, X_dense, X_mix) of a checkpoint made with the same config, base model and
    calibration data; anything else is refused in one line."""
    tensors, header = _read(path)
    saved, given = header.get("config", {}), json.loads(json.dumps(asdict(cfg)))
    differ = [f"{k} {saved.get(k)} (now {given.get(k)})" for k in sorted(set(saved) | set(given))
              if saved.get(k) != given.get(k)]
    if differ:
        raise EPTSError(f"checkpoint '{path}' was made with other settings: {'; '.join(differ)}; remove it or run "
                        "with the same arguments")
    state = _state_from(tensors, header)
    check_fingerprint(state, model, model_name)
    now = run_identity(windows, weight_dtype(model))
    for key, value in header.get("run", {}).items():
        if now[key] != value:
            raise EPTSError(f"checkpoint '{path}' was made with another {key.replace('_', ' ')} ({value}, now "
                            f"{now[key]}): other calibration data, --seqlen, --nsamples or --dtype; remove it or "
                            "run with the same arguments")
    return state, header["next_block"], tensors["stream.dense"], tensors["stream.mix"]


# 13. Data and evaluation --------------------------------------------------------------------------------------

def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once (verbose=False: the tokenizer's length warning does not apply to corpora)."""
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def _hub_dataset(*args, **kwargs):
    """A dataset from the hub; any failure (no `datasets`, offline, no access) is one line naming the way out."""
    offline = "or pass a local text file instead (e.g. --calib train.txt --eval test.txt)"
    try:
        from datasets import load_dataset  # lazy: only hub datasets need it
    except ImportError as e:
        raise EPTSError(f"hub datasets need the `datasets` package (pip install datasets), {offline}") from e
    try:
        return load_dataset(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- network, authentication, missing files: all end the same way
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise EPTSError(f"cannot load the hub dataset '{args[0]}' ({type(e).__name__}: {first}); {offline}") from e


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise EPTSError(f"'{path}' is neither a known dataset (c4, wikitext2) nor a text file")
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise EPTSError(f"'{path}' is not UTF-8 text (byte {e.start}); pass a plain text file") from e


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, name: str) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from one token stream -> LongTensor [nsamples, seqlen]."""
    if tokens.numel() < nsamples * seqlen:
        raise EPTSError(f"calibration text '{name}' has {tokens.numel()} tokens, fewer than "
                        f"nsamples x seqlen = {nsamples} x {seqlen}; use a longer text or smaller values")
    rng = random.Random(seed)
    starts = [rng.randint(0, tokens.numel() - seqlen) for _ in range(nsamples)]
    return torch.stack([tokens[i:i + seqlen] for i in starts])


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """Calibration data -> LongTensor [nsamples, seqlen]. c4 and wikitext2: token for token the loaders of the
    Wanda / SparseGPT repositories (c4: random documents longer than seqlen from the first train shard, one
    random window each; wikitext2: the raw train split joined by " ", windows starting in [0, n - seqlen - 1]);
    anything else: random windows of a local text file."""
    if nsamples <= 0:
        raise EPTSError(f"--nsamples must be positive, got {nsamples}")
    if source == "c4":
        docs = _hub_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        rng, windows = random.Random(seed), []
        while len(windows) < nsamples:
            ids = _tokenize(tokenizer, docs[rng.randint(0, len(docs) - 1)]["text"])
            if ids.numel() > seqlen:
                start = rng.randint(0, ids.numel() - seqlen - 1)
                windows.append(ids[start:start + seqlen])
        return torch.stack(windows)
    if source == "wikitext2":
        ids = _tokenize(tokenizer, " ".join(_hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                         split="train")["text"]))
        return random_windows(ids[:-1], nsamples, seqlen, seed, source)  # ids[:-1]: starts in [0, n - seqlen - 1]
    return random_windows(_tokenize(tokenizer, _read_text(source)), nsamples, seqlen, seed, source)


def eval_tokens(tokenizer, source: str, seqlen: int) -> torch.Tensor:
    """Evaluation text tokenized once -> LongTensor [n_tokens] (the papers' protocol). wikitext2: the raw test
    split joined by "\\n\\n"; c4: the first 1100 validation documents joined by " ", truncated to 256 windows
    (as SparseGPT); anything else: a local text file, whole."""
    if source == "c4":
        docs = _hub_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation")
        return _tokenize(tokenizer, " ".join(docs[:1100]["text"]))[: 256 * seqlen]
    if source == "wikitext2":
        return _tokenize(tokenizer, "\n\n".join(_hub_dataset("Salesforce/wikitext", "wikitext-2-raw-v1",
                                                             split="test")["text"]))
    return _tokenize(tokenizer, _read_text(source))


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, seqlen: int, device: str | torch.device | None = None,
               batch_size: int = 8, verbose: bool = False, desc: str = "ppl") -> float:
    """ppl = exp(mean token NLL) over the non-overlapping windows of `seqlen` tokens (the remainder is dropped).
    A non-finite result (NaN or inf weights) is an error, never a number in a table."""
    n = tokens.numel() // seqlen
    if n == 0:
        raise EPTSError(f"evaluation text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    device = device or model.device
    windows = tokens[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not verbose, leave=False):
        ids = windows[i:i + batch_size].to(device)
        logits = model(ids, use_cache=False).logits.float()
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           reduction="sum")
        nll += float(loss)
        count += ids[:, 1:].numel()
    if not math.isfinite(nll):
        raise EPTSError(f"perplexity is not finite ({desc}): the model's weights hold NaN or inf values")
    return math.exp(nll / count)


# 14. Command line ---------------------------------------------------------------------------------------------

def warn(message: str) -> None:
    """A one-line warning on stderr (the command line's way; the library raises or returns instead)."""
    print(f"warning: {message}", file=sys.stderr)


def pick_device(name: str) -> torch.device:
    """auto | cpu | cuda | cuda:N -> a torch device that exists here; anything else is a one-line error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        warnings.warn("no GPU found: running on the CPU (slow for real models)")
        return torch.device("cpu")
    head, _, index = name.partition(":")
    if name != "cpu" and (head != "cuda" or (index and not index.isdigit())):
        raise EPTSError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if head == "cuda" and not torch.cuda.is_available():
        raise EPTSError(f"--device {name} was asked for, but torch sees no CUDA GPU; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise EPTSError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return torch.device(name)


def gguf_source(name: str) -> tuple[str, str]:
    """A .gguf model -> (local folder or hub repo, file name): a local file, or 'org/repo/file.gguf' on the hub.
    A local file is checked first: missing or not GGUF (magic bytes) is a one-line error."""
    if os.path.isfile(name):
        with open(name, "rb") as f:
            if f.read(4) != b"GGUF":
                raise EPTSError(f"'{name}' is not a GGUF file (it does not start with the GGUF magic bytes)")
        return os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    parts = name.split("/")
    if os.path.exists(name) or name.startswith((".", "/", "~")) or len(parts) != 3:
        raise EPTSError(f"no such GGUF file: '{name}' (a hub GGUF is named 'org/repo/file.gguf')")
    return "/".join(parts[:2]), parts[2]


def load_gguf(name: str, trust_remote_code: bool = False):
    """(model, tokenizer) from a .gguf file: transformers de-quantizes it to fp32; the weights are then copied
    into a plain model of the same class, which saves, prunes and exports like one loaded from a folder
    (a model loaded straight from GGUF refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, file = gguf_source(name)
    try:
        gguf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32,
                                                    trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file, trust_remote_code=trust_remote_code)
    except ImportError as e:
        raise EPTSError(f"reading '{name}' needs the gguf package: pip install gguf ({str(e).splitlines()[0]})") from e
    except Exception as e:  # a truncated or damaged file fails deep inside the gguf reader, with any error type
        raise EPTSError(f"cannot read the GGUF file '{name}': {type(e).__name__}: {str(e).splitlines()[0]}") from e
    del gguf.config.quantization_config
    model = type(gguf)(gguf.config).to(torch.float32)
    model.load_state_dict(gguf.state_dict())
    return model, tokenizer


def load_model(name: str, dtype: str, device: torch.device, trust_remote_code: bool = False, verbose: bool = True):
    """(model, tokenizer) from the hub, a local folder or a .gguf file; a failure to load either is one line."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    if not verbose:
        hf_logging.disable_progress_bar()
    # auto: fp32 on the CPU; the checkpoint's own dtype (usually fp16/bf16) on a GPU
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else torch.float32 if device.type == "cpu" else "auto"
    if name.endswith(".gguf"):
        model, tokenizer = load_gguf(name, trust_remote_code)
        model.to(torch.float32 if torch_dtype == "auto" else torch_dtype)  # "auto": GGUF de-quantizes to fp32
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as e:
            raise EPTSError(f"cannot load model '{name}': {str(e).splitlines()[0]}") from e
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as e:
            raise EPTSError(f"cannot load the tokenizer of '{name}': {str(e).splitlines()[0]}") from e
    if len(tokenizer) <= 1 or not tokenizer("a b c")["input_ids"]:
        raise EPTSError(f"the tokenizer of '{name}' has no vocabulary: the model folder lacks its tokenizer files "
                        "(tokenizer.json / tokenizer_config.json / vocab files)")
    arch_of(model)
    model.eval()
    return model, tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, like every other input error
        self.exit(2, f"error: {message} (see --help)\n")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every default shown, except a None (those flags say in words what happens without them)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """The flags of Runtime: how the method runs, never what it computes."""
    p.add_argument("--no-amp", action="store_true", help="optimize in fp32 instead of bf16 autocast (CUDA)")
    p.add_argument("--low-memory", action="store_true", help="keep the calibration streams in pinned host memory, "
                   "run Phase 1 one group at a time and no-grad passes 2 samples at a time (same math): LLaMA-7B "
                   "shape 9.7 instead of 33 GiB of GPU memory, 1.15x the time")
    p.add_argument("--reference-loop", action="store_true", help="one forward per group instead of batched")
    p.add_argument("--no-cuda-graph", action="store_true", help="run Phase-1 steps eagerly on CUDA")


def add_output_args(p: argparse.ArgumentParser) -> None:
    """The flags of what a run writes and reads back: the elastic state, checkpoints, the export, the results."""
    p.add_argument("--save", help="write the elastic state (safetensors) here")
    p.add_argument("--save-dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the saved adapters: bfloat16 is half of float32's size and moved no perplexity on "
                        "SmolLM2-135M by more than 0.022%%; the run evaluates the state as saved")
    p.add_argument("--checkpoint-dir", help="write a checkpoint after every block here (default: --save's folder)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint after the last finished block")
    p.add_argument("--load", help="load an elastic state instead of optimizing")
    p.add_argument("--export-sparsity", type=sparsity_arg, help="save the model at this sparsity or N:M pattern "
                   "(any --method) to --export-dir as a plain transformers model")
    p.add_argument("--export-dir", help="an empty or new folder for --export-sparsity (made when it is written)")
    p.add_argument("--export-dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="dtype of the exported weights (auto: the checkpoint's own dtype)")
    p.add_argument("--overwrite", action="store_true", help="allow replacing existing --save / --json-out files, "
                   "and an --export-dir holding an earlier export: its files (config, weights and index, tokenizer) "
                   "are removed before the new one is written; any other file there is refused. Never the model's "
                   "own folder")
    p.add_argument("--json-out", help="write the results as JSON here")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's flags; --eval's default is none when a --load state is only exported."""
    d = EPTSConfig()  # the method's defaults are written once, in EPTSConfig
    p = _Parser(description="EPTS: optimize once, deploy at any sparsity in [0, 1) (trained for (0, 0.7]; above "
                "that, the mask alone).", formatter_class=_Help)
    p.add_argument("--model", required=True, help="HF hub name or local folder (OPT or LLaMA family)")
    p.add_argument("--calib", default="c4", help="calibration data: c4 | wikitext2 | path to a text file")
    p.add_argument("--eval", nargs="+", help="wikitext2 | c4 | text file paths | none (default: wikitext2; none "
                   "with --load and --export-sparsity)")
    p.add_argument("--eval-tokens", type=int,
                   help="evaluate on the first N tokens of each --eval text only (default: all)")
    p.add_argument("--nsamples", type=int, default=128, help="calibration windows")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window, and per evaluation window (perplexity "
                   "depends on it); default: a --load state's own, else min(2048, max_position_embeddings)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs of Phase 1 per block")
    p.add_argument("--lr", type=float, default=d.lr, help="Adam learning rate, cosine-annealed to 0")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=d.recipe, help="paper (the authors') or tuned "
                   "(group 0 trained alone on the dense stream, ramped and fitted gain, rank 32; see README)")
    p.add_argument("--rank", type=int, help=f"LoRA rank of every adapter pair (B_k, A_k) (default: {d.rank}; "
                   f"{RECIPES['tuned']['rank']} with --recipe tuned)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="calibration windows per Phase-1 step")
    p.add_argument("--sparsities", type=functools.partial(sparsity_arg, kinds="a number such as 0.5"), nargs="+",
                   default=[0.3, 0.4, 0.5, 0.6, 0.7], help="sparsities to deploy and evaluate")
    p.add_argument("--pattern", default="unstructured",
                   type=lambda t: t if t == "unstructured" else sparsity_arg(t, "unstructured or N:M"),
                   help="unstructured, or N:M (e.g. 2:4, 4:8: N of every M consecutive inputs pruned, what GPU "
                        "sparse tensor cores run); N:M evaluates that pattern instead of --sparsities")
    p.add_argument("--sparse24", action="store_true", help="with --pattern 2:4, on CUDA: evaluate the 2:4 row with the "
                   "linears that cuSPARSELt runs faster swapped in (epts.sparse24) and print its report")
    p.add_argument("--method", choices=METHODS, default="epts",
                   help="epts: one elastic run for all sparsities; dedicated: one EPTS-style run per sparsity; "
                        "wanda / sparsegpt / magnitude: one pruning per sparsity")
    p.add_argument("--schedule", default="uniform",
                   help="uniform | owl | PATH to a JSON list of per-block sparsities (then --sparsities is ignored)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="the model's dtype (auto: fp32 on CPU, the checkpoint's on GPU); blocks optimize in fp32")
    add_runtime_args(p)
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the calibration windows and of every draw")
    p.add_argument("--nm-train", type=functools.partial(sparsity_arg, kinds="N:M"), metavar="N:M",
                   help="not in the paper: train the group holding N/M also on N:M masks (one more Phase-1 slice, "
                        "~1/7 more time), for deployment at N:M")
    p.add_argument("--groups", type=float, nargs="+", default=[hi for _, hi in d.groups], metavar="HI",
                   help="upper ends of the sparsity groups; group k is (HI_{k-1}, HI_k], starting at 0")
    p.add_argument("--mixer", type=float, nargs="+", default=list(d.mixer), help="MSFM weights, one per group")
    add_output_args(p)
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per forward when evaluating")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own code from the hub")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    if args.eval is None:  # exporting a saved state needs no evaluation unless one is asked for
        args.eval = ["none"] if args.load and args.export_sparsity is not None else ["wikitext2"]
    return args


def sparsity_arg(text: str, kinds: str = "a number or N:M") -> float | str:
    """A command-line sparsity of the `kinds` its flag takes: a number, or an N:M pattern kept as text ("2:4")."""
    try:
        value = text if ":" in text else float(text)
        pattern(value)  # an N:M pattern: 0 < N < M
    except EPTSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid sparsity '{text}': expected {kinds}") from None
    if isinstance(value, str) and "N:M" not in kinds:
        raise argparse.ArgumentTypeError(f"'{text}' is an N:M pattern: use --pattern {text} (this flag takes {kinds})")
    if not isinstance(value, str) and "number" not in kinds:
        raise argparse.ArgumentTypeError(f"expected {kinds} (e.g. 2:4), got '{text}'")
    return value


def configs_from_args(args: argparse.Namespace) -> tuple[EPTSConfig, Runtime]:
    """The method's hyper-parameters and the runtime options, and every plain number checked."""
    groups = tuple(zip([0.0] + args.groups[:-1], args.groups))
    low = EPTSConfig().low_check_sparsity
    if not groups[0][0] < low <= groups[0][1]:  # other --groups: the paper's 0.3 is 3/4 of group 0 = (0, 0.4]
        low = 0.75 * groups[0][1]
    rank = {} if args.rank is None else {"rank": args.rank}
    cfg = recipe_config(args.recipe, groups=groups, mixer=tuple(args.mixer), epochs=args.epochs, lr=args.lr,
                        batch_size=args.batch_size, seed=args.seed, low_check_sparsity=low, nm_train=args.nm_train,
                        **rank)
    validate_config(cfg)
    for flag, value, least in (("--nsamples", args.nsamples, 1), ("--seqlen", args.seqlen, 2),
                               ("--eval-batch-size", args.eval_batch_size, 1), ("--eval-tokens", args.eval_tokens, 2)):
        if value is not None and value < least:
            raise EPTSError(f"{flag} must be at least {least}, got {value}")
    runtime = DistributedRuntime if world_size() > 1 else Runtime  # torchrun: the groups split over ranks
    return cfg, runtime(amp=not args.no_amp, cuda_graph=not args.no_cuda_graph, reference_loop=args.reference_loop,
                        low_memory=args.low_memory, infer_chunk=2 if args.low_memory else Runtime.infer_chunk)


def check_sparsities(args: argparse.Namespace, groups: Sequence[tuple[float, float]],
                     schedule: Sequence[float] | None = None, warn_above: bool = True) -> None:
    """Every sparsity the run will apply lies in [0, 1); a dedicated run's in the trained groups. EPTS above
    its top group deploys the mask alone (as the authors' code), with a warning (`warn_above`)."""
    if args.pattern != "unstructured" and args.schedule != "uniform":
        raise EPTSError("--pattern N:M puts one pattern in every block: use it with --schedule uniform")
    if args.sparse24 and args.pattern != "2:4":
        raise EPTSError("--sparse24 runs the 2:4 row through the 2:4 kernels: use it with --pattern 2:4 (an exported "
                        "2:4 model: --method magnitude --pattern 2:4 keeps its weights)")
    asked = [pattern(s)[0] for s in list(schedule or targets_of(args)) + (
        [args.export_sparsity] if args.export_sparsity is not None else [])]
    for s in asked:
        if not (math.isfinite(s) and 0 <= s < 1):
            raise EPTSError(f"sparsity {s} is outside [0, 1)")
        if args.method == "dedicated":
            group_of(s, groups)
    above = sorted({s for s in asked if s > groups[-1][1]})
    if args.method == "epts" and above and warn_above:
        warn(f"sparsities {above} lie above the trained range (0, {groups[-1][1]}]: the mask alone is deployed there")


def targets_of(args: argparse.Namespace) -> list[float | str]:
    return args.sparsities if args.pattern == "unstructured" else [args.pattern]


def check_patterns(args: argparse.Namespace, model: nn.Module) -> None:
    """An N:M pattern needs every pruned linear's input size divisible by M (checked before any work)."""
    for s in targets_of(args) + [args.export_sparsity]:
        m = pattern(s)[1] if s is not None else None
        bad = [k for k, lin in pruned_linears(model).items() if m and lin.in_features % m]
        if bad:
            raise EPTSError(f"pattern {s}: '{bad[0]}' has {pruned_linears(model)[bad[0]].in_features} inputs, "
                            f"not a multiple of {m}")


def inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies below it (both made absolute, links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def writable_folder(folder: str, flag: str) -> None:
    """Prove `folder` writable with a temporary file, creating nothing (a new folder is made when its output is
    written, so the nearest existing folder above it is tried); else one line with the OS's reason."""
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
        if isinstance(e, FileNotFoundError):  # e.g. /proc: the folder exists, its file system takes no new files
            why = f"the folder exists, but creating a file in it fails: {why}; not a writable file system"
        raise EPTSError(f"{flag}: cannot write to '{folder}' ({why})") from e


def check_outputs(args: argparse.Namespace) -> str | None:
    """Before any work: refuse every output that would destroy data (the model's own folder, another output,
    an existing file or non-empty folder without --overwrite) or could not be written. Returns the checkpoint
    path, named after --save so two runs in one folder never share one."""
    model_dir = args.model if os.path.exists(args.model) else None  # a folder, or a .gguf file
    files = {flag: p for flag, p in (("--save", args.save), ("--json-out", args.json_out)) if p}
    if len(files) == 2 and os.path.realpath(args.save) == os.path.realpath(args.json_out):
        raise EPTSError("--save and --json-out name the same file")
    for flag, path in files.items():
        if model_dir and inside(path, model_dir):
            raise EPTSError(f"{flag} '{path}' lies inside the model folder '{args.model}': refusing to write there")
        if args.export_dir and inside(path, args.export_dir):
            raise EPTSError(f"{flag} '{path}' lies inside --export-dir '{args.export_dir}'")
        if os.path.isdir(path) or (os.path.exists(path) and not args.overwrite):
            raise EPTSError(f"{flag} '{path}' exists{' as a folder' if os.path.isdir(path) else ''}; "
                            "choose a new file name" + ("" if os.path.isdir(path) else " or pass --overwrite"))
        writable_folder(os.path.dirname(os.path.abspath(path)), flag)
    path = args.export_dir
    if bool(path) != (args.export_sparsity is not None):
        raise EPTSError("--export-sparsity and --export-dir go together")
    if path:  # a new or empty folder (non-empty with --overwrite), never the model's own folder
        if model_dir and (inside(path, model_dir) or inside(model_dir, path)):
            raise EPTSError(f"--export-dir '{path}' would overwrite the model folder '{args.model}'")
        if os.path.isdir(path) and os.listdir(path) and not args.overwrite:
            raise EPTSError(f"--export-dir '{path}' is not empty; choose a new folder or pass --overwrite")
        earlier_export(path)
        writable_folder(path, "--export-dir")
    return checkpoint_path(args, model_dir)


EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja")


def earlier_export(folder: str) -> list[str]:
    """The files of an earlier export in `folder` (EXPORT_FILES), which --overwrite removes before the new export
    is written; any other file or folder there is refused by name, so nothing else is ever deleted."""
    import fnmatch
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    other = [n for n in names if not (os.path.isfile(os.path.join(folder, n))
                                      and any(fnmatch.fnmatchcase(n, p) for p in EXPORT_FILES))]
    if other:
        raise EPTSError(f"--export-dir '{folder}' holds {', '.join(other[:3])}{' ...' if len(other) > 3 else ''}, "
                        "which no export writes: --overwrite replaces an earlier export only; remove them or "
                        "choose a new folder")
    return names


def checkpoint_file(args: argparse.Namespace) -> str | None:
    """<--save>.checkpoint (in --checkpoint-dir if given, else beside --save), or epts.checkpoint in a
    --checkpoint-dir without --save; None when the run writes no checkpoint."""
    if args.method != "epts" or args.load or not (args.checkpoint_dir or args.save):
        return None
    name = os.path.basename(args.save) + ".checkpoint" if args.save else "epts.checkpoint"
    return os.path.join(args.checkpoint_dir or os.path.dirname(os.path.abspath(args.save)), name)


def checkpoint_path(args: argparse.Namespace, model_dir: str | None = None) -> str | None:
    """The checkpoint file, checked: writable, outside the model folder, and an existing one is only ever
    continued (--resume), never replaced by another run."""
    path = checkpoint_file(args)
    if path is None:
        if args.resume:
            raise EPTSError("--resume needs --save or --checkpoint-dir (where the checkpoint lives) and --method epts")
        return None
    if model_dir and inside(path, model_dir):
        raise EPTSError(f"the checkpoint '{path}' would lie inside the model folder '{args.model}'")
    writable_folder(os.path.dirname(path), "--checkpoint-dir" if args.checkpoint_dir else "--save")
    if os.path.exists(path) and not args.resume:
        raise EPTSError(f"a checkpoint of an interrupted run exists at '{path}': pass --resume to continue it, "
                        "or remove it")
    if args.resume and not os.path.exists(path):
        warn(f"--resume: no checkpoint at '{path}', starting from block 0")
    return path


def load_artifact(args: argparse.Namespace, model: nn.Module) -> ElasticState:
    """--load: the elastic state, checked against the model (weights and, with a warning, their dtype)."""
    state = load_elastic(args.load)
    if state.fingerprint:
        check_fingerprint(state, model, args.model)
    else:  # optimized by the plain paths (no Runtime), which record neither fingerprint nor dtype
        warn(f"the elastic state records no fingerprint of its base model: not checked against '{args.model}'")
    if state.base_dtype and state.base_dtype != weight_dtype(model):
        warn(f"the elastic state was optimized on {state.base_dtype} weights, this model holds "
             f"{weight_dtype(model)}: a few mask positions may differ; load with --dtype "
             f"{state.base_dtype.replace('torch.', '')} for the same masks")
    return state


def optimize_and_save(args: argparse.Namespace, model: nn.Module, windows: torch.Tensor, cfg: EPTSConfig,
                      runtime: Runtime, device: torch.device, checkpoint: str | None) -> tuple[ElasticState, float]:
    """Optimize the elastic state; --save writes it and removes the then finished checkpoint."""
    t0 = time.perf_counter()
    state = optimize(model, windows, cfg, device, args.model, replace(runtime, verbose=not args.quiet,
                     checkpoint=checkpoint, resume=args.resume, base_model=args.model))
    seconds = time.perf_counter() - t0
    if args.save and process_rank() == 0:
        save_elastic(state, args.save, getattr(torch, args.save_dtype), seqlen=windows.shape[-1])
        state = load_elastic(args.save)  # evaluate what was saved: --load prints the same numbers
        if checkpoint and os.path.isfile(checkpoint):
            os.remove(checkpoint)  # the run is complete: the artifact replaces the checkpoint
    return state, seconds


def export(args: argparse.Namespace, model: nn.Module, tokenizer, dense: dict[str, torch.Tensor], how: dict) -> None:
    """--export-sparsity: `--method`'s model at that sparsity as a plain transformers model, in the
    checkpoint's own dtype unless --export-dtype says otherwise; checked for NaN and for having been written."""
    sparsify(model, args.method, args.export_sparsity, dense, **how)
    if not all(bool(torch.isfinite(lin.weight).all()) for lin in pruned_linears(model).values()):
        raise EPTSError("the model to export holds non-finite weights; nothing was written")
    home = next(model.parameters()).dtype
    dtype = getattr(torch, args.export_dtype) if args.export_dtype != "auto" else checkpoint_dtype(args.model, home)
    for name in earlier_export(args.export_dir):  # --overwrite: no file of the earlier export may remain
        os.remove(os.path.join(args.export_dir, name))
    model.to(dtype)  # back below: a checkpoint loaded into fp32 from fp16/bf16 goes back and forth exactly
    try:
        model.save_pretrained(args.export_dir)
        tokenizer.save_pretrained(args.export_dir)
    finally:
        model.to(home)
    written = os.listdir(args.export_dir)
    if "config.json" not in written or not any(f.endswith(".safetensors") for f in written):
        raise EPTSError(f"the export to '{args.export_dir}' was not written completely (found {sorted(written)})")
    print(f"exported {args.method} at sparsity {args.export_sparsity} (achieved {measured_sparsity(model):.4f}, "
          f"{str(dtype).replace('torch.', '')}) to {args.export_dir}")
    restore_dense(model, dense)


def checkpoint_dtype(name: str, fallback: torch.dtype) -> torch.dtype:
    """The dtype the checkpoint stores its weights in (config.json), whatever it was loaded in."""
    from transformers import AutoConfig
    if name.endswith(".gguf"):  # de-quantized GGUF weights are exact in fp32 only
        return torch.float32
    saved = getattr(AutoConfig.from_pretrained(name), "dtype", None)
    return getattr(torch, saved) if isinstance(saved, str) else (saved or fallback)


def sparsity_plan(args: argparse.Namespace, model: nn.Module, dense: dict[str, torch.Tensor],
                  schedule_file: list[float] | None, how: dict) -> tuple[list[float], Callable | None]:
    """(targets, schedule) for sweep: the --sparsities, an OWL schedule around each, or one schedule file."""
    state = how["state"]
    if schedule_file is not None:
        return [sum(schedule_file) / len(schedule_file)], lambda target: schedule_file
    if args.schedule == "owl":
        norms = state.act_norms if state is not None else dense_act_norms(model, how["windows"], how["device"])
        limits = (0.0, state.groups[-1][1]) if state is not None else (0.0, 1.0)
        return args.sparsities, lambda target: owl_sparsities(dense, norms, target, limits=limits)
    return targets_of(args), None


def run(args: argparse.Namespace) -> dict:
    """The command line's job. Everything that can be checked is checked before any work; then optimize (or
    load), optionally export, and sweep the sparsities, printing each row as soon as it is evaluated."""
    cfg, runtime = configs_from_args(args)
    check_sparsities(args, cfg.groups, warn_above=False)  # the groups may still come from --load: warned below
    if world_size() > 1 and (args.method != "epts" or args.load):
        raise EPTSError(f"torchrun splits EPTS's optimization over ranks; --method {args.method}"
                        f"{' --load' * bool(args.load)} runs in one process: python epts.py")
    slices = len(cfg.groups) + (cfg.nm_train is not None)  # Phase 1's group slices, what torchrun's ranks split
    device = start_ranks(pick_device(args.device), slices)
    header = check_inputs(args, device)
    checkpoint = check_outputs(args)
    model, tokenizer = load_model(args.model, args.dtype, device, args.trust_remote_code, not args.quiet)
    check_patterns(args, model)
    schedule_file = load_schedule(args.schedule, len(decoder_blocks(model)))
    seqlen = eval_seqlen(args, model, header)
    state = load_artifact(args, model) if args.load else None
    check_sparsities(args, state.groups if state is not None else cfg.groups, schedule_file)
    needs_calib = not (args.method == "epts" and state is not None) and not (
        args.method == "magnitude" and args.schedule != "owl")
    windows = calibration_windows(tokenizer, args.calib, args.nsamples, seqlen, args.seed) if needs_calib else None
    tokens = load_eval_tokens(args, tokenizer, seqlen)  # before any optimization: a bad --eval fails now
    config = {**vars(args), "seqlen": seqlen}
    if state is not None:  # what the loaded artifact was made with, not what the command line says
        config.update(groups=[hi for _, hi in state.groups], mixer=state.mixer, rank=state.rank,
                      recipe="tuned" if state.group0_ramp else "paper")
    result = {"model": args.model, "method": args.method, "config": config, "dense": {}, "results": [],
              "optimize_seconds": 0.0}
    if args.method == "epts" and state is None:
        state, result["optimize_seconds"] = optimize_and_save(args, model, windows, cfg, runtime, device, checkpoint)
        result.update(world_size=world_size(), groups_by_rank=groups_by_rank(slices, world_size()))
        if end_ranks():
            return result  # only rank 0 evaluates, exports and writes
    if state is not None:
        result["low_group_enabled"] = state.low_group_enabled
    dense = snapshot_linears(model)
    how = dict(windows=windows, state=state, cfg=cfg, device=device, verbose=not args.quiet, runtime=runtime,
               base_model=args.model)
    if args.export_sparsity is not None:
        export(args, model, tokenizer, dense, how)
    if tokens:
        evaluate_and_report(args, model, tokens, seqlen, dense, schedule_file, how, result)
    if args.json_out:  # also without --eval: the optimization's seconds and the low-group flags
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)  # made now, not up front
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


def check_inputs(args: argparse.Namespace, device: torch.device) -> dict:
    """Before the model loads: --save where nothing is optimized, a --model path, --eval or --calib file that does
    not exist, a folder holding a GGUF file, a --load that is no elastic state; a warning for fp16 on the CPU.
    Returns --load's header ({})."""
    if args.save and (args.method != "epts" or args.load):
        raise EPTSError("--save writes the elastic state that --method epts optimizes; "
                        + ("with --load nothing is optimized" if args.load else f"--method {args.method} has none"))
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
            raise EPTSError(f"--model '{name}' has no config.json but holds {ggufs[0]}: pass that file as --model")
    sources = [("--eval", e, ("wikitext2", "c4", "none")) for e in args.eval]
    for flag, source, known in sources + ([] if args.load else [("--calib", args.calib, ("c4", "wikitext2"))]):
        if source not in known and not os.path.isfile(source):
            raise EPTSError(f"{flag} '{source}' is neither {', '.join(known)} nor a text file")
    if args.dtype == "float16" and device.type == "cpu":
        warn("--dtype float16 on the CPU is very slow (few CPU kernels are fast in fp16): float32, the CPU's "
             "default, takes a fraction of the time")
    return state_header(args.load) if args.load else {}


def eval_seqlen(args: argparse.Namespace, model: nn.Module, header: dict) -> int:
    """--seqlen; without it, the seqlen a loaded state was optimized at (or, with a warning, none recorded), else
    min(2048, max_position_embeddings); never above the model's positions."""
    max_pos = getattr(model.config, "max_position_embeddings", None)
    seqlen = args.seqlen or header.get("seqlen") or min(2048, max_pos or 2048)
    if args.load and not (args.seqlen or header.get("seqlen")):
        warn(f"--load: the elastic state does not record its --seqlen; evaluating at {seqlen} tokens per window "
             "(perplexity depends on it: pass --seqlen)")
    if max_pos is not None and seqlen > max_pos:
        raise EPTSError(f"--seqlen {seqlen} is above the model's max_position_embeddings {max_pos}")
    return seqlen


def load_eval_tokens(args: argparse.Namespace, tokenizer, seqlen: int) -> dict[str, torch.Tensor]:
    """Every --eval text, tokenized (and cut to --eval-tokens); each must hold at least one window."""
    tokens = {}
    for e in (e for e in args.eval if e != "none"):
        tokens[e] = eval_tokens(tokenizer, e, seqlen)[: args.eval_tokens]
        if tokens[e].numel() < seqlen:
            raise EPTSError(f"--eval '{e}' has {tokens[e].numel()} tokens, fewer than one window of {seqlen}")
    return tokens


def evaluate_and_report(args: argparse.Namespace, model: nn.Module, tokens: dict[str, torch.Tensor], seqlen: int,
                        dense: dict[str, torch.Tensor], schedule_file: list[float] | None, how: dict,
                        result: dict) -> None:
    """Dense perplexity, then the method at every sparsity; each table row printed when it is ready."""
    short = {e: os.path.basename(e.rstrip("/")) or e for e in tokens}  # --eval's names in the progress bars and table

    def evaluate(sparsity: float) -> dict[str, float]:
        model.to(how["device"])
        if args.sparse24 and sparsity == "2:4":  # swapped for this row only: the next sparsify writes the weights
            report = sparse24(model, args.eval_batch_size * seqlen)
            result["sparse24"] = asdict(report)
            print(report.summary(), flush=True)
        ppl = {e: perplexity(model, t, seqlen, how["device"], args.eval_batch_size, not args.quiet,
                             desc=f"ppl {short[e]} s={sparsity}") for e, t in tokens.items()}
        unsparse24(model)
        if args.method != "epts":
            model.cpu()  # the pruning loops keep the model where it was loaded and move one block at a time
        return ppl

    def table_row(r: dict) -> str:  # sparsity, achieved sparsity, one perplexity per --eval, deploy seconds
        s = r["sparsity"] if isinstance(r["sparsity"], str) else f"{r['sparsity']:.2f}"
        ppl = " ".join(f"{r['ppl'][e]:>14.3f}" for e in tokens)
        return f"{s:>8} {r['achieved_sparsity']:>9.4f} {ppl} {r['seconds']:>8.1f}"

    targets, schedule = sparsity_plan(args, model, dense, schedule_file, how)
    result["dense"] = evaluate(0.0)
    print(f"\n{args.method} on {args.model} (seqlen {seqlen}, schedule {args.schedule}); "
          f"optimize {result['optimize_seconds']:.1f}s")
    # `deploy s` is the time to set a row's weights (pruning, for a baseline), not to evaluate
    head = f"{'sparsity':>8} {'achieved':>9} " + " ".join(f"{short[e][:14]:>14}" for e in tokens) + f" {'deploy s':>8}"
    print(head + "\n" + "-" * len(head))
    print(table_row({"sparsity": 0.0, "achieved_sparsity": 0.0, "ppl": result["dense"], "seconds": 0.0}), flush=True)
    for row in sweep(model, args.method, targets, dense, evaluate, schedule, **how):
        result["results"].append(row)
        print(table_row(row), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    if world_size() > 1 and int(os.environ.get("RANK", 0)):  # torchrun's ranks > 0 print nothing but a crash
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = lambda *exc: traceback.print_exception(*exc, file=sys.__stderr__)
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad argument (2, one line already printed)
        return int(e.code or 0)
    started = time.time()
    try:
        run(args)
    except EPTSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted{resume_hint(args, started)}", file=sys.stderr)
        return 130
    return 0


def resume_hint(args: argparse.Namespace, started: float) -> str:
    """After Ctrl-C: how to continue, when a checkpoint, or the state --save names, was written since `started`."""
    path = checkpoint_file(args)
    try:
        done = _read(path, header_only=True)[1].get("next_block", 0) if path and os.path.isfile(path) else None
    except EPTSError:
        done = None
    if done is not None:
        return f": {done} finished block(s) are saved in '{path}'; run the same command with --resume to continue"
    if path and args.save and os.path.isfile(args.save) and os.path.getmtime(args.save) >= started:
        return (f": the elastic state is saved in '{args.save}'; the same command with --load {args.save} instead "
                f"of --save continues from it without optimizing again")
    return ""


if __name__ == "__main__":
    sys.exit(main())
