"""Does 2:4 semi-structured sparsity save time on this GPU, and where does the fixed per-call cost come from?

    python bench/nm_speed.py                                # on the GPU machine; writes bench/nm_speed.json
    python bench/nm_speed.py --tiny --out /tmp/nm_tiny.json # seconds-long smoke test (the CPU fallback too)

For the linears of LLaMA-7B (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008; out x in), bf16, at
`--tokens` tokens, the dense F.linear (cuBLAS) is timed against 2:4 forms of the same pruned weight (2 smallest
|W| of every 4 consecutive inputs of a row zeroed):

    ss_default     F.linear(x, torch.sparse.to_sparse_semi_structured(W))   (documented path, default backend)
    ss_cutlass     the same with SparseSemiStructuredTensor._FORCE_CUTLASS = True
    ss_searched    to_sparse_semi_structured(W, alg_id=<searched>)
    cslt_nt        torch._cslt_sparse_mm(Wc, x.t())                          -> W x^T  [out, tokens]
    cslt_t         torch._cslt_sparse_mm(Wc, x.t(), transpose_result=True)  -> x W^T  [tokens, out]
    cslt_*_search  the same with the searched (alg_id, split_k, split_k_mode) of that orientation
    cslt_xT_contig torch._cslt_sparse_mm(Wc, xT) with xT = x.t().contiguous() made beforehand (layout only)
    graph_dense / graph_cslt   dense and the best eager cuSPARSELt call replayed in a CUDA graph: GPU time only,
                   no per-call host work (descriptor/plan creation happens once, at capture)

Per variant: ms (median of CUDA-event pairs around back-to-back calls: max(host, GPU) per call), host_ms (CPU
time of one call on an idle queue), first_ms (first call incl. sync), the relative error against the dense
matmul of the pruned weight, and dense/sparse. A torch.profiler pass lists the kernels and CUDA runtime calls
of one call of each path, and a busy-GPU test tells whether a call blocks the host. Break-even = the smallest
measured token count where the best eager 2:4 variant beats dense (also for CUDA-graph replay, and for the
7 linears of a block together).

Whole block, at `--block-batch` x `--block-seqlen` tokens (default 8 x 2048 = 16384). The 2:4 layer used there is
`Sparse24Linear` (built by `sparse24_layer`): one _cslt_sparse_mm per call, a fixed column-major operand x2d.t()
(so the searched config stays valid) and always a contiguous [..., out] output, either written transposed by
the kernel (out_layout="fused", transpose_result=True) or copied from W x^T (out_layout="copy"). Its docstring
says why the plain `_cslt_sparse_mm(Wc, x.t()).t()` view is slow inside a block.

    layer_forms  each distinct linear alone on the block's [batch, seqlen, in] activation: dense vs
                 Sparse24Linear fused/copy x searched/default config, eager and graph; the fastest per shape
                 (GPU time) is the `24_best` form
    block        one LLaMA-7B decoder block: dense, 24_documented (to_sparse_semi_structured + F.linear),
                 24_documented_contig (its output made contiguous), 24_fused, 24_copy, 24_best; each eager and
                 replayed from a CUDA graph (`*_graph`), rel err against the dense block of the same pruned
                 weights, per-layer config actually used (a searched config refused by cuSPARSELt on the exact
                 call falls back to the default and says so), per-linear input/output strides, and a GPU-time
                 profile by kernel kind (gemm, sparse_gemm, attention, softmax, copy, other)
    model2       a 2-layer LLaMA-7B-shaped model prefill (last-token logits): dense vs 24_best, eager and graph

Every failure is recorded in the JSON as an "error" entry; the run goes on. Without CUDA (or with --tiny)
everything runs on tiny shapes; the semi-structured variants are "needs CUDA".
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402

LLAMA_7B = dict(hidden=4096, ffn=11008, heads=32, kv_heads=32, vocab=32000)
TINY = dict(hidden=64, ffn=176, heads=4, kv_heads=4, vocab=128)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
EAGER_SPARSE = ("ss_default", "ss_cutlass", "ss_searched", "cslt_nt", "cslt_t", "cslt_nt_search",
                "cslt_t_search", "cslt_xT_contig")
CHECK_TOL = 2e-2    # max |sparse - dense| / max |dense|, both bf16 outputs of the same pruned weight
BLOCK_TOL = 5e-2


def linear_shapes(dims: dict) -> dict:
    """Distinct (out, in) linear shapes of one decoder block and how many linears of the block have each."""
    h, f = dims["hidden"], dims["ffn"]
    return {"qkvo": dict(out=h, inp=h, count=4, layers="q/k/v/o_proj"),
            "gate_up": dict(out=f, inp=h, count=2, layers="gate/up_proj"),
            "down": dict(out=h, inp=f, count=1, layers="down_proj")}


def shape_of(name: str) -> str:
    """Which entry of linear_shapes a LLaMA linear name belongs to."""
    return "qkvo" if "self_attn" in name else ("down" if "down" in name else "gate_up")


def prune_24(W: torch.Tensor) -> torch.Tensor:
    """Zero the 2 smallest |w| of every group of 4 consecutive input weights of each row."""
    out, inp = W.shape
    groups = W.reshape(out, inp // 4, 4)
    drop = groups.abs().float().argsort(dim=-1)[..., :2]
    keep = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
    return (groups * keep).reshape(out, inp)


def check_24(W: torch.Tensor) -> dict:
    """Is W a 2:4 pattern: at most 2 non-zeros in every group of 4 consecutive inputs of a row."""
    nz = (W.reshape(W.shape[0], -1, 4) != 0).sum(-1)
    return dict(ok=bool((nz <= 2).all()), max_nonzeros_per_group=int(nz.max()),
                groups_with_exactly_2=float((nz == 2).float().mean()), density=float((W != 0).float().mean()))


def first_line(e: BaseException) -> str:
    """A short one-line form of an exception for the JSON."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:400]


def sync(cuda: bool) -> None:
    """Wait for the GPU (no-op on the CPU)."""
    if cuda:
        torch.cuda.synchronize()


