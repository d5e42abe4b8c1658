"""The command line end to end on a full-size checkpoint: build a random-weight LLaMA-7B- or
OPT-1.3B-shaped model from a config, save it in bf16 to local disk (never the repo), then run
`python epts.py` on it -- load, calibrate, optimize every block, export at one sparsity, evaluate
on a slice -- and check that the export loads with plain transformers and has exactly
floor(s * in) zeros per row.

    # on the GPU machine
    python bench/e2e.py --shape llama-7b --workdir /tmp/e2e --nsamples 16 --low-memory
    # a CPU smoke test
    python bench/e2e.py --shape tiny --workdir /tmp/e2e-tiny --out /tmp/e2e.json \
        --tokenizer ../shared/models/llama-mini --calib ../shared/data/calib.txt \
        --eval ../shared/data/wikitext2/test.txt

The result goes into --out (default bench/scale.json) under "e2e" -> the shape, next to
bench/scale.py's numbers; other entries of the file are kept. epts.py's command line runs with
epts_scale.py beside it, as a user runs it.

Random weights: time and memory do not depend on the values, perplexities are meaningless. The
tokenizer is the stand-ins' (byte-level BPE, 8192 ids, from --tokenizer), which only ever produces
ids below the vocab size. Records wall time per stage (build+save, the CLI run, and inside it
optimize and every evaluated row, export check), peak GPU memory
(torch.cuda.max_memory_allocated, in-process) and peak host memory (ru_maxrss).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
from scale import SHAPES, build  # noqa: E402

TINY = dict(arch="llama", hidden=64, ffn=176, heads=4, kv_heads=4, layers=2, vocab=8192)


def save_checkpoint(shape: dict, folder: str, tokenizer: str, seqlen: int) -> float:
    """A random model of `shape` saved as a bf16 HF checkpoint with the stand-ins' tokenizer;
    returns seconds."""
    t0 = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(shape, shape["layers"], seqlen, device).to(torch.bfloat16)
    model.save_pretrained(folder)
    for f in os.listdir(tokenizer):
        if f.startswith("tokenizer"):
            shutil.copy(os.path.join(tokenizer, f), folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return time.perf_counter() - t0


def check_export(folder: str, sparsity: float) -> dict:
    """The export loads with AutoModelForCausalLM and every pruned linear has exactly
    floor(s * in) zeros per row."""
    from transformers import AutoModelForCausalLM
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    linears = epts.pruned_linears(model).values()
    exact = all(bool(((lin.weight == 0).sum(1)
                      == math.floor(sparsity * lin.in_features + 1e-6)).all()) for lin in linears)
    return {"loads": True, "exact_zeros_per_row": exact, "linears": len(linears),
            "dtype": str(next(model.parameters()).dtype), "seconds": time.perf_counter() - t0}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama-7b", choices=[*SHAPES, "tiny"])
    p.add_argument("--workdir", default="/tmp/epts-e2e",
                   help="local disk for the checkpoint and the export")
    p.add_argument("--tokenizer", default=".cache/models/llama-mini")
    p.add_argument("--calib", default=".cache/data/calib.txt")
    p.add_argument("--eval", default=".cache/data/wikitext2/test.txt")
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  "scale.json"),
                   help='a JSON file to put the result in, under "e2e" -> --shape (other entries '
                        'are kept)')
    p.add_argument("--low-memory", action="store_true", help="pass --low-memory to the CLI")
    a = p.parse_args()
    shape = TINY if a.shape == "tiny" else SHAPES[a.shape]
    if a.shape == "tiny":
        a.nsamples, a.seqlen = min(a.nsamples, 4), min(a.seqlen, 64)
        a.eval_tokens = min(a.eval_tokens, 256)
    shutil.rmtree(a.workdir, ignore_errors=True)
    model_dir, export_dir = os.path.join(a.workdir, "model"), os.path.join(a.workdir, "export")
    res = {"shape": a.shape, **shape, "command": "python " + " ".join(sys.argv),
           "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    res["build_and_save_seconds"] = save_checkpoint(shape, model_dir, a.tokenizer, a.seqlen)
    argv = ["--model", model_dir, "--calib", a.calib, "--eval", a.eval,
            "--eval-tokens", str(a.eval_tokens), "--nsamples", str(a.nsamples),
            "--seqlen", str(a.seqlen), "--epochs", str(a.epochs), "--sparsities", str(a.sparsity),
            "--export-sparsity", str(a.sparsity), "--export-dir", export_dir,
            "--json-out", os.path.join(a.workdir, "cli.json"), "--quiet"]
    argv += ["--low-memory"] if a.low_memory else []
    res["cli_argv"] = argv
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    res["cli_status"] = epts.main(argv)
    res["cli_seconds"] = time.perf_counter() - t0
    res["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() / 2 ** 30
                           if torch.cuda.is_available() else None)
    res["peak_host_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    if res["cli_status"] == 0:
        with open(os.path.join(a.workdir, "cli.json")) as f:
            cli = json.load(f)
        res["optimize_seconds"] = cli["optimize_seconds"]
        res["rows"] = cli["results"]
        res["dense_ppl"] = cli["dense"]
        res["export"] = check_export(export_dir, a.sparsity)
    print(json.dumps(res, indent=1, default=str))
    everything = {}
    if os.path.exists(a.out):
        with open(a.out) as f:
            everything = json.load(f)
    everything.setdefault("e2e", {})[a.shape] = res
    with open(a.out, "w") as f:
        json.dump(everything, f, indent=1, default=str)


if __name__ == "__main__":
    main()
