"""2:4 speed on one GPU through `epts_scale.sparse24`, the deployment path: what gets faster, what
must not get slower.

    python bench/nm_speed.py --model DIR --out nm_speed.json  # every part, minutes on one H200
    python bench/nm_speed.py --parts kernels block --quick    # a selection, fewer repetitions

bf16 throughout; random weights are pruned to 2:4 by magnitude (`epts.prune_magnitude(model,
"2:4")`). Times are ms per call from `epts_scale.seconds_per_call`: back-to-back calls, so host and
GPU time overlap as inside a forward.

  kernels  the linears of LLaMA-7B (q/k/v/o 4096x4096, gate/up 11008x4096, down 4096x11008; out x
           in) at 2048 to 16384 tokens: dense F.linear vs Sparse24Linear's 2:4 matmul (the config
           sparse24's probe picks), eager and replayed from a CUDA graph (no per-call host work),
           and the host time of one call of each; the break-even sparse24 measures per shape
  block    one LLaMA-7B-shaped decoder block on 8 x 2048 tokens: dense vs `sparse24(model,
           16384)` vs the documented swap (F.linear on torch.sparse.to_sparse_semi_structured
           weights). Target >= 1.2x
  model2   a 2-layer LLaMA-7B-shaped model: prefill of 8 x 2048 tokens (target >= 1.1x) and
           greedy decode of 64 tokens with batch 1 (target: not slower than dense; below the
           break-even sparse24 runs dense)
  real     --model DIR, a model exported at 2:4 by the command line (`--export-sparsity 2:4`):
           prefill of 8 x 2048 tokens, 3 alternating rounds dense / swapped, medians (target >=
           1.0x; swapping nothing is an answer where nothing is faster), and greedy generate of 32
           new tokens for 3 prompts, which must give exactly the tokens of the same model without
           the swap

"Not slower" and ">= 1.0x" allow 2% of timing noise (NOISE); those parts alternate dense and
swapped rounds and keep every round's time, to show the spread.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402

LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_key_value_heads=32, vocab_size=32000)
SHAPES = {"qkvo": (4096, 4096), "gate_up": (11008, 4096), "down": (4096, 11008)}  # (out, in)
NOISE = 0.98   # "not slower" / ">= 1.0x" means a speed-up of at least 0.98
TEXT = ("The history of the printing press begins in the fifteenth century, when movable metal "
        "type made it possible to produce books far faster than scribes could copy them. Within "
        "fifty years presses had spread to more than two hundred cities, and the price of a book "
        "fell so far that ordinary merchants could own several. ")
CUDA = torch.device("cuda")


def ms(fn, calls: int) -> float:
    """ms per call of fn(), timed as sparse24 times its probes."""
    return epts_scale.seconds_per_call(fn, ("bench",), CUDA, calls) * 1e3


def host_ms(fn, reps: int = 10) -> float:
    """Median CPU time of one call of fn() issued to an idle GPU: the host work per call, without
    the GPU's."""
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def graphed(fn):
    """fn captured once in a CUDA graph; the returned callable replays it (GPU time only, no
    per-call host work)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """max |out - ref| / max |ref|."""
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max())


def target(res: dict, what: str, value, goal: str, met: bool) -> None:
    """Record one of the issue's targets with its measured value."""
    res["targets"].append(dict(what=what, value=value, target=goal, met=bool(met)))
    print(f"  target {what}: {value} ({goal}) -> {'met' if met else 'NOT met'}", flush=True)