def time_fn(fn, warmup: int, reps: int, cuda: bool) -> dict:
    """Median ms per call (CUDA events around back-to-back calls, or wall clock on the CPU), host ms, first call."""
    sync(cuda)
    t0 = time.perf_counter()
    fn()
    sync(cuda)
    first = (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        fn()
    sync(cuda)
    if cuda:
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            s.record()
            fn()
            e.record()
        sync(cuda)
        times = [s.elapsed_time(e) for s, e in ev]
    else:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    host = []
    for _ in range(min(reps, 10)):   # host cost of one call with an empty queue: what the CPU spends per call
        sync(cuda)
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
    sync(cuda)
    return dict(ms=statistics.median(times), min_ms=min(times), host_ms=statistics.median(host), first_ms=first)


def graphed(fn):
    """Capture fn() in a CUDA graph; returns a callable that replays it and returns the static output."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out
    return replay


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref| in fp32."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30))


def cslt_arg_names() -> set:
    """Argument names of torch._cslt_sparse_mm in this torch (alg_id / split_k / split_k_mode vary by version)."""
    try:
        return {a.name for a in torch.ops.aten._cslt_sparse_mm.default._schema.arguments}
    except Exception:  # noqa: BLE001 - an old or CPU-only build without the op
        return set()


def cslt_kwargs(cfg: dict, names: set) -> dict:
    """Keyword arguments of _cslt_sparse_mm for a searched configuration, limited to what this torch accepts."""
    kw = {"alg_id": int(cfg["alg_id"])} if "alg_id" in names else {}
    if "split_k" in names and cfg.get("split_k") is not None:
        kw["split_k"] = int(cfg["split_k"])
    mode = cfg.get("split_k_mode")
    if "split_k_mode" in names and isinstance(mode, int) and not isinstance(mode, bool):
        kw["split_k_mode"] = mode
    elif "split_k_one_kernel" in names and isinstance(mode, bool):
        kw["split_k_one_kernel"] = mode
    return kw


def search_config(packed: torch.Tensor, B: torch.Tensor, transpose_result: bool) -> dict:
    """The fastest cuSPARSELt configuration for this matmul: alg_id, and split_k where this torch reports it."""
    t0 = time.perf_counter()
    binding = getattr(getattr(torch._C, "_cusparselt", None), "mm_search", None)
    if binding is not None:   # returns (alg_id, split_k, split_k_mode, max_alg_id); the op below only alg_id
        alg, split_k, mode, max_alg = binding(packed, B, None, None, None, transpose_result)
        cfg = dict(alg_id=int(alg), split_k=int(split_k), split_k_mode=mode, max_alg_id=int(max_alg),
                   api="torch._C._cusparselt.mm_search")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            alg = torch._cslt_sparse_mm_search(packed, B, transpose_result=transpose_result)
        cfg = dict(alg_id=int(alg), api="torch._cslt_sparse_mm_search")
    torch.cuda.synchronize()
    cfg["search_s"] = time.perf_counter() - t0
    return cfg


def to_semi_structured(W: torch.Tensor, alg_id: int | None = None, cutlass: bool = False):
    """torch.sparse.to_sparse_semi_structured(W) with an optional alg_id; restores the CUTLASS flag after."""
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        if alg_id is None:
            return to_sparse_semi_structured(W)
        if "alg_id" not in inspect.signature(to_sparse_semi_structured).parameters:
            raise RuntimeError("to_sparse_semi_structured has no alg_id argument in this torch")
        return to_sparse_semi_structured(W, alg_id=alg_id)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old


def run_variant(name: str, build, ref: torch.Tensor, a: argparse.Namespace, cuda: bool) -> dict:
    """Build one variant (a call and a function putting its output as [tokens, out]), time it, check it."""
    row = dict(variant=name)
    try:
        fn, as_rows, extra = build()
        row.update(extra)
        row.update(time_fn(fn, a.warmup, a.reps, cuda))
        err = rel_err(as_rows(fn()), ref)
        row.update(rel_err=err, ok=err <= CHECK_TOL)
    except Exception as e:  # noqa: BLE001 - a backend refusing this GPU is a result, not a crash
        row["error"] = first_line(e)
    return row


def cslt_builders(W: torch.Tensor, x: torch.Tensor, packed, cfgs: dict, names: set) -> dict:
    """Builders of the direct cuSPARSELt variants (each raises the compress error if compression failed)."""
    def need():
        if isinstance(packed, BaseException):
            raise packed
        return packed

    def plain(transpose_result: bool, search: str | None):
        def build():
            Wc = need()
            cfg = cfgs.get(search) if search else None
            if search and (cfg is None or "error" in cfg):
                raise RuntimeError(f"no searched configuration: {cfg and cfg.get('error')}")
            kw = dict(cslt_kwargs(cfg, names) if cfg else {})
            xt = x.t()
            fn = lambda: torch._cslt_sparse_mm(Wc, xt, transpose_result=transpose_result, **kw)  # noqa: E731
            as_rows = (lambda y: y) if transpose_result else (lambda y: y.t())
            return fn, as_rows, dict(config=dict(transpose_result=transpose_result, **kw))
        return build

    def contiguous_xT():
        Wc, xT = need(), x.t().contiguous()
        return (lambda: torch._cslt_sparse_mm(Wc, xT)), (lambda y: y.t()), dict(config=dict(dense_B="contiguous"))

    return {"cslt_nt": plain(False, None), "cslt_t": plain(True, None), "cslt_nt_search": plain(False, "nt"),
            "cslt_t_search": plain(True, "t"), "cslt_xT_contig": contiguous_xT}


def ss_builders(W: torch.Tensor, x: torch.Tensor, cfgs: dict) -> dict:
    """Builders of the documented torch.sparse path: default backend, forced CUTLASS, searched alg_id."""
    def make(cutlass: bool = False, searched: bool = False):
        def build():
            alg = None
            if searched:
                cfg = cfgs.get("t")
                if cfg is None or "error" in cfg:
                    raise RuntimeError(f"no searched configuration: {cfg and cfg.get('error')}")
                alg = cfg["alg_id"]
            Ws = to_semi_structured(W, alg, cutlass)
            extra = dict(backend=type(Ws).__name__, config=dict(alg_id=alg) if searched else {})
            return (lambda: F.linear(x, Ws)), (lambda y: y), extra
        return build
    return {"ss_default": make(), "ss_cutlass": make(cutlass=True), "ss_searched": make(searched=True)}


def searches(packed, x: torch.Tensor, budget: dict, previous: dict) -> dict:
    """Searched configs for both orientations; past the time budget the previous token count's are reused."""
    if isinstance(packed, BaseException):
        return {k: dict(error=first_line(packed)) for k in ("nt", "t")}
    out = {}
    for key, tr in (("nt", False), ("t", True)):
        if budget["left"] <= 0 and key in previous:
            out[key] = dict(previous[key], reused="search budget spent: config of the previous token count")
            continue
        try:
            out[key] = search_config(packed, x.t(), tr)
            budget["left"] -= out[key]["search_s"]
        except Exception as e:  # noqa: BLE001
            out[key] = dict(error=first_line(e))
    return out


def best_eager(rows: list[dict]) -> dict | None:
    """The fastest correct eager 2:4 variant of one (shape, tokens)."""
    ok = [r for r in rows if r["variant"] in EAGER_SPARSE and r.get("ok")]
    return min(ok, key=lambda r: r["ms"]) if ok else None


def bench_kernels(a: argparse.Namespace, dims: dict, device: torch.device, cuda: bool) -> tuple[list, dict, dict]:
    """Time every variant for every distinct linear shape and token count; returns rows, searches, mask checks."""
    gen = torch.Generator(device=device).manual_seed(0)
    names, rows, found, masks = cslt_arg_names(), [], {}, {}
    budget = dict(left=a.search_budget)
    for shape, s in linear_shapes(dims).items():
        W = (torch.randn(s["out"], s["inp"], generator=gen, device=device) * s["inp"] ** -0.5).to(torch.bfloat16)
        W24 = prune_24(W)
        masks[shape] = check_24(W24)
        packed = None
        if cuda:
            try:
                packed = torch._cslt_compress(W24)
            except Exception as e:  # noqa: BLE001
                packed = e
        previous = {}
        for T in a.tokens:
            x = torch.randn(T, s["inp"], generator=gen, device=device, dtype=torch.bfloat16)
            ref = F.linear(x, W24)
            here = [run_variant("dense", lambda: ((lambda: F.linear(x, W24)), (lambda y: y), {}), ref, a, cuda)]
            if cuda:
                cfgs = searches(packed, x, budget, previous)
                previous = {k: v for k, v in cfgs.items() if "error" not in v}
                found[f"{shape}@{T}"] = cfgs
                builders = {**ss_builders(W24, x, cfgs), **cslt_builders(W24, x, packed, cfgs, names)}
                here += [run_variant(n, builders[n], ref, a, cuda) for n in EAGER_SPARSE]
                here += graph_rows(here, builders, x, W24, ref, a)
            else:
                here += [dict(variant=n, skipped="needs CUDA") for n in EAGER_SPARSE + ("graph_dense", "graph_cslt")]
            dense_ms = here[0].get("ms")
            for r in here:
                r.update(shape=shape, tokens=T, out=s["out"], inp=s["inp"])
                if dense_ms and r.get("ms") and r["variant"] != "dense":
                    base = next((g.get("ms") for g in here if g["variant"] == "graph_dense"), None) \
                        if r["variant"] == "graph_cslt" else dense_ms
                    if base:
                        r["ratio"] = base / r["ms"]    # dense / sparse: > 1 means 2:4 is faster
            rows += here
            print(f"  {shape:8s} T={T:6d}: dense {dense_ms:.3f} ms" + "".join(
                f", {r['variant']} {r['ms']:.3f}" for r in here[1:] if r.get("ms")), flush=True)
            del x, ref
        del W, W24, packed
        if cuda:
            torch.cuda.empty_cache()
    return rows, found, masks


def graph_rows(here: list, builders: dict, x: torch.Tensor, W24: torch.Tensor, ref: torch.Tensor,
               a: argparse.Namespace) -> list:
    """Dense and the fastest eager cuSPARSELt call, each replayed from a CUDA graph (GPU time only)."""
    cslt = [r for r in here if r["variant"].startswith("cslt_") and r.get("ok")]
    rows = [run_variant("graph_dense", lambda: (graphed(lambda: F.linear(x, W24)), (lambda y: y), {}), ref, a, True)]
    if not cslt:
        return rows + [dict(variant="graph_cslt", error="no working cuSPARSELt variant to capture")]
    pick = min(cslt, key=lambda r: r["ms"])

    def build():
        fn, as_rows, extra = builders[pick["variant"]]()
        return graphed(fn), as_rows, dict(extra, captured=pick["variant"])
    return rows + [run_variant("graph_cslt", build, ref, a, True)]


def break_even(rows: list[dict], dims: dict, tokens: list[int]) -> dict:
    """Smallest measured token count where 2:4 beats dense: per shape (eager, CUDA graph) and for a whole block."""
    at = {(r["shape"], r["tokens"], r["variant"]): r for r in rows}
    out, shapes = {}, linear_shapes(dims)
    for shape in shapes:
        eager = graph = None
        for T in tokens:
            d, b = at.get((shape, T, "dense"), {}).get("ms"), best_eager([r for (s, t, _), r in at.items()
                                                                          if s == shape and t == T])
            if eager is None and d and b and b["ms"] < d:
                eager = T
            g_d, g_s = at.get((shape, T, "graph_dense"), {}), at.get((shape, T, "graph_cslt"), {})
            if graph is None and g_d.get("ms") and g_s.get("ok") and g_s["ms"] < g_d["ms"]:
                graph = T
        out[shape] = dict(eager=eager, cuda_graph=graph)
    per_T = {}
    for T in tokens:   # the 7 linears of one block: count-weighted sums of dense vs the best 2:4 per shape
        dense = sparse = 0.0
        for shape, s in shapes.items():
            d = at.get((shape, T, "dense"), {}).get("ms")
            b = best_eager([r for (sh, t, _), r in at.items() if sh == shape and t == T])
            if d is None or b is None:
                dense = sparse = None
                break
            dense, sparse = dense + s["count"] * d, sparse + s["count"] * b["ms"]
        per_T[T] = dict(dense_ms=dense, best_24_ms=sparse, ratio=dense / sparse if dense and sparse else None)
    be = next((T for T in tokens if per_T[T]["ratio"] and per_T[T]["ratio"] > 1), None)
    out["block_linears"] = dict(eager=be, per_tokens=per_T)
    return out


def kernel_profile(fn, calls: int = 5) -> dict:
    """torch.profiler over `calls` calls: GPU kernels and the top CPU events (incl. CUDA runtime calls) per call."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels, cpu = [], []
    for e in prof.key_averages():
        if "synchronize" in e.key.lower() and e.count <= 1:
            continue   # the profiler's own synchronize after the loop
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            kernels.append(dict(name=e.key[:90], per_call=e.count / calls, gpu_us_per_call=us / calls))
        else:
            cpu.append(dict(name=e.key[:90], per_call=e.count / calls, self_cpu_us_per_call=e.self_cpu_time_total
                            / calls, cpu_us_per_call=e.cpu_time_total / calls))
    cpu.sort(key=lambda c: -c["self_cpu_us_per_call"])
    return dict(kernels=sorted(kernels, key=lambda k: -k["gpu_us_per_call"]),
                gpu_us_per_call=sum(k["gpu_us_per_call"] for k in kernels), top_cpu=cpu[:14])


def blocking_test(fn, reps: int = 5) -> dict:
    """Does a call wait for the GPU? Its host time with an idle GPU vs. right after ~10 ms of queued GPU work."""
    A = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)

    def busy():
        for _ in range(6):
            A @ A
    idle, loaded, busy_ms = [], [], []
    fn()
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        idle.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        busy()
        e.record()
        t0 = time.perf_counter()
        fn()
        loaded.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        busy_ms.append(s.elapsed_time(e))
    idle_ms, loaded_ms, queued = statistics.median(idle), statistics.median(loaded), statistics.median(busy_ms)
    return dict(host_ms_idle_gpu=idle_ms, host_ms_busy_gpu=loaded_ms, queued_gpu_ms=queued,
                blocks_host=loaded_ms - idle_ms > 0.5 * queued)


def diagnostics(a: argparse.Namespace, dims: dict, rows: list, found: dict) -> dict:
    """Profiler kernel lists and the blocking test for one call of each path, on q/k/v/o at the smallest count."""
    s, T = linear_shapes(dims)["qkvo"], min(a.tokens)
    gen = torch.Generator(device="cpu").manual_seed(1)
    W24 = prune_24((torch.randn(s["out"], s["inp"], generator=gen) * s["inp"] ** -0.5).to("cuda", torch.bfloat16))
    x = torch.randn(T, s["inp"], generator=gen).to("cuda", torch.bfloat16)
    calls = {"dense": lambda: F.linear(x, W24)}
    try:
        Ws = to_semi_structured(W24)
        calls["ss_default"] = lambda: F.linear(x, Ws)
    except Exception:  # noqa: BLE001 - already reported as a variant error
        pass
    try:
        Wc, xt = torch._cslt_compress(W24), x.t()
        calls["cslt_t"] = lambda: torch._cslt_sparse_mm(Wc, xt, transpose_result=True)
        cfg = found.get(f"qkvo@{T}", {}).get("t", {})
        if "alg_id" in cfg:
            kw = cslt_kwargs(cfg, cslt_arg_names())
            calls["cslt_t_search"] = lambda: torch._cslt_sparse_mm(Wc, xt, transpose_result=True, **kw)
    except Exception:  # noqa: BLE001
        pass
    out = dict(shape="qkvo", tokens=T, profile={}, blocking={})
    for name, fn in calls.items():
        for key, probe in (("profile", kernel_profile), ("blocking", blocking_test)):
            try:
                out[key][name] = probe(fn)
            except Exception as e:  # noqa: BLE001
                out[key][name] = dict(error=first_line(e))
    return out


# ---- whole block: the 2:4 layer, its layouts, and the block / 2-layer-model timings --------------------------

class Sparse24Linear(nn.Module):
    """Drop-in replacement of an nn.Linear whose weight is 2:4 sparse: y = x W^T (+ b) in ONE cuSPARSELt matmul.

    Built for use inside a transformer block, where the layouts around the matmul cost more than the matmul:

    * input: x [..., in] is flattened to x2d [tokens, in] -- a view when x is contiguous, otherwise one copy
      (counted in `input_copies`) -- and passed as `x2d.t()`, a column-major operand. aten's _cslt_sparse_mm
      derives its cuSPARSELt plan from that operand's layout (row-major -> op N, column-major -> op T), and an
      alg_id searched for one plan can be out of range for the other ("invalid value when calling
      cusparseLtMatmulAlgSetAttribute(... CUSPARSELT_MATMUL_ALG_CONFIG_ID ...)"). A fixed input layout is what makes
      a searched config reusable.
    * output: always a contiguous [..., out].
        out_layout="fused": _cslt_sparse_mm(..., transpose_result=True) writes x W^T row-major (no copy);
        out_layout="copy":  _cslt_sparse_mm writes W x^T [out, tokens], then its transpose is copied.
      It never returns the transposed VIEW `_cslt_sparse_mm(Wc, x2d.t()).t()` (strides (1, tokens)): every later op
      of the block would then run on that strided layout -- q/k/v reach SDPA with a head dim of stride != 1 (its
      flash / memory-efficient kernels want stride 1), RoPE/SiLU/residual kernels read strided memory, and the
      next linear gets a row-major operand (the other plan, where the searched alg_id can be invalid).
    * config: extra _cslt_sparse_mm arguments (alg_id, split_k, split_k_mode). `sparse24_layer` tries them on the
      exact call first and falls back to {} (alg_id 0, the default) when cuSPARSELt refuses them.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, out_layout: str = "fused",
                 config: dict | None = None):
        super().__init__()
        if out_layout not in ("fused", "copy"):
            raise ValueError(f"out_layout must be 'fused' or 'copy', not {out_layout!r}")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("packed", torch._cslt_compress(weight.detach().contiguous()), persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach(), persistent=False)
        self.out_layout, self.config, self.input_copies = out_layout, dict(config or {}), 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_contiguous():
            self.input_copies += 1
        x2d = x.reshape(-1, self.in_features).contiguous()   # no-op for a contiguous x
        if self.out_layout == "fused":
            y = torch._cslt_sparse_mm(self.packed, x2d.t(), transpose_result=True, **self.config)
        else:
            y = torch._cslt_sparse_mm(self.packed, x2d.t(), **self.config).t().contiguous()
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, out_layout={self.out_layout}, config={self.config}"


def sparse24_layer(weight: torch.Tensor, out_layout: str, config: dict | None, probe: torch.Tensor,
                   bias: torch.Tensor | None = None) -> tuple[nn.Module, dict]:
    """A Sparse24Linear whose config was checked on the exact call it will make (`probe`: an input of the shape and
    layout the layer will get). A config cuSPARSELt refuses, or one that changes the result, is replaced by the
    default ({} = alg_id 0). Returns (layer, {out_layout, requested, used[, fallback]})."""
    layer = Sparse24Linear(weight, bias, out_layout)
    rec = dict(out_layout=out_layout, requested=dict(config or {}), used={})
    if config:
        ref = layer(probe)
        layer.config = dict(config)
        try:
            err = rel_err(layer(probe), ref)     # .float()/max() waits for the result
            if err > CHECK_TOL:
                raise RuntimeError(f"result differs from the default config's (rel err {err:.1e})")
            rec["used"] = dict(config)
        except Exception as e:  # noqa: BLE001 - e.g. an alg_id out of this plan's range
            layer.config = {}
            rec["fallback"] = "default config used; the requested one failed: " + first_line(e)
    layer.input_copies = 0
    return layer, rec


def to_sparse24(model: nn.Module, tokens: int = 16384) -> dict:
    """Swap every pruned linear of a 2:4-exported model (`python epts.py ... --export-sparsity 2:4`) for a
    Sparse24Linear, fused (contiguous) output and a cuSPARSELt config searched for its shape at `tokens` tokens
    per call (one search per distinct shape, checked on the exact call). CUDA, bf16/fp16 model. Returns
    {"<block>.<name>": record}. This is what makes a whole block faster than dense in the table of
    bench/RESULTS.md; the plain to_sparse_semi_structured swap returns strided outputs and is slower."""
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    names, records, made, probes = epts.arch_of(model)[1], {}, {}, {}
    for i, block in enumerate(epts.decoder_blocks(model)):
        for n in names:
            lin = block.get_submodule(n)
            if not check_24(lin.weight.detach())["ok"]:
                raise ValueError(f"{i}.{n} is not 2:4 sparse: export the model with --export-sparsity 2:4")
            if lin.in_features not in probes:  # one probe input per input size
                probes[lin.in_features] = torch.randn(tokens, lin.in_features, device=device, dtype=dtype)
            probe = probes[lin.in_features]
            if lin.weight.shape not in made:  # one search per shape
                made[lin.weight.shape] = search_config(torch._cslt_compress(lin.weight.detach().contiguous()),
                                                       probe.t(), True)
            layer, records[f"{i}.{n}"] = sparse24_layer(lin.weight, "fused", cslt_kwargs(made[lin.weight.shape],
                                                        cslt_arg_names()), probe, lin.bias)
            epts.swap_module(block, n, layer)
    return records


class SemiStructuredLinear(nn.Module):
    """A bias-free linear holding a torch.sparse semi-structured weight (the documented F.linear path); with
    contiguous_out the output is made contiguous (isolates the cost of the layout the documented path returns)."""

    def __init__(self, weight: torch.Tensor, alg_id: int | None = None, contiguous_out: bool = False):
        super().__init__()
        self.w, self.contiguous_out = to_semi_structured(weight, alg_id), contiguous_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.w)
        return y.contiguous() if self.contiguous_out else y


