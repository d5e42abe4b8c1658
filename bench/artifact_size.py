"""Size of the elastic artifact (--save) next to the base model: measured for the stand-in models,
computed for LLaMA-7B's and SmolLM2-135M's shapes at both recipes' ranks. The artifact holds K x
(A: r x in, B: out x r) per pruned linear plus one activation norm per input feature, and a JSON
header; no base weights, no masks.

    python bench/artifact_size.py --models ../shared/models/opt-mini ../shared/models/llama-mini
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402

CFG = epts.EPTSConfig()  # the paper's groups and rank: what `python epts.py --save` writes
K, R = len(CFG.groups), CFG.rank


def elastic_params(shapes: list[tuple[int, int]], rank: int = R) -> tuple[int, int]:
    """(adapter parameters, norm entries) for pruned linears of shapes (out, in): K groups x rank
    x (out + in)."""
    return sum(K * rank * (o + i) for o, i in shapes), sum(i for _, i in shapes)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+",
                   default=["../shared/models/opt-mini", "../shared/models/llama-mini"])
    a = p.parse_args()
    rows = []
    for path in a.models:
        model, tok = epts.load_model(path, "float32", torch.device("cpu"), verbose=False)
        windows = torch.randint(0, model.config.vocab_size, (2, 32),
                                generator=torch.Generator().manual_seed(0))
        state = epts.optimize(model, windows, epts.EPTSConfig(epochs=1))  # sizes only
        base = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
                   if f.endswith(".safetensors"))
        n_base = sum(p.numel() for p in model.parameters())
        shapes = [tuple(lin.weight.shape) for lin in epts.pruned_linears(model).values()]
        n_ad, n_norm = elastic_params(shapes)
        with tempfile.TemporaryDirectory() as d:
            sizes = {}
            for dt in ("float32", "bfloat16"):
                f = os.path.join(d, f"{dt}.safetensors")
                epts.save_elastic(state, f, getattr(torch, dt))
                sizes[dt] = os.path.getsize(f)
        rows.append((os.path.basename(path), n_base, base, n_ad + n_norm, sizes["float32"],
                     sizes["bfloat16"], True))
    # computed from the shapes (out, in) of the pruned linears, at both recipes' ranks (paper 8,
    # tuned 32): LLaMA-7B: 32 blocks of q,k,v,o (4096 x 4096), gate, up (11008 x 4096), down
    # (4096 x 11008); SmolLM2-135M: 30 blocks of q,o (576 x 576), k,v (192 x 576), gate, up
    # (1536 x 576), down (576 x 1536)
    llama_7b = 32 * ([(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)])
    smollm2 = 30 * ([(576, 576)] * 2 + [(192, 576)] * 2 + [(1536, 576)] * 2 + [(576, 1536)])
    computed = {"LLaMA-7B": (llama_7b, 6_738_415_616), "SmolLM2-135M": (smollm2, 134_515_008)}
    for name, (shapes, n_base) in computed.items():
        for recipe in ("paper", "tuned"):
            n_ad, n_norm = elastic_params(shapes, epts.recipe_config(recipe).rank)
            rows.append((f"{name}, {recipe} (computed)", n_base, 2 * n_base, n_ad + n_norm,
                         4 * n_ad + 4 * n_norm, 2 * n_ad + 4 * n_norm, False))
    print("| model | base params | base file (16-bit) | elastic params | artifact fp32 | "
          "artifact bf16 | bf16 / base |")
    print("|---|---|---|---|---|---|---|")
    for name, nb, bb, ne, s32, s16, measured in rows:
        print(f"| {name} | {nb / 1e6:.1f} M | {bb / 2**20:.1f} MiB | {ne / 1e6:.2f} M "
              f"({100 * ne / nb:.1f}%) | {s32 / 2**20:.1f} MiB | {s16 / 2**20:.1f} MiB | "
              f"{100 * s16 / bb:.1f}% |")


if __name__ == "__main__":
    main()