def build_llama(layers: int) -> nn.Module:
    """A random LLaMA-7B-shaped causal LM with `layers` blocks, bf16 on the GPU, pruned to 2:4."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    with torch.device(CUDA):
        config = LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **LLAMA_7B)
        model = LlamaForCausalLM(config)
    return epts.prune_magnitude(model.to(torch.bfloat16).eval(), "2:4")


@torch.no_grad()
def bench_kernels(a: argparse.Namespace, res: dict) -> None:
    """Each LLaMA-7B linear alone: dense vs 2:4 at every --tokens, eager and from a CUDA graph,
    plus host time."""
    timer = lambda fn, label: epts_scale.seconds_per_call(fn, label, CUDA, a.calls)  # noqa: E731
    gen = torch.Generator(CUDA).manual_seed(0)
    for name, (out, inp) in SHAPES.items():
        lin = nn.Linear(inp, out, bias=False, device=CUDA, dtype=torch.bfloat16)
        lin.weight.mul_(epts.mask_from_ranks(epts.nm_ranks(lin.weight.abs().float(), 4), 0.5))
        # sparse24's config and break-even for this shape, alone
        probe = epts_scale.probe24(lin, max(a.tokens), timer)
        layer = epts_scale.Sparse24Linear(lin, 0, probe.get("config"))
        x = torch.randn(max(a.tokens), inp, generator=gen, device=CUDA, dtype=torch.bfloat16)
        rows = []
        for T in a.tokens:
            xs = x[:T]
            dense, sparse = (lambda: F.linear(xs, lin.weight)), (lambda: layer.sparse_mm(xs))
            row = dict(tokens=T, dense_ms=ms(dense, a.calls), sparse_ms=ms(sparse, a.calls),
                       dense_host_ms=host_ms(dense), sparse_host_ms=host_ms(sparse),
                       dense_graph_ms=ms(graphed(dense), a.calls),
                       sparse_graph_ms=ms(graphed(sparse), a.calls),
                       rel_err=rel_err(sparse(), dense()))
            row.update(speedup=row["dense_ms"] / row["sparse_ms"],
                       graph_speedup=row["dense_graph_ms"] / row["sparse_graph_ms"])
            rows.append(row)
            print(f"  {name:8s} T={T:6d}: dense {row['dense_ms']:.3f} ms, 2:4 "
                  f"{row['sparse_ms']:.3f} ms (host {row['sparse_host_ms']:.3f}), graphs "
                  f"{row['dense_graph_ms']:.3f} / {row['sparse_graph_ms']:.3f}", flush=True)
        res["kernels"][name] = dict(
            out=out, inp=inp, probe=probe, rows=rows,
            break_even_eager=next((r["tokens"] for r in rows if r["speedup"] > 1), None),
            break_even_graph=next((r["tokens"] for r in rows if r["graph_speedup"] > 1), None))
        del lin, layer, x
        torch.cuda.empty_cache()


class Documented(nn.Module):
    """torch's documented 2:4 path: F.linear on a to_sparse_semi_structured weight (its outputs
    are strided)."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured
        self.w, self.bias = to_sparse_semi_structured(lin.weight.detach()), lin.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w, self.bias)


def documented_swap(model: nn.Module) -> dict:
    """Put a Documented layer in place of every pruned linear; returns the originals for
    `put_back`."""
    root, originals = epts.arch_of(model)[0], {}
    for key, lin in epts.pruned_linears(model).items():
        epts.swap_module(model, f"{root}.{key}", Documented(lin))
        originals[key] = lin
    return originals


def put_back(model: nn.Module, originals: dict) -> None:
    """Put these modules (key -> module) in the model: undoes documented_swap, toggles plain and
    swapped sets."""
    for key, lin in originals.items():
        epts.swap_module(model, f"{epts.arch_of(model)[0]}.{key}", lin)