FORMS = (("fused", "searched"), ("fused", "default"), ("copy", "searched"), ("copy", "default"))


def form_config(shape: str, out_layout: str, T: int, found: dict, packed, probe2d: torch.Tensor,
                names: set) -> tuple[dict, str]:
    """The searched _cslt_sparse_mm config of one Sparse24Linear form: the kernel section's search when it ran on
    the same call (same shape, token count, operand layout and transpose flag), else a new search on the probe."""
    tr = out_layout == "fused"
    key = "t" if tr else "nt"
    cfg = found.get(f"{shape}@{T}", {}).get(key)
    if cfg and "error" not in cfg:
        return cslt_kwargs(cfg, names), f"kernel-section search {shape}@{T} ({key})"
    return cslt_kwargs(search_config(packed, probe2d.t(), tr), names), "searched on the block's call"


def bench_layer_forms(a: argparse.Namespace, dims: dict, found: dict, device: torch.device) -> dict:
    """Each distinct linear of the block alone, on the block's activation [batch, seqlen, in] (contiguous, as the
    block gives it to a Sparse24Linear): dense vs Sparse24Linear in every form (fused / copy output x searched /
    default config), eager and replayed from a CUDA graph. Picks per shape the form of the `24_best` variants."""
    T, names = a.block_batch * a.block_seqlen, cslt_arg_names()
    gen = torch.Generator(device=device).manual_seed(3)
    out = dict(tokens=T, rows=[], configs={}, choice={})
    for shape, s in linear_shapes(dims).items():
        W24 = prune_24((torch.randn(s["out"], s["inp"], generator=gen, device=device) * s["inp"] ** -0.5)
                       .to(torch.bfloat16))
        x = torch.randn(a.block_batch, a.block_seqlen, s["inp"], generator=gen, device=device, dtype=torch.bfloat16)
        ref = F.linear(x, W24)
        rows = [dict(shape=shape, form="dense")]
        try:
            rows[0].update({k: v for k, v in time_fn(lambda: F.linear(x, W24), a.warmup, a.reps, True).items()
                            if k in ("ms", "host_ms")})
            rows[0]["graph_ms"] = time_fn(graphed(lambda: F.linear(x, W24)), a.warmup, a.reps, True)["ms"]
        except Exception as e:  # noqa: BLE001
            rows[0]["error"] = first_line(e)
        cfgs, packed = {}, None
        for layout in ("fused", "copy"):
            try:
                packed = torch._cslt_compress(W24) if packed is None else packed
                cfgs[layout] = form_config(shape, layout, T, found, packed, x.view(-1, s["inp"]), names)
            except Exception as e:  # noqa: BLE001
                cfgs[layout] = e
        out["configs"][shape] = {k: (v[0] if isinstance(v, tuple) else {}) for k, v in cfgs.items()}
        for layout, which in FORMS:
            row = dict(shape=shape, form=f"{layout}_{which}")
            try:
                config = {}
                if which == "searched":
                    if isinstance(cfgs[layout], BaseException):
                        raise cfgs[layout]
                    config, row["config_source"] = cfgs[layout]
                layer, rec = sparse24_layer(W24, layout, config, x)
                row.update(rec)
                fn = (lambda m=layer: m(x))
                row.update({k: v for k, v in time_fn(fn, a.warmup, a.reps, True).items() if k in ("ms", "host_ms")})
                row["rel_err"] = rel_err(fn(), ref)
                row["ok"] = row["rel_err"] <= CHECK_TOL
                row["graph_ms"] = time_fn(graphed(fn), a.warmup, a.reps, True)["ms"]
            except Exception as e:  # noqa: BLE001
                row["error"] = first_line(e)
            rows.append(row)
        ok = [r for r in rows[1:] if r.get("ok")]
        if ok:   # GPU time decides (replay); at >= 8k tokens the eager block is GPU-bound too
            pick = min(ok, key=lambda r: r.get("graph_ms") or r["ms"])
            out["choice"][shape] = dict(form=pick["form"], out_layout=pick["out_layout"], config=pick["used"],
                                        ms=pick["ms"], graph_ms=pick.get("graph_ms"))
        out["rows"] += rows
        print(f"  layer forms {shape:8s} T={T}: " + ", ".join(
            f"{r['form']} {r['ms']:.3f}/{r.get('graph_ms') or float('nan'):.3f}" for r in rows if r.get("ms"))
            + " ms (eager/graph)", flush=True)
        del W24, x, ref, rows
        torch.cuda.empty_cache()
    return out