@torch.no_grad()
def bench_block(a: argparse.Namespace, res: dict) -> None:
    """One LLaMA-7B-shaped block on batch x seqlen tokens: dense, sparse24, the documented swap."""
    model, tokens = build_llama(1), a.batch * a.seqlen
    _, kwargs = epts.capture_block_inputs(model, torch.zeros(1, a.seqlen, dtype=torch.long), CUDA,
                                          torch.bfloat16)
    H = torch.randn(a.batch, a.seqlen, LLAMA_7B["hidden_size"], device=CUDA, dtype=torch.bfloat16,
                    generator=torch.Generator(CUDA).manual_seed(1))
    fwd = lambda: epts.call_block(epts.decoder_blocks(model)[0], H, kwargs)  # noqa: E731
    ref, out = fwd(), dict(tokens=tokens, dense_ms=ms(fwd, a.calls))
    report = epts_scale.sparse24(model, tokens)
    out.update(sparse24_ms=ms(fwd, a.calls), rel_err=rel_err(fwd(), ref), report=asdict(report),
               summary=report.summary())
    epts_scale.unsparse24(model)
    out["dense_again_ms"] = ms(fwd, a.calls)
    try:
        originals = documented_swap(model)
        out.update(documented_ms=ms(fwd, a.calls), documented_rel_err=rel_err(fwd(), ref))
        put_back(model, originals)
    except Exception as e:  # noqa: BLE001 - a backend refusing this GPU is a result
        out["documented_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    dense = min(out["dense_ms"], out["dense_again_ms"])
    out.update(speedup=dense / out["sparse24_ms"],
               documented_speedup=dense / out["documented_ms"] if "documented_ms" in out else None)
    print(f"  block: {report.summary()}\n  block: dense {dense:.2f} ms, sparse24 "
          f"{out['sparse24_ms']:.2f} ms, documented {out.get('documented_ms', float('nan')):.2f} "
          "ms", flush=True)
    res["block"] = out
    target(res, "LLaMA-7B block prefill speed-up", round(out["speedup"], 3), ">= 1.2",
           out["speedup"] >= 1.2)


def greedy(model: nn.Module, ids: torch.Tensor, new: int) -> list[int]:
    """Greedy generate of exactly `new` tokens after the prompt `ids` [1, n]; returns the new
    tokens."""
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                         min_new_tokens=new, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def prefill_fn(model: nn.Module, ids: torch.Tensor):
    """A prefill forward without cache, keeping only the last position's logits (as serving
    does)."""
    return lambda: model(ids, use_cache=False, logits_to_keep=1).logits


def linears_of(model: nn.Module) -> dict:
    """The pruned linears now in the model, by key: to put the same modules back later with
    `put_back`."""
    return dict(epts.pruned_linears(model))


@torch.no_grad()
def bench_model2(a: argparse.Namespace, res: dict) -> None:
    """2-layer LLaMA-7B-shaped model: prefill batch x seqlen and greedy decode of 64 tokens (batch
    1). Decode alternates dense and swapped rounds (6 each, ABBA order, medians): generate's own
    time drifts by several % between runs."""
    model = build_llama(2)
    ids = torch.randint(0, LLAMA_7B["vocab_size"], (a.batch, a.seqlen), device=CUDA,
                        generator=torch.Generator(CUDA).manual_seed(2))
    fwd, prompt = prefill_fn(model, ids), ids[:1, :16]
    ref, out = fwd(), dict(tokens=a.batch * a.seqlen, dense_ms=ms(fwd, a.calls))
    decode = lambda: greedy(model, prompt, 64)  # noqa: E731
    dense_tokens, plain = decode(), linears_of(model)
    report = epts_scale.sparse24(model, a.batch * a.seqlen)
    out.update(sparse24_ms=ms(fwd, a.calls), rel_err=rel_err(fwd(), ref), report=asdict(report),
               summary=report.summary())
    swapped = linears_of(model)
    layers = [m for m in swapped.values() if isinstance(m, epts_scale.Sparse24Linear)]
    before = sum(m.calls["2:4"] for m in layers)
    sparse_tokens = decode()
    # 0: every decode step runs dense
    out["decode_2of4_calls"] = sum(m.calls["2:4"] for m in layers) - before
    rounds = {"dense": [], "sparse24": []}
    for i in range(6):  # ABBA order: a drift of generate's time within a pair falls on both sides
        for name, modules in (("dense", plain), ("sparse24", swapped))[::1 if i % 2 == 0 else -1]:
            put_back(model, modules)
            rounds[name].append(ms(decode, a.gen_calls))
    put_back(model, plain)
    out["dense_again_ms"] = ms(fwd, a.calls)
    out.update(decode_dense_ms=rounds["dense"], decode_sparse24_ms=rounds["sparse24"],
               decode_tokens_equal=dense_tokens == sparse_tokens)
    out["speedup"] = min(out["dense_ms"], out["dense_again_ms"]) / out["sparse24_ms"]
    out["decode_speedup"] = (statistics.median(rounds["dense"])
                             / statistics.median(rounds["sparse24"]))
    r1 = {k: [round(t, 1) for t in v] for k, v in rounds.items()}
    print(f"  model2: {report.summary()}\n  model2: prefill {out['speedup']:.3f}x, decode "
          f"{out['decode_speedup']:.3f}x (dense {r1['dense']} ms, sparse24 {r1['sparse24']} ms)",
          flush=True)
    res["model2"] = out
    target(res, "2-layer prefill speed-up", round(out["speedup"], 3), ">= 1.1",
           out["speedup"] >= 1.1)
    target(res, "2-layer decode (64 tokens, batch 1) speed-up", round(out["decode_speedup"], 3),
           f">= 1.0 (within noise: >= {NOISE})", out["decode_speedup"] >= NOISE)


def prompts(tokenizer, lengths: list[int]) -> list[torch.Tensor]:
    """Prompts of about these token counts, cut from TEXT repeated."""
    ids = epts._tokenize(tokenizer, TEXT * (max(lengths) // 40 + 2))
    return [ids[:n].view(1, -1).to(CUDA) for n in lengths]


@torch.no_grad()
def bench_real(a: argparse.Namespace, res: dict) -> None:
    """A 2:4 export: prefill batch x seqlen after sparse24 vs dense; greedy generate of 32 tokens,
    3 prompts."""
    model, tok = epts.load_model(a.model, "bfloat16", CUDA, verbose=False)
    model.to(CUDA)
    seqlen = min(a.seqlen, model.config.max_position_embeddings)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, seqlen), device=CUDA,
                        generator=torch.Generator(CUDA).manual_seed(3))
    fwd, plain = prefill_fn(model, ids), linears_of(model)
    out = dict(model=a.model, tokens=a.batch * seqlen,
               measured_sparsity=epts.measured_sparsity(model))
    report = epts_scale.sparse24(model, a.batch * seqlen)
    out.update(report=asdict(report), summary=report.summary())
    swapped, rounds = linears_of(model), {"dense": [], "sparse24": []}
    # alternating rounds, medians: the same modules, where none are swapped, differ by noise only
    for _ in range(3):
        for name, modules in (("dense", plain), ("sparse24", swapped)):
            put_back(model, modules)
            rounds[name].append(ms(fwd, a.calls))
    out.update(prefill_dense_ms=rounds["dense"], prefill_sparse24_ms=rounds["sparse24"])
    # the longest prompt reaches every swapped layer's break-even (if the positions allow): its
    # prefill runs 2:4
    room = model.config.max_position_embeddings - 32
    lengths = [min(n, room) for n in (24, 512, max([2048, *report.min_tokens.values()]))]
    texts = prompts(tok, lengths)
    swapped = [m for m in model.modules() if isinstance(m, epts_scale.Sparse24Linear)]
    gens = []
    for p in texts:
        before = sum(m.calls["2:4"] for m in swapped)
        gens.append(dict(prompt_tokens=p.shape[1], sparse24=greedy(model, p, 32)))
        gens[-1]["calls_2of4"] = sum(m.calls["2:4"] for m in swapped) - before
    epts_scale.unsparse24(model)
    for g, p in zip(gens, texts):
        dense, sparse = greedy(model, p, 32), g.pop("sparse24")
        g.update(equal=dense == sparse, dense_tokens=dense, sparse24_tokens=sparse,
                 first_difference=next((i for i, (d, s) in enumerate(zip(dense, sparse))
                                        if d != s), None))
    out["generate"] = gens
    out["speedup"] = statistics.median(rounds["dense"]) / statistics.median(rounds["sparse24"])
    r1 = {k: [round(t, 2) for t in v] for k, v in rounds.items()}
    print(f"  real: {report.summary()}\n  real: prefill {out['speedup']:.3f}x (dense "
          f"{r1['dense']} ms, sparse24 {r1['sparse24']} ms); generate equal: "
          f"{[g['equal'] for g in gens]}", flush=True)
    res["real"] = out
    target(res, "real model prefill speed-up", round(out["speedup"], 3),
           f">= 1.0 (within noise: >= {NOISE})", out["speedup"] >= NOISE)
    target(res, "real model greedy generate, 3 prompts x 32 tokens, equal to the unswapped model",
           [g["equal"] for g in gens], "all equal", all(g["equal"] for g in gens))


def versions() -> dict:
    """Device and library versions for the JSON."""
    import transformers
    return dict(device=torch.cuda.get_device_name(),
                capability=".".join(map(str, torch.cuda.get_device_capability())),
                torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, python=platform.python_version(),
                cusparselt_version=torch.backends.cusparselt.version())


PARTS = {"kernels": bench_kernels, "block": bench_block, "model2": bench_model2, "real": bench_real}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model folder exported at 2:4 by epts.py (--export-sparsity "
                   "2:4): the 'real' part")
    p.add_argument("--parts", nargs="+", choices=sorted(PARTS), default=list(PARTS),
                   help="what to measure (default: all; 'real' needs --model)")
    p.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192, 16384],
                   help="kernels: tokens per call")
    p.add_argument("--batch", type=int, default=8, help="sequences per prefill")
    p.add_argument("--seqlen", type=int, default=2048, help="tokens per sequence of a prefill")
    p.add_argument("--calls", type=int, default=10, help="timed calls per run (3 runs, median)")
    p.add_argument("--gen-calls", type=int, default=3,
                   help="timed generate calls per run (3 runs, median)")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions and token counts (a smoke run)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "nm_speed.json"))
    a = p.parse_args()
    if not torch.cuda.is_available() or epts_scale.cusparselt_missing(CUDA):
        why = epts_scale.cusparselt_missing(CUDA) if torch.cuda.is_available() else "no GPU"
        print(f"needs a CUDA GPU with cuSPARSELt: {why}")
        return 2
    if a.quick:
        a.calls, a.gen_calls, a.tokens = 3, 1, [min(a.tokens), max(a.tokens)]
    parts = [n for n in a.parts if n != "real" or a.model]
    if "real" in a.parts and not a.model:
        print("the 'real' part needs --model DIR: skipped")
    # to_sparse_semi_structured's one-time warning
    warnings.filterwarnings("ignore", message=".*prototype.*")
    t0 = time.perf_counter()
    settings = dict({k: v for k, v in vars(a).items() if k != "out"}, parts=parts, noise=NOISE,
                    dtype="bfloat16")
    res = dict(command=shlex.join(["python"] + sys.argv), **versions(), settings=settings,
               targets=[])
    print(f"{res['device']}  torch {res['torch']}  transformers {res['transformers']}  parts "
          f"{parts}", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    for name in parts:
        if name == "kernels":
            res["kernels"] = {}
        try:
            PARTS[name](a, res)
        except Exception as e:  # noqa: BLE001 - one failing part must not lose the others
            res[name] = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
            print(f"  {name}: ERROR {res[name]['error']}", flush=True)
        torch.cuda.empty_cache()
        res["wall_s"] = time.perf_counter() - t0
        with open(a.out, "w") as f:   # after every part: a crash later keeps what was measured
            json.dump(res, f, indent=1, default=str)
    met = sum(t["met"] for t in res["targets"])
    print(f"\ntargets met: {met} of {len(res['targets'])}; wrote {a.out} ({res['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