def layer_makers(forms: dict | None) -> dict:
    """The 2:4 variants of a block: name -> make(layer name, pruned weight, probes) -> (2:4 layer, record).

    24_documented        to_sparse_semi_structured + F.linear (what the torch docs show)
    24_documented_contig the same, output made contiguous (isolates the cost of the layout it returns)
    24_fused / 24_copy   Sparse24Linear, every linear with that output layout and its searched config
    24_best              Sparse24Linear, per shape the fastest form of bench_layer_forms
    """
    cfg, choice = (forms or {}).get("configs", {}), (forms or {}).get("choice", {})

    def documented(contiguous_out: bool):
        path = "to_sparse_semi_structured + F.linear" + (" + .contiguous()" if contiguous_out else "")
        return lambda name, w, probes: (SemiStructuredLinear(w, contiguous_out=contiguous_out), dict(path=path))

    def wrapper(pick):
        def make(name, w, probes):
            layout, config = pick(shape_of(name))
            return sparse24_layer(w, layout, config, probes[w.shape[1]])
        return make

    def best(shape):
        c = choice.get(shape)
        return (c["out_layout"], c["config"]) if c else ("fused", cfg.get(shape, {}).get("fused", {}))
    return {"24_documented": documented(False), "24_documented_contig": documented(True),
            "24_fused": wrapper(lambda sh: ("fused", cfg.get(sh, {}).get("fused", {}))),
            "24_copy": wrapper(lambda sh: ("copy", cfg.get(sh, {}).get("copy", {}))),
            "24_best": wrapper(best)}


def build_llama(dims: dict, layers: int, seqlen: int, device: torch.device) -> nn.Module:
    """A random-init LLaMA-shaped causal LM in bf16, built directly on `device`."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=dims["vocab"], hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
                      num_attention_heads=dims["heads"], num_key_value_heads=dims["kv_heads"],
                      num_hidden_layers=layers, max_position_embeddings=max(seqlen, 2048))
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


@torch.no_grad()
def prune_model_24(model: nn.Module) -> None:
    """Prune the 7 linears of every decoder block to 2:4 in place."""
    for block in epts.decoder_blocks(model):
        for n in LINEARS:
            lin = block.get_submodule(n)
            lin.weight.copy_(prune_24(lin.weight))


def swap_linears(model: nn.Module, make, probes: dict) -> tuple[dict, dict]:
    """Put make()'s 2:4 layer in place of every block linear -> ({(block, name): original} for restore(),
    {"<block>.<name>": record of the layer's form and config})."""
    originals, records = {}, {}
    try:
        for i, block in enumerate(epts.decoder_blocks(model)):
            for n in LINEARS:
                lin = block.get_submodule(n)
                new, records[f"{i}.{n}"] = make(n, lin.weight.detach(), probes)
                originals[(i, n)] = epts.swap_module(block, n, new)
    except Exception:
        restore(model, originals)
        raise
    return originals, records


def restore(model: nn.Module, originals: dict) -> None:
    """Undo swap_linears."""
    blocks = epts.decoder_blocks(model)
    for (i, n), old in originals.items():
        epts.swap_module(blocks[i], n, old)


def make_probes(a: argparse.Namespace, dims: dict, device: torch.device) -> dict:
    """Inputs [batch, seqlen, in] for checking configs on the exact call, keyed by in-features."""
    gen = torch.Generator(device=device).manual_seed(4)
    return {n: torch.randn(a.block_batch, a.block_seqlen, n, generator=gen, device=device, dtype=torch.bfloat16)
            for n in {dims["hidden"], dims["ffn"]}}


def linear_layouts(model: nn.Module, fwd) -> dict:
    """Strides of every block linear's input and output in one forward (where layout changes force copies), and the
    input copies the Sparse24Linear layers made."""
    seen, handles = {}, []
    for i, block in enumerate(epts.decoder_blocks(model)):
        for n in LINEARS:
            def hook(mod, args, out, key=f"{i}.{n}"):
                x = args[0]
                seen[key] = dict(in_stride=list(x.stride()), in_contiguous=x.is_contiguous(),
                                 out_stride=list(out.stride()), out_contiguous=out.is_contiguous())
            handles.append(block.get_submodule(n).register_forward_hook(hook))
    layers = [m for m in model.modules() if isinstance(m, Sparse24Linear)]
    for m in layers:
        m.input_copies = 0
    try:
        fwd()
    finally:
        for h in handles:
            h.remove()
    return dict(per_linear=seen, noncontiguous_inputs=sum(not v["in_contiguous"] for v in seen.values()),
                noncontiguous_outputs=sum(not v["out_contiguous"] for v in seen.values()),
                sparse24_input_copies=sum(m.input_copies for m in layers) if layers else None)


def kernel_kind(name: str) -> str:
    """A coarse class of a GPU kernel name for the block profile."""
    n = name.lower()
    if "sparse" in n:
        return "sparse_gemm"
    if any(k in n for k in ("flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if "softmax" in n:
        return "softmax"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "cublas", "xmma", "matmul")):
        return "gemm"
    if any(k in n for k in ("copy", "memcpy", "transpose")):
        return "copy"
    return "memset" if "memset" in n else "other"


def block_profile(fn) -> dict:
    """GPU time of one forward by kernel kind (gemm, sparse_gemm, attention, softmax, copy, other) + top kernels."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds, kernels = {}, []
    for e in prof.key_averages():
        if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        ms = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)) / 1e3
        k = kernel_kind(e.key)
        kinds[k] = kinds.get(k, 0.0) + ms
        kernels.append(dict(name=e.key[:100], kind=k, calls=e.count, ms=ms))
    kernels.sort(key=lambda r: -r["ms"])
    return dict(gpu_ms=sum(kinds.values()), by_kind_ms=kinds, top=kernels[:10])


def time_block_variant(name: str, fn, ref, a: argparse.Namespace, cuda: bool, graph: bool = False) -> dict:
    """Time one forward variant of the block or model; errors are recorded, not raised."""
    row = dict(variant=name)
    try:
        call = graphed(fn) if graph else fn
        row.update(time_fn(call, max(1, a.warmup // 2), a.block_reps, cuda))
        if ref is not None:
            row["rel_err"] = rel_err(call(), ref)
            row["ok"] = row["rel_err"] <= BLOCK_TOL
    except Exception as e:  # noqa: BLE001
        row["error"] = first_line(e)
    return row


def guarded(fn, *args) -> dict:
    """fn(*args), or {"error": ...}."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        return dict(error=first_line(e))


def sparse_variant(name: str, model: nn.Module, make, fwd, ref, a: argparse.Namespace, res: dict, probes: dict,
                   detail: bool) -> None:
    """Swap every block linear for make()'s 2:4 layer; time the forward eager and replayed from a CUDA graph, check
    it against the dense output, record each layer's config (with detail also layouts and a GPU profile); undo."""
    try:
        originals, records = swap_linears(model, make, probes)
    except Exception as e:  # noqa: BLE001
        res["variants"] += [dict(variant=name, error=first_line(e)), dict(variant=name + "_graph",
                                                                     error="not run: the 2:4 layers were not built")]
        return
    try:
        res["layer_configs"][name] = records
        res["variants"].append(time_block_variant(name, fwd, ref, a, True))
        if detail:
            res["layouts"][name] = guarded(linear_layouts, model, fwd)
            res["profiles"][name] = guarded(block_profile, fwd)
        res["variants"].append(time_block_variant(name + "_graph", fwd, ref, a, True, graph=True))
    finally:
        restore(model, originals)
        torch.cuda.empty_cache()


def bench_block(a: argparse.Namespace, dims: dict, forms: dict | None, device: torch.device, cuda: bool) -> dict:
    """One LLaMA decoder block on batch x seqlen tokens: dense vs the 2:4 variants of layer_makers, eager and graph."""
    tokens_here = a.block_batch * a.block_seqlen
    model = build_llama(dims, 1, a.block_seqlen, device)
    prune_model_24(model)
    windows = torch.randint(0, dims["vocab"], (1, a.block_seqlen), generator=torch.Generator().manual_seed(0))
    _, kwargs = epts.capture_block_inputs(model, windows, device, torch.bfloat16)
    block = epts.decoder_blocks(model)[0]
    H = torch.randn(a.block_batch, a.block_seqlen, dims["hidden"], device=device, dtype=torch.bfloat16,
                    generator=torch.Generator(device=device).manual_seed(1))
    fwd = lambda: epts.call_block(block, H, kwargs)  # noqa: E731
    ref = fwd().clone()
    res = dict(tokens=tokens_here, batch=a.block_batch, seqlen=a.block_seqlen, variants=[], layer_configs={},
               layouts={"dense": guarded(linear_layouts, model, fwd)}, profiles={})
    res["variants"].append(time_block_variant("dense", fwd, None, a, cuda))
    if cuda:
        res["variants"].append(time_block_variant("dense_graph", fwd, None, a, cuda, graph=True))
        res["profiles"]["dense"] = guarded(block_profile, fwd)
        probes = make_probes(a, dims, device)
        for name, make in layer_makers(forms).items():
            sparse_variant(name, model, make, fwd, ref, a, res, probes, detail=True)
        del probes
    else:
        res["variants"] += [dict(variant=n, skipped="needs CUDA") for n in layer_makers(None)]
    add_speedups(res["variants"])
    del model, block, H, ref
    return res


def add_speedups(variants: list) -> None:
    """speedup = dense ms / variant ms; graphed variants are compared with the graphed dense forward."""
    ms = {v["variant"]: v.get("ms") for v in variants}
    for v in variants:
        base = ms.get("dense_graph") if v["variant"].endswith("_graph") else ms.get("dense")
        if base and v.get("ms"):
            v["speedup"] = base / v["ms"]


def bench_model2(a: argparse.Namespace, dims: dict, forms: dict | None, device: torch.device, cuda: bool) -> dict:
    """A 2-layer LLaMA-shaped model prefill (logits of the last token only): dense vs 24_best, eager and graph."""
    model = build_llama(dims, 2, a.block_seqlen, device)
    prune_model_24(model)
    ids = torch.randint(0, dims["vocab"], (a.block_batch, a.block_seqlen),
                        generator=torch.Generator().manual_seed(2)).to(device)
    try:
        model(ids[:1, :8], use_cache=False, logits_to_keep=1)
        fwd = lambda: model(ids, use_cache=False, logits_to_keep=1).logits  # noqa: E731
    except TypeError:   # a transformers without logits_to_keep: full logits
        fwd = lambda: model(ids, use_cache=False).logits  # noqa: E731
    ref = fwd().clone()
    res = dict(layers=2, tokens=a.block_batch * a.block_seqlen, layer_configs={}, layouts={}, profiles={},
               variants=[time_block_variant("dense", fwd, None, a, cuda)])
    if cuda:
        res["variants"].append(time_block_variant("dense_graph", fwd, None, a, cuda, graph=True))
        probes = make_probes(a, dims, device)
        sparse_variant("24_best", model, layer_makers(forms)["24_best"], fwd, ref, a, res, probes, detail=False)
        del probes
    else:
        res["variants"].append(dict(variant="24_best", skipped="needs CUDA"))
    add_speedups(res["variants"])
    del model
    return res


def get(rows: list, shape: str, T: int, variant: str) -> dict:
    """The row of one (shape, tokens, variant), or {}."""
    return next((r for r in rows if r["shape"] == shape and r["tokens"] == T and r["variant"] == variant), {})


def diagnosis(rows: list, found: dict, diag: dict, tokens: list[int]) -> list[str]:
    """A short text reading of the measurements: where the per-call fixed cost of 2:4 comes from."""
    if not rows or not any(r.get("ms") for r in rows if r["variant"].startswith("cslt")):
        return ["No cuSPARSELt measurement (no CUDA, or every cuSPARSELt call failed): nothing to diagnose."]
    T0, T1, lines = min(tokens), max(tokens), []
    d, c, g, gd = (get(rows, "qkvo", T0, v) for v in ("dense", "cslt_t", "graph_cslt", "graph_dense"))
    if c.get("ms"):
        lines.append(f"q/k/v/o at {T0} tokens: dense {d.get('ms', float('nan')):.3f} ms, cslt_t eager "
                     f"{c['ms']:.3f} ms of which the CPU spends {c['host_ms']:.3f} ms per call (dense call: "
                     f"{d.get('host_ms', float('nan')):.3f} ms on the CPU).")
    if c.get("ms") and g.get("ms"):
        host_bound = c["host_ms"] > 0.5 * c["ms"] and g["ms"] < 0.6 * c["ms"]
        lines.append(f"Replayed from a CUDA graph (no per-call host work) the same call takes {g['ms']:.3f} ms "
                     f"(dense graph {gd.get('ms', float('nan')):.3f} ms): "
                     + ("the fixed cost is per-call HOST work, not GPU work. aten's _cslt_sparse_mm re-creates "
                        "the matrix descriptors and the matmul plan (cusparseLtMatmulPlanInit), allocates the "
                        "workspace and destroys the plan on every call -- there is no plan cache (one was proposed "
                        "in pytorch PR #179642); the profiler's CPU events below show which calls dominate. A CUDA "
                        "graph (or a plan cache) removes it."
                        if host_bound else "the fixed cost is NOT removed by skipping the host work: it is GPU "
                        "time -- see the kernels of the profile (extra kernels, split-k, a slow sm90 kernel)."))
    prof = diag.get("profile", {}).get("cslt_t", {})
    if prof.get("kernels"):
        ks = ", ".join(f"{k['name'][:40]} x{k['per_call']:.0f} {k['gpu_us_per_call']:.0f} us"
                       for k in prof["kernels"][:4])
        lines.append(f"Kernels per cslt_t call: {ks}; GPU total {prof['gpu_us_per_call']:.0f} us.")
        rt = [p for p in prof.get("top_cpu", []) if p["name"].startswith("cu")]
        if rt:
            lines.append("Heaviest CUDA runtime calls per cslt_t call: " + ", ".join(
                f"{p['name'][:36]} x{p['per_call']:.0f} {p['self_cpu_us_per_call']:.0f} us" for p in rt[:4]) + ".")
    blk = diag.get("blocking", {}).get("cslt_t", {})
    if "blocks_host" in blk:
        lines.append("A cslt_t call " + ("BLOCKS the host until queued GPU work finishes (hidden synchronisation)"
                                         if blk["blocks_host"] else "does not wait for queued GPU work (no sync)")
                     + f": host {blk['host_ms_idle_gpu']:.3f} ms idle vs {blk['host_ms_busy_gpu']:.3f} ms behind "
                     f"{blk['queued_gpu_ms']:.1f} ms of queued work.")
    if c.get("first_ms") and c.get("ms"):
        lines.append(f"First call {c['first_ms']:.2f} ms vs steady {c['ms']:.3f} ms (first-call cost is one-off).")
    hosts = [get(rows, "qkvo", T, "cslt_t").get("host_ms") for T in tokens]
    if all(hosts):
        lines.append("cslt_t host ms per call across token counts: " + ", ".join(f"{h:.3f}" for h in hosts)
                     + " (flat = a fixed per-call cost).")
    s, ss = get(rows, "gate_up", T1, "cslt_t_search"), get(rows, "gate_up", T1, "cslt_t")
    took = found.get(f"gate_up@{T1}", {}).get("t", {}).get("search_s", float("nan"))
    if s.get("ms") and ss.get("ms"):
        lines.append(f"Searched config on gate/up at {T1}: {s['ms']:.3f} vs default {ss['ms']:.3f} ms "
                     f"({s.get('config')}); the search itself took {took:.2f} s.")
    nt, xc, tr = (get(rows, "qkvo", T1, v) for v in ("cslt_nt", "cslt_xT_contig", "cslt_t"))
    if nt.get("ms") and xc.get("ms") and tr.get("ms"):
        lines.append(f"Layouts at {T1} (q/k/v/o): W x^T with x^T a view {nt['ms']:.3f} ms, with x^T contiguous "
                     f"{xc['ms']:.3f} ms, transposed result (x W^T) {tr['ms']:.3f} ms.")
    sd = get(rows, "qkvo", T0, "ss_default")
    if sd.get("ms") and c.get("ms"):
        lines.append(f"Documented path (to_sparse_semi_structured + F.linear, backend {sd.get('backend')}) costs "
                     f"{sd['host_ms'] - c['host_ms']:+.3f} ms of host time per call over the raw op "
                     "(tensor-subclass dispatch and custom-op wrapper).")
    return lines


def block_diagnosis(res: dict) -> list[str]:
    """A text reading of the block section: best 2:4 speed-up against the 1.1x target, and where time goes."""
    lines, blk = [], res.get("block") or {}
    lf = res.get("layer_forms") or {}
    if lf.get("error"):
        lines.append(f"Layer-form benchmark failed: {lf['error']}")
    if blk.get("error"):
        return lines + [f"Block benchmark failed: {blk['error']}"]
    vs = {v["variant"]: v for v in blk.get("variants", [])}
    if not any(v.get("ms") for n, v in vs.items() if n.startswith("24_")):
        return lines
    T = blk.get("tokens")
    for graph in (False, True):
        sfx = "_graph" if graph else ""
        ok = [v for n, v in vs.items() if n.startswith("24_") and n.endswith("_graph") == graph
              and v.get("ok") and v.get("speedup")]
        d = vs.get("dense" + sfx, {})
        if ok and d.get("ms"):
            b = max(ok, key=lambda v: v["speedup"])
            lines.append(f"Block prefill, {T} tokens, {'CUDA graph' if graph else 'eager'}: best 2:4 variant "
                         f"{b['variant']} {b['ms']:.2f} ms vs dense {d['ms']:.2f} ms = {b['speedup']:.2f}x (rel err "
                         f"{b['rel_err']:.1e}); target >= 1.1x {'met' if b['speedup'] >= 1.1 else 'NOT met'}.")
    lay, dlay = blk.get("layouts", {}).get("24_documented", {}), blk.get("layouts", {}).get("dense", {})
    if "per_linear" in lay:
        q = lay["per_linear"].get("0.self_attn.q_proj", {})
        lines.append(f"24_documented: {lay['noncontiguous_outputs']}/7 linear outputs and "
                     f"{lay['noncontiguous_inputs']}/7 linear inputs are non-contiguous (dense: "
                     f"{dlay.get('noncontiguous_outputs')}/7, {dlay.get('noncontiguous_inputs')}/7); q_proj output "
                     f"strides {q.get('out_stride')}.")
    doc, dc = vs.get("24_documented", {}), vs.get("24_documented_contig", {})
    if doc.get("ms") and dc.get("ms"):
        lines.append(f"Documented path as is vs with its output made contiguous (.contiguous() after F.linear): "
                     f"{doc['ms']:.2f} -> {dc['ms']:.2f} ms eager.")
    prof = blk.get("profiles", {})
    names = [n for n in ("dense", "24_documented", "24_best") if prof.get(n, {}).get("by_kind_ms")]
    if len(names) > 1:
        kinds = sorted({k for n in names for k in prof[n]["by_kind_ms"]})
        lines.append(f"GPU ms per forward by kernel kind ({' / '.join(names)}): " + ", ".join(
            f"{k} " + "/".join(f"{prof[n]['by_kind_ms'].get(k, 0.0):.2f}" for n in names) for k in kinds)
            + "; totals " + "/".join(f"{prof[n]['gpu_ms']:.2f}" for n in names) + ".")
    copies = {n: blk.get("layouts", {}).get(n, {}).get("sparse24_input_copies") for n in ("24_fused", "24_copy",
                                                                                            "24_best")}
    if any(c is not None for c in copies.values()):
        lines.append("Sparse24Linear input copies per forward: " + ", ".join(f"{n} {c}" for n, c in copies.items())
                     + " (0 = every linear got a contiguous activation).")
    fb = {}   # (part/variant, reason) -> layers that fell back to the default config
    for part in ("block", "model2"):
        for v, recs in (res.get(part) or {}).get("layer_configs", {}).items():
            for k, r in recs.items():
                if r.get("fallback"):
                    fb.setdefault((f"{part}/{v}", r["fallback"]), []).append(k)
    if blk.get("layer_configs"):
        lines.append(f"{sum(map(len, fb.values()))} layer(s) fell back to the default config: " + "; ".join(
            f"{pv} {', '.join(ks)} ({why})" for (pv, why), ks in list(fb.items())[:4])
            if fb else "Every searched config was accepted on the exact call of its layer (no fallback).")
    if lf.get("choice"):
        dense = {r["shape"]: r for r in lf.get("rows", []) if r["form"] == "dense"}
        lines.append(f"Per-shape Sparse24Linear form of 24_best (one linear, {lf['tokens']} tokens, graph ms vs "
                     "dense graph ms): " + ", ".join(
                         f"{sh} {c['form']} {c.get('graph_ms') or float('nan'):.3f} vs "
                         f"{dense.get(sh, {}).get('graph_ms') or float('nan'):.3f}" for sh, c in lf["choice"].items())
                     + ".")
    m2 = {v["variant"]: v for v in (res.get("model2") or {}).get("variants", [])}
    for sfx in ("", "_graph"):
        b, d = m2.get("24_best" + sfx, {}), m2.get("dense" + sfx, {})
        if b.get("ms") and d.get("ms"):
            lines.append(f"2-layer model prefill{' (CUDA graph)' if sfx else ''}: 24_best {b['ms']:.2f} ms vs dense "
                         f"{d['ms']:.2f} ms = {d['ms'] / b['ms']:.2f}x (rel err of the last-token logits "
                         f"{b.get('rel_err', float('nan')):.1e}).")
    return lines


def fmt(r: dict) -> str:
    """One markdown cell: ms and dense/sparse, or why there is none."""
    if r.get("ms") is not None:
        bad = "" if r.get("ok", True) else " WRONG"
        return f"{r['ms']:.3f} ({r['ratio']:.2f}x){bad}" if r.get("ratio") else f"{r['ms']:.3f}{bad}"
    return "skip" if r.get("skipped") else ("err" if r.get("error") else "-")


def print_tables(res: dict) -> None:
    """The markdown summary on stdout."""
    rows, tokens = res["kernels"], res["settings"]["tokens"]
    print(f"\n## 2:4 vs dense on {res['device']} (torch {res['torch']}), ms per call (dense/sparse)\n")
    for shape, s in res["shapes"].items():
        print(f"### {shape}: {s['layers']} {s['out']}x{s['inp']} (out x in)\n")
        print("| variant | " + " | ".join(f"T={T}" for T in tokens) + " |")
        print("|---|" + "---|" * len(tokens))
        for v in ("dense",) + EAGER_SPARSE + ("graph_dense", "graph_cslt"):
            print(f"| {v} | " + " | ".join(fmt(get(rows, shape, T, v)) for T in tokens) + " |")
        errs = {get(rows, shape, T, v).get("error") for T in tokens for v in EAGER_SPARSE + ("graph_cslt",)} - {None}
        for e in sorted(errs)[:4]:
            print(f"\nerror: {e}")
        print()
    be = res["break_even"]
    print("| break-even (smallest measured T where 2:4 is faster) | eager | CUDA graph |\n|---|---|---|")
    for shape in res["shapes"]:
        print(f"| {shape} | {be[shape]['eager'] or 'none'} | {be[shape]['cuda_graph'] or 'none'} |")
    print(f"| all 7 linears of a block | {be['block_linears']['eager'] or 'none'} | |\n")
    lf = res.get("layer_forms") or {}
    if lf.get("rows"):
        print(f"### Sparse24Linear forms, one linear on the block's activation ({lf['tokens']} tokens)\n\n"
              "| shape | form | config used | eager ms | graph ms | rel err |\n|---|---|---|---|---|---|")
        for r in lf["rows"]:
            ms, gms = (f"{r[k]:.3f}" if r.get(k) else "err" for k in ("ms", "graph_ms"))
            er = f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else ""
            used = "" if r["form"] == "dense" else ("err" if r.get("error") else
                                                   (r.get("used") or "default") if not r.get("fallback") else
                                                   "default (requested refused)")
            print(f"| {r['shape']} | {r['form']} | {used} | {ms} | {gms} | {er} |")
        for e in sorted({r["error"] for r in lf["rows"] if r.get("error")})[:4]:
            print(f"\nerror: {e}")
        print()
    elif lf.get("error"):
        print(f"layer forms: error: {lf['error']}\n")
    for key in ("block", "model2"):
        part = res.get(key)
        if not part:
            continue
        print(f"### {key} ({part.get('tokens')} tokens)\n\n| variant | ms | host ms | speed-up | rel err |\n"
              "|---|---|---|---|---|")
        for v in part.get("variants", []):
            ms = f"{v['ms']:.2f}" if v.get("ms") else ("skip" if v.get("skipped") else "err")
            host = f"{v['host_ms']:.2f}" if v.get("host_ms") else ""
            sp = f"{v['speedup']:.2f}x" if v.get("speedup") else ""
            er = f"{v['rel_err']:.1e}" + ("" if v.get("ok") else " WRONG") if v.get("rel_err") is not None else ""
            print(f"| {v['variant']} | {ms} | {host} | {sp} | {er} |")
        for v in part.get("variants", []):
            if v.get("error"):
                print(f"\n{v['variant']} error: {v['error']}")
        if part.get("error"):
            print(f"\nerror: {part['error']}")
        prof = {n: p for n, p in part.get("profiles", {}).items() if p.get("by_kind_ms")}
        if prof:
            kinds = sorted({k for p in prof.values() for k in p["by_kind_ms"]})
            print("\nGPU ms of one eager forward by kernel kind (torch.profiler)\n\n| variant | " + " | ".join(kinds)
                  + " | total |\n|---|" + "---|" * (len(kinds) + 1))
            for n, p in prof.items():
                print(f"| {n} | " + " | ".join(f"{p['by_kind_ms'].get(k, 0.0):.2f}" for k in kinds)
                      + f" | {p['gpu_ms']:.2f} |")
        lay = {n: p for n, p in part.get("layouts", {}).items() if "per_linear" in p}
        if lay:
            print("\nnon-contiguous linear inputs / outputs per forward: " + ", ".join(
                f"{n} {p['noncontiguous_inputs']}/{p['noncontiguous_outputs']}" for n, p in lay.items()))
        print()
    print("### diagnosis\n")
    for line in res["diagnosis"]:
        print(f"- {line}")


def versions() -> dict:
    """Device and library versions for the JSON."""
    cuda = torch.cuda.is_available()
    out = dict(device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
               torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version())
    try:
        import transformers
        out["transformers"] = transformers.__version__
    except Exception as e:  # noqa: BLE001
        out["transformers"] = first_line(e)
    if cuda:
        out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        out["cusparselt_available"] = bool(torch.backends.cusparselt.is_available())
        out["cusparselt_version"] = torch.backends.cusparselt.version()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--reps", type=int, default=30, help="timed calls per kernel variant")
    p.add_argument("--block-reps", type=int, default=10, help="timed forwards per block/model variant")
    p.add_argument("--block-batch", type=int, default=8)
    p.add_argument("--block-seqlen", type=int, default=2048)
    p.add_argument("--search-budget", type=float, default=90.0,
                   help="seconds of cuSPARSELt algorithm search; past it, configs of the previous token count")
    p.add_argument("--no-block", action="store_true", help="skip the decoder-block and 2-layer-model timings")
    p.add_argument("--no-model2", action="store_true", help="skip the 2-layer-model prefill")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (the default without CUDA)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "nm_speed.json"))
    a = p.parse_args()
    cuda = torch.cuda.is_available()
    tiny = a.tiny or not cuda
    if tiny:
        a.tokens = [T for T in a.tokens if T <= 64] or [16, 64]
        a.reps, a.warmup, a.block_reps = min(a.reps, 5), min(a.warmup, 1), min(a.block_reps, 3)
        a.block_batch, a.block_seqlen = min(a.block_batch, 2), min(a.block_seqlen, 32)
    dims = TINY if tiny else LLAMA_7B
    device = torch.device("cuda" if cuda else "cpu")
    warnings.filterwarnings("ignore", message=".*prototype.*")
    t_start = time.perf_counter()
    res = dict(command=shlex.join(["python"] + sys.argv), **versions(), mode=("tiny " if tiny else "") +
               ("cuda" if cuda else "cpu (no CUDA: semi-structured variants skipped)"),
               settings=dict(tokens=a.tokens, warmup=a.warmup, reps=a.reps, block_reps=a.block_reps,
                             dtype="bfloat16", check_tol=CHECK_TOL, search_budget_s=a.search_budget,
                             block_batch=a.block_batch, block_seqlen=a.block_seqlen, block_tol=BLOCK_TOL),
               shapes=linear_shapes(dims))
    print(f"{res['device']}  torch {res['torch']}  transformers {res['transformers']}  mode {res['mode']}")
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)

    def save(partial: bool) -> None:   # after every part: a hard crash later still leaves the earlier results
        res["wall_s"], res["partial"] = time.perf_counter() - t_start, partial
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    with torch.no_grad():
        rows, found, masks = bench_kernels(a, dims, device, cuda)
        res.update(kernels=rows, searches=found, mask_check=masks, break_even=break_even(rows, dims, a.tokens))
        diag = {}
        if cuda:
            try:
                diag = diagnostics(a, dims, rows, found)
            except Exception as e:  # noqa: BLE001
                diag = dict(error=first_line(e))
        res["diagnostics"] = diag
        save(partial=True)
        if not a.no_block:
            forms = None
            if cuda:   # each linear alone in every Sparse24Linear form, on the block's activation shape
                res["layer_forms"] = forms = guarded(bench_layer_forms, a, dims, found, device)
                torch.cuda.empty_cache()
                save(partial=True)
            for key, fn in (("block", bench_block), ("model2", None if a.no_model2 else bench_model2)):
                if fn is None:
                    continue
                try:
                    res[key] = fn(a, dims, forms, device, cuda)
                except Exception as e:  # noqa: BLE001
                    res[key] = dict(error=first_line(e))
                if cuda:
                    torch.cuda.empty_cache()
                save(partial=True)
    try:
        res["diagnosis"] = diagnosis(rows, found, diag, a.tokens) + block_diagnosis(res)
    except Exception as e:  # noqa: BLE001 - a reading of the numbers must not lose them
        res["diagnosis"] = [f"diagnosis failed: {first_line(e)}"]
    save(partial=False)
    try:
        print_tables(res)
    except Exception as e:  # noqa: BLE001
        print(f"printing the tables failed ({first_line(e)}); the JSON has everything")
    print(f"\nwrote {a.out} ({res['wall_s']:.1f} s)")


if __name__ == "__main__":
    main()
