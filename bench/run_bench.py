"""The side-by-side benchmark: EPTS (one elastic run) vs. dense, magnitude, Wanda, SparseGPT, RIA,
DSnoT and dedicated single-sparsity runs, plus uniform vs. OWL layer-wise sparsity, on the stand-in
models and SmolLM2-135M.

On the GPU machine (models and data copied into .cache/):

    python bench/run_bench.py --models .cache/models/opt-mini .cache/models/llama-mini \
        --calib .cache/data/calib.txt \
        --eval .cache/data/wikitext2/test.txt .cache/data/heldout.txt

writes results.json, results_tables.md (every table, read from results.json) and elasticity.png
into --out (default: bench/). `--methods ...` re-runs some methods and replaces their entries;
`--merge` adds partial runs made elsewhere (bench/smollm2.sh). The tables alone, from the committed
numbers, on any machine:

    python bench/run_bench.py --from bench/results.json --out bench

Every EPTS optimization runs as the command line runs it: epts_scale.optimize (all groups in one
block call, bf16 autocast and a CUDA graph on the GPU). RIA and DSnoT (`--methods ria dsnot`) come
from bench/pruners.py, in the sequential loop of Wanda and SparseGPT.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import shlex
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import epts  # noqa: E402
import epts_scale  # noqa: E402
import pruners  # noqa: E402  (bench/ is on the path: this script's folder)

SPARSITIES = [0.3, 0.4, 0.5, 0.6, 0.7]
# N:M patterns (N of every M consecutive inputs pruned), beside unstructured 0.5
NM = ["2:4", "4:8"]
BASELINES = ["magnitude", "wanda", "sparsegpt", "ria", "dsnot"]  # one pruning per sparsity
METHODS = [*BASELINES, "dedicated", "epts", "epts-owl", "wanda-owl", "epts-nm", "mask-only",
           "epts-tuned"]
# not in a default run: calibration-size ablation, adapters rounded to bf16
EXTRA = ["calib-sizes", "save-bf16"]
GRID = [round(0.05 * k, 2) for k in range(1, 15)]  # --grid: 0.05, 0.1, ..., 0.7 (the continuum)
DEDICATED = [0.5, 0.7]
OWL = [0.5, 0.6, 0.7]
# the rows of the perplexity tables; a method without results is left out
TABLE_METHODS = ["magnitude", "wanda", "sparsegpt", "ria", "dsnot", "dedicated", "epts",
                 "epts-tuned", "epts-nm"]
TABLES = "results_tables.md"  # what write_markdown writes into --out; RESULTS.md is by hand


def distilled(res: dict) -> list[str]:
    """The labels of the tuned runs with the distillation stage (--tuned-variants with
    distill_epochs: run_bench records their losses), N:M last."""
    runs = [k for k in res["methods"] if k.startswith("epts-tuned-")
            and f"{k.replace('-', '_')}_distill_losses" in res]
    return sorted(runs, key=lambda k: ("-nm-" in k, k))


def as_saved(state: epts.ElasticState, dtype: torch.dtype) -> epts.ElasticState:
    """The state as --save-dtype writes it and --load reads it back: every adapter rounded to
    `dtype`."""
    return dataclasses.replace(state, adapters={k: (A.to(dtype).float(), B.to(dtype).float())
                                                for k, (A, B) in state.adapters.items()})


def mask_only(state: epts.ElasticState) -> epts.ElasticState:
    """The masks EPTS deploys (Wanda scores of the dense stream) with no adapters: every B set to
    0."""
    return dataclasses.replace(state, adapters={k: (A, torch.zeros_like(B))
                                                for k, (A, B) in state.adapters.items()})


TUNED_FIELDS = {f.name for f in dataclasses.fields(epts.TunedRecipe)}
# the names these fields had before epts.TunedRecipe (as in RESULTS.md's commands): name -> (the
# TunedRecipe field, its value from the old one)
OLD_FIELDS = {"group0_input": ("group0_dense_input", lambda v: v == "dense"),
              "low_gain": ("fit_gain", lambda v: v == "fit")}


def config_with(cfg: epts.EPTSConfig, fields: dict) -> epts.EPTSConfig:
    """`cfg` with JSON `fields` replaced: EPTSConfig fields, and the tuned recipe's switches
    (epts.TunedRecipe's fields, or their old names group0_input="dense" / low_gain="fit"). A switch
    on the paper's recipe (no TunedRecipe) starts from all four off."""
    fields = dict(fields)
    for old, (new, value) in OLD_FIELDS.items():
        if old in fields:
            fields[new] = value(fields.pop(old))
    switches = {k: fields.pop(k) for k in list(fields) if k in TUNED_FIELDS}
    if switches:
        off = epts.TunedRecipe(**dict.fromkeys(TUNED_FIELDS, False))
        fields["tuned"] = dataclasses.replace(cfg.tuned or off, **switches)
    return dataclasses.replace(cfg, **fields)


def fast(path: str):
    """optimize(model, windows, cfg, device) as the command line runs it (epts_scale)."""
    options = epts_scale.Options(base_model=path)
    return lambda model, windows, cfg, device: epts_scale.optimize(model, windows, cfg, device,
                                                                   options)


def pruner_sweep(model, method: str, targets, dense: dict, evaluate, windows: torch.Tensor,
                 device: torch.device):
    """epts.sweep for bench/pruners.py's methods (RIA, DSnoT): the same rows, one pruning from
    the dense weights per target; the dense weights are back at the end."""
    try:
        for target in targets:
            lap = epts.stopwatch(device)
            epts.restore_dense(model, dense)
            pruners.prune(model, method, windows, target, device)
            row = {"sparsity": target, "achieved_sparsity": epts.measured_sparsity(model),
                   "seconds": lap()}
            row["ppl"] = evaluate(target)
            yield row
    finally:
        epts.restore_dense(model, dense)


def bench_model(path: str, a: argparse.Namespace, device: torch.device) -> dict:
    model, tok = epts.load_model(path, "float32", device, verbose=False)
    model.to(device)  # small models: all on the GPU (the loops still move one block at a time)
    windows = epts.calibration_windows(tok, a.calib, a.nsamples, a.seqlen, a.seed)
    tokens = {os.path.basename(e): epts.eval_tokens(tok, e, a.seqlen) for e in a.eval}
    dense = epts.snapshot_linears(model)
    cfg = epts.EPTSConfig(epochs=a.epochs, seed=a.seed)
    optimize = fast(path)
    out: dict = {"methods": {}}

    def evaluate(sparsity: float = 0.0) -> dict[str, float]:
        return {e: epts.perplexity(model, t, a.seqlen, device, 8) for e, t in tokens.items()}

    def record(method: str, targets, schedule=None, label: str | None = None, **how) -> None:
        """The shared method x sparsity loop (epts.sweep; pruner_sweep for RIA and DSnoT); one
        results.json entry per sparsity, labelled str(s), under `label` (default: the method,
        "-owl" appended with a schedule)."""
        label = label or (method if schedule is None else f"{method}-owl")
        if method in pruners.METHODS:
            rows = pruner_sweep(model, method, targets, dense, evaluate, windows, device)
        else:
            rows = epts.sweep(model, method, targets, dense, evaluate, schedule, windows=windows,
                              cfg=cfg, device=device, optimizer=optimize, **how)
        for row in rows:
            out["methods"].setdefault(label, {})[str(row["sparsity"])] = row
            print(f"{os.path.basename(path)} {label:>12} {row['sparsity']:>5}: " +
                  " ".join(f"{e} {v:.3f}" for e, v in row["ppl"].items()) +
                  f"  achieved {row['achieved_sparsity']:.4f}  {row['seconds']:.1f}s", flush=True)

    def timed(key: str, windows: torch.Tensor, cfg: epts.EPTSConfig) -> epts.ElasticState:
        """One EPTS optimization; its seconds go into out[key]."""
        lap = epts.stopwatch(device)
        state = optimize(model, windows, cfg, device)
        out[key.replace("-", "_")] = lap()
        return state

    def owl_of(state: epts.ElasticState):
        """s -> OWL's per-block sparsities for `state`, clamped to its trained range."""
        return lambda s: epts.owl_sparsities(dense, state.act_norms, s,
                                             limits=(0.0, state.groups[-1][1]))

    blockwise: dict[str, tuple[epts.ElasticState, float]] = {}

    def tuned_run(key: str, cfg: epts.EPTSConfig) -> epts.ElasticState:
        """timed() for the tuned recipe; runs that differ only in the distillation stage share
        one block-wise pass (a copy of its state is distilled): their seconds are that pass's
        plus their own distillation's."""
        first = dataclasses.replace(cfg, tuned=dataclasses.replace(cfg.tuned, distill_epochs=0))
        if repr(first) not in blockwise:
            blockwise[repr(first)] = (timed(key, windows, first), out[key.replace("-", "_")])
        state, seconds = copy.deepcopy(blockwise[repr(first)][0]), blockwise[repr(first)][1]
        if cfg.tuned.distill_epochs:
            lap = epts.stopwatch(device)
            losses = epts_scale.distill(model, state, windows, cfg, device,
                                        epts_scale.Options(verbose=False))
            distilled = lap()
            out[key.replace("-", "_").replace("_optimize_seconds", "_distill_losses")] = losses
            print(f"{key.removesuffix('_optimize_seconds')}: block-wise pass {seconds:.1f}s + "
                  f"distillation {distilled:.1f}s, KL per epoch "
                  f"{[round(x, 4) for x in losses]}", flush=True)
            seconds += distilled
        out[key.replace("-", "_")] = seconds
        return state

    dense_row = {"ppl": evaluate(), "achieved_sparsity": 0.0, "seconds": 0.0}
    out["methods"]["dense"] = {"0.0": dense_row}
    for method in BASELINES:
        if method in a.methods:
            record(method, SPARSITIES + NM)
    if "dedicated" in a.methods:
        record("dedicated", a.dedicated)  # a dedicated N:M run trains on N:M masks
    if "epts-nm" in a.methods:  # not the paper's: the group of 0.5 also trained on 2:4 masks
        nm_state = timed("epts_nm_optimize_seconds", windows,
                         dataclasses.replace(cfg, nm_train=NM[0]))
        record("epts", SPARSITIES + NM, label="epts-nm", state=nm_state)
    grid = [s for s in GRID if s not in SPARSITIES] if a.grid else []
    if "epts-tuned" in a.methods:  # the tuned recipe (not the paper's): recipe_config("tuned")
        variants = {} if a.variants_only else {"epts-tuned": {}}
        variants.update({f"epts-tuned-{k}": v for k, v in json.loads(a.tuned_variants).items()})
        for label, overrides in variants.items():
            tuned_cfg = config_with(epts.recipe_config("tuned", epochs=a.epochs, seed=a.seed),
                                    overrides)
            tuned = tuned_run(f"{label}_optimize_seconds", tuned_cfg)
            out[f"{label}_gains".replace("-", "_")] = [r.group0_gain for r in tuned.reports]
            record("epts", SPARSITIES + NM + grid, label=label, state=tuned)
            if a.tuned_owl:  # the same elastic model with OWL's per-block sparsities
                record("epts", OWL, owl_of(tuned), label=f"{label}-owl", state=tuned)
            if "save-bf16" in a.methods and not overrides:
                record("epts", SPARSITIES + NM, label="epts-tuned-bf16",
                       state=as_saved(tuned, torch.bfloat16))
    if "calib-sizes" in a.methods:  # EPTS (both recipes) on the first n windows of the same draw
        for n in a.calib_sizes:
            few = epts.calibration_windows(tok, a.calib, n, a.seqlen, a.seed)
            for recipe in ("paper", "tuned"):
                label = f"epts{'-tuned' if recipe == 'tuned' else ''}-n{n}"
                st = timed(f"{label}_optimize_seconds", few,
                           epts.recipe_config(recipe, epochs=a.epochs, seed=a.seed))
                record("epts", [0.5, 0.7], label=label, state=st)
    if "wanda-owl" in a.methods:
        dense_norms = epts.dense_act_norms(model, windows, device)
        record("wanda", OWL, lambda s: epts.owl_sparsities(dense, dense_norms, s))
    if not {"epts", "epts-owl", "mask-only"} & set(a.methods):
        return out
    state = timed("epts_optimize_seconds", windows, cfg)
    # "low_group_enabled": the key the tables read (group 0's adapter kept: a gain above 0)
    out["epts_blocks"] = [{"low_group_enabled": r.group0_gain > 0, "low_check": r.low_check,
                           "seconds": r.seconds, "loss_first_epoch": r.loss_history[0],
                           "loss_last_epoch": r.loss_history[-1]} for r in state.reports]
    if "epts" in a.methods:
        record("epts", SPARSITIES + NM + grid, state=state)
    if "save-bf16" in a.methods:  # the artifact in bf16: does rounding the adapters move the ppl?
        record("epts", SPARSITIES + NM, label="epts-bf16", state=as_saved(state, torch.bfloat16))
    if "mask-only" in a.methods:  # the masks EPTS deploys (dense-stream Wanda scores), no adapters
        record("epts", SPARSITIES + NM + grid, label="mask-only", state=mask_only(state))
    # non-uniform deployment: OWL layer-wise sparsity, from the same elastic model and for Wanda
    if "epts-owl" in a.methods:
        record("epts", OWL, owl_of(state), state=state)
    return out


def fmt_table(res: dict, metric: str, methods: list[str], labels: list[str]) -> list[str]:
    lines = ["| method | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for m in methods:
        if m not in res["methods"]:
            continue
        cells = []
        for label in labels:
            row = res["methods"][m].get(label)
            cells.append("" if row is None else f"{row['ppl'][metric]:.2f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(results: dict, path: str) -> None:
    env, config = results["env"], results["config"]
    L = ["# Benchmark tables", "",
         "Written by `bench/run_bench.py` from `bench/results.json`; do not edit by hand. "
         "Regenerate with `python bench/run_bench.py --from bench/results.json --out bench`. What "
         "the numbers mean: [RESULTS.md](RESULTS.md).", "",
         "The base run (the re-runs listed below replace some of its entries): "
         f"{env['gpu']}, torch {env['torch']}, transformers {env['transformers']}, Python "
         f"{env['python']}; wall time {env['wall_seconds']:.0f} s.", "", "Command:", "", "```",
         env["command"], "```", "",
         f"Calibration: {config['nsamples']} x {config['seqlen']} tokens of `calib.txt`, seed "
         f"{config['seed']}; EPTS at the paper's defaults (7 groups, rank 8, {config['epochs']} "
         "epochs, batch 1, lr 1e-3, mixer 0.1x4/0.2x3). Perplexity on non-overlapping windows of "
         "the same length. WikiText-2 here is the tokenized release: not comparable to papers' "
         "raw-release numbers. (The first run's settings; each re-run's command below shows its "
         "own, e.g. `--seqlen 2048` for SmolLM2-135M.)", ""]
    for r in results.get("reruns", []):
        env_r = r.get("env", {})
        replaced = ("a check that did not replace those entries" if r.get("check_only")
                    else "replacing those entries")
        wall = f", {env_r['wall_seconds']:.0f} s" if "wall_seconds" in env_r else ""
        L += [f"Re-run later for {', '.join(r['methods'])} ({env_r.get('gpu', '?')}{wall}), "
              + replaced
              + (f" ({r['note']})" if r.get("note") else "") + ":", "", "```", r["command"],
              "```", ""]
    labels = [str(s) for s in SPARSITIES]
    for name, res in results["models"].items():
        L += [f"## {name}", ""]
        evals = list(res["methods"]["dense"]["0.0"]["ppl"])
        dense = res["methods"]["dense"]["0.0"]["ppl"]
        for e in evals:
            L += [f"Perplexity on `{e}` (dense: {dense[e]:.2f}), by sparsity:", ""]
            L += fmt_table(res, e, TABLE_METHODS + distilled(res), labels) + [""]
        L += ["N:M patterns (what GPU sparse tensor cores run) beside unstructured 0.5; EPTS "
              "deploys the N:M mask of the same scores with the adapters of the group holding N/M "
              "(trained on unstructured masks); the dedicated run is trained on 2:4 masks:", ""]
        for e in evals[:1]:
            L += fmt_table(res, e, TABLE_METHODS + distilled(res), ["0.5"] + NM) + [""]
        if "mask-only" in res["methods"]:
            grid = sorted((lab for lab in res["methods"]["mask-only"] if ":" not in lab),
                          key=float)
            L += ["The continuum (`--grid`): the elastic model vs. `mask-only` (the masks EPTS "
                  "deploys -- Wanda scores of the dense stream -- with no adapters), by "
                  "sparsity:", ""]
            for e in evals[:1]:
                L += fmt_table(res, e, ["epts", "epts-tuned", *distilled(res), "mask-only"],
                               grid) + [""]
            if name == next(iter(results["models"])):  # one figure holds every model
                L += ["![ppl / dense against s](elasticity.png)", ""]
        L += ["Non-uniform (OWL, lambda 0.08, M 5) vs. uniform, same elastic model; per-block "
              "sparsities clamped to the trained range [0, 0.7] for EPTS:", ""]
        for e in evals[:1]:
            tuned_owl = sorted(k for k in res["methods"]
                               if k.startswith("epts-tuned") and k.endswith("-owl"))
            L += fmt_table(res, e, ["epts", "epts-owl", "wanda", "wanda-owl", *tuned_owl],
                           [str(s) for s in OWL]) + [""]
        m = res["methods"]
        ach = {k: f"{m[k][str(OWL[-1])]['achieved_sparsity']:.4f}"
               for k in ("epts-owl", "wanda-owl") if k in m}
        L += [f"Achieved overall sparsity at {OWL[-1]} with OWL: "
              + ", ".join(f"{k} {v}" for k, v in ach.items()), ""]
        L += targets(res, evals[0])
        L += distill_targets(res, evals[0])
        L += calib_and_dtype_tables(res, evals[0])
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def targets(res: dict, e0: str) -> list[str]:
    """The targets of both recipes on `e0`, the optimization time and the time of five
    sparsities."""
    m = res["methods"]
    ep = {s: m["epts"][str(s)]["ppl"][e0] for s in SPARSITIES}
    L = ["Targets of the paper's recipe (`epts`), on `" + e0 + "`:", ""]
    for s in SPARSITIES:
        w = m["wanda"][str(s)]["ppl"][e0]
        L.append(f"- {s}: EPTS {ep[s]:.2f} vs Wanda {w:.2f} -> {verdict(ep[s] <= w)}")
    for s in (0.5, 0.6, 0.7):
        g = m["sparsegpt"][str(s)]["ppl"][e0]
        L.append(f"- {s}: EPTS {ep[s]:.2f} vs SparseGPT {g:.2f} -> {verdict(ep[s] <= g)}")
    for s in DEDICATED:
        d = m["dedicated"][str(s)]["ppl"][e0]
        L.append(f"- {s}: EPTS {ep[s]:.2f} vs 1.05 x dedicated {1.05 * d:.2f} -> "
                 f"{verdict(ep[s] <= 1.05 * d)}")
    if "epts-tuned" in m:
        L += ["", "Targets of the tuned recipe (`epts-tuned`), on `" + e0 + "`:", ""]
        t = {lab: row["ppl"][e0] for lab, row in m["epts-tuned"].items()}
        for s in SPARSITIES:
            best = min(m["wanda"][str(s)]["ppl"][e0], m["sparsegpt"][str(s)]["ppl"][e0])
            L.append(f"- {s}: tuned {t[str(s)]:.2f} vs min(Wanda, SparseGPT) {best:.2f} -> "
                     f"{verdict(t[str(s)] <= best)}")
        worse = [lab for lab, row in m.get("mask-only", {}).items()
                 if lab in t and t[lab] > row["ppl"][e0]]
        L.append("- tuned <= mask-only at every grid point: "
                 + ("met" if not worse else "MISSED at " + ", ".join(worse)))
        for s in DEDICATED:
            d = m["dedicated"][str(s)]["ppl"][e0]
            L.append(f"- {s}: tuned {t[str(s)]:.2f} vs 1.05 x dedicated {1.05 * d:.2f} -> "
                     f"{verdict(t[str(s)] <= 1.05 * d)}")
        tuned_s, paper_s = res["epts_tuned_optimize_seconds"], res["epts_optimize_seconds"]
        ratio = tuned_s / paper_s
        L.append(f"- time: tuned {tuned_s:.1f} s vs paper {paper_s:.1f} s = {ratio:.2f}x -> "
                 f"{verdict(ratio <= 1.3)} (<= 1.3x)")
    ded = [m["dedicated"][str(s)]["seconds"] for s in DEDICATED]
    mean, optimize_s = sum(ded) / len(ded), res["epts_optimize_seconds"]
    L.append(f"- time: EPTS {optimize_s:.1f} s vs 0.5 x five dedicated runs "
             f"(mean of the runs at {DEDICATED}: {mean:.1f} s, x5 = {5 * mean:.1f} s) -> "
             f"{verdict(optimize_s <= 0.5 * 5 * mean)}")
    blocks = res["epts_blocks"]
    per_block = [b["seconds"]["total"] for b in blocks]
    phase1 = sum(b["seconds"]["phase1"] for b in blocks) / len(blocks)
    kept = sum(b["low_group_enabled"] for b in blocks)
    L += ["", f"EPTS optimization: {optimize_s:.1f} s in all, "
              f"{sum(per_block) / len(per_block):.2f} s per block on average "
              f"(Phase 1 {phase1:.2f} s); low-group adapter kept in {kept} of {len(blocks)} "
              "blocks.", ""]

    def five(k: str) -> float:
        return sum(m[k][str(s)]["seconds"] for s in SPARSITIES)
    # magnitude, Wanda and SparseGPT always; RIA and DSnoT where measured
    baselines = ["magnitude", "wanda", "sparsegpt"] + [k for k in ("ria", "dsnot") if k in m]
    L += ["Time to produce the five sparsities (s): "
          + ", ".join(f"{k} {five(k):.1f}" for k in baselines)
          + f", EPTS {optimize_s + five('epts'):.1f} (optimize once + five deploys).", ""]
    return L


def distill_targets(res: dict, e0: str) -> list[str]:
    """The quality targets of the tuned recipe + the distillation stage: 0.5 <= 1.30 x dense,
    0.7 <= 2.8 x dense, nowhere on the grid worse than the tuned recipe or the mask alone, the
    elastic 2:4 model <= 1.05 x the dedicated 2:4 run."""
    m, L = res["methods"], []
    dense = m["dense"]["0.0"]["ppl"][e0]
    runs = distilled(res)
    owl = [f"{k}-owl" for k in runs if f"{k}-owl" in m]  # 0.5 and 0.7 only
    for label in runs + owl:
        d = {lab: row["ppl"][e0] for lab, row in m[label].items()}
        L += [f"Targets of `{label}` (the tuned recipe + the distillation stage), on `{e0}`:", ""]
        for s, bound in ((0.5, 1.30), (0.7, 2.8)):
            if str(s) in d:
                L.append(f"- {s}: {d[str(s)]:.2f} = {d[str(s)] / dense:.3f} x dense -> "
                         f"{verdict(d[str(s)] <= bound * dense)} (<= {bound} x)")
        for base in ("epts-tuned", "mask-only"):
            shared = [lab for lab in m.get(base, {}) if lab in d and ":" not in lab]
            worse = [lab for lab in shared if d[lab] > m[base][lab]["ppl"][e0]]
            if len(shared) > len(SPARSITIES):  # a grid was run
                L.append(f"- <= {base} at each of {len(shared)} sparsities: "
                         + ("met" if not worse else "MISSED at " + ", ".join(worse)))
        if "2:4" in d and "2:4" in m.get("dedicated", {}):
            ratio = d["2:4"] / m["dedicated"]["2:4"]["ppl"][e0]
            L.append(f"- 2:4: {d['2:4']:.2f} = {ratio:.3f} x the dedicated 2:4 run -> "
                     f"{verdict(ratio <= 1.05)} (<= 1.05 x)")
        L.append("")  # (time: see the re-run's note; its GPU may not be the tuned run's)
    return L


def calib_and_dtype_tables(res: dict, e0: str) -> list[str]:
    """The calibration-size ablation (calib-sizes) and the adapters rounded to bf16 (save-bf16),
    where measured."""
    m, L = res["methods"], []
    sizes = sorted({int(k.rsplit("-n", 1)[1]) for k in m
                    if k.startswith("epts") and k.rsplit("-n", 1)[-1].isdigit()})
    if sizes:
        n_full = res.get("nsamples", 128)
        L += [f"Calibration size: EPTS on the first n windows of the same draw (n = {n_full}: "
              f"the main run), perplexity on `{e0}` and optimization seconds:", "",
              "| recipe | n | 0.5 | 0.7 | seconds |", "|---|---|---|---|---|"]
        for recipe, base in (("paper", "epts"), ("tuned", "epts-tuned")):
            for n in sizes + [None]:
                label = f"{base}-n{n}" if n else base
                if label in m:
                    secs = res.get(f"{label}_optimize_seconds".replace("-", "_"), float("nan"))
                    L.append(f"| {recipe} | {n or n_full} | {m[label]['0.5']['ppl'][e0]:.2f} | "
                             f"{m[label]['0.7']['ppl'][e0]:.2f} | {secs:.0f} |")
        L.append("")
    for base in ("epts", "epts-tuned"):
        if f"{base}-bf16" in m:
            labels = list(m[f"{base}-bf16"])
            worst = max(abs(m[f"{base}-bf16"][k]["ppl"][e0] / m[base][k]["ppl"][e0] - 1)
                        for k in labels)
            L += [f"`{base}` with its adapters rounded to bf16 (`--save-dtype bfloat16`) vs fp32, "
                  f"on `{e0}`: largest relative change {100 * worst:.3f}% over "
                  f"{', '.join(labels)}.", ""]
    return L


# the figure's curves: method, marker and line style, legend; colour Ck for the k-th
CURVES = [("epts", "o-", "EPTS (paper recipe, one run)"),
          ("epts-tuned", "*-", "EPTS --recipe tuned (one run)"),
          ("epts-tuned-distill12", "P-", "EPTS --recipe tuned --distill-epochs 12 (one run)"),
          ("mask-only", "s--", "mask-only (EPTS masks, no adapters)"),
          ("wanda", "^:", "Wanda (one run per s)"),
          ("sparsegpt", "v:", "SparseGPT (one run per s)"),
          ("dedicated", "D", "dedicated (one run per s)"),
          ("ria", "<:", "RIA (one run per s)"),
          ("dsnot", ">:", "DSnoT (one run per s)")]


def plot_elasticity(results: dict, path: str) -> None:
    """ppl / dense against s for the elastic model, its masks alone, and the
    one-run-per-sparsity baselines; a method a model lacks has no curve there."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter
    n = len(results["models"])
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)
    legend = {}  # label -> one line of it, over all models, in CURVES' order below
    for ax, (name, res) in zip(axes[0], results["models"].items()):
        m = res["methods"]
        e0 = next(iter(m["dense"]["0.0"]["ppl"]))
        dense = m["dense"]["0.0"]["ppl"][e0]
        for color, (method, style, label) in enumerate(CURVES):
            if method not in m:
                continue
            labels = sorted((lab for lab in m[method] if ":" not in lab), key=float)
            line, = ax.plot([float(lab) for lab in labels],
                            [m[method][lab]["ppl"][e0] / dense for lab in labels], style,
                            color=f"C{color}", label=label, ms=4)
            legend.setdefault(label, line)
        for lo, hi in [(0, .4), (.45, .5), (.55, .6), (.65, .7)]:
            ax.axvspan(lo, hi, color="grey", alpha=0.07)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_yticks([1, 1.1, 1.25, 1.5, 2, 3, 5, 7, 10])
        ax.set_ylim(0.97, 10)  # higher (the baselines' collapse at 0.7) is cut off
        ax.set_xlabel("sparsity s (shaded: groups 0, 2, 4, 6)")
        ax.set_ylabel("perplexity / dense (log scale)")
        ax.set_title(f"{name}: {e0}, dense {dense:.2f}")
        ax.grid(alpha=.3)
    order = [label for _, _, label in CURVES if label in legend]
    axes[0][0].legend([legend[label] for label in order], order, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=[])
    p.add_argument("--calib")
    p.add_argument("--eval", nargs="+")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__))))
    p.add_argument("--tuned-variants", default="{}",
                   help="JSON name -> EPTSConfig fields or epts.TunedRecipe switches over the "
                        "tuned recipe: more epts-tuned-<name> runs")
    p.add_argument("--tuned-owl", action="store_true",
                   help="epts-tuned: also deploy each tuned run at 0.5, 0.6, 0.7 with OWL's "
                        "per-block sparsities (label <run>-owl)")
    p.add_argument("--variants-only", action="store_true",
                   help="epts-tuned: run only the --tuned-variants, not the tuned recipe itself")
    p.add_argument("--dedicated", nargs="+", type=epts.sparsity_arg, default=DEDICATED + NM,
                   help="sparsities (or N:M) of the dedicated runs")
    p.add_argument("--calib-sizes", nargs="+", type=int, default=[16, 32],
                   help="calib-sizes: calibration windows of the ablation's runs (the full run "
                        "gives --nsamples)")
    p.add_argument("--merge", nargs="+", default=[],
                   help="results.json files of fresh partial runs (run on other GPUs) to merge "
                        "into --from, each recorded as a re-run with its own command")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS + EXTRA,
                   help="re-run only these; their entries replace those in the --out "
                        "results.json")
    p.add_argument("--grid", action="store_true",
                   help="also evaluate epts and mask-only at 0.05, 0.1, ..., 0.7")
    p.add_argument("--from", dest="previous",
                   help="results.json to update with --methods (default: --out's); alone (no "
                        "--models, no --merge): only rewrite --out's results_tables.md and "
                        "elasticity.png from it")
    a = p.parse_args()
    if a.previous and not a.merge and not a.models:  # the tables and figure alone, from the file
        with open(a.previous) as f:
            results = json.load(f)
        os.makedirs(a.out, exist_ok=True)
        write_markdown(results, os.path.join(a.out, TABLES))
        plot_elasticity(results, os.path.join(a.out, "elasticity.png"))
        print(f"wrote {os.path.join(a.out, TABLES)} and elasticity.png")
        return
    if not a.merge and not (a.models and a.calib and a.eval):
        p.error("--models, --calib and --eval are needed (unless --merge, or --from alone to "
                "rewrite the tables)")
    t0 = time.perf_counter()
    results = {"config": vars(a), "models": {}}
    previous = a.previous or os.path.join(a.out, "results.json")
    partial = a.methods != METHODS
    # a partial run on its own: results.json only, merged later
    fresh = partial and not os.path.exists(previous)
    if (partial or a.merge) and not fresh:  # keep every other entry of the previous results
        with open(previous) as f:
            results = json.load(f)
    for part_file in a.merge:
        with open(part_file) as f:
            part = json.load(f)
        for name, res in part["models"].items():
            update(results, name, res)
        results.setdefault("reruns", []).extend(part["reruns"])
    if a.merge:
        write_all(results, a, None, t0, env=False)
        return
    device = epts.pick_device("auto")
    if partial:
        results.setdefault("reruns", []).append({"methods": a.methods,
                                                 "command": "python " + shlex.join(sys.argv)})
    for path in a.models:
        name = os.path.basename(path.rstrip("/"))
        new = bench_model(path, a, device)
        if partial:
            update(results, name, new)
        else:
            results["models"][name] = new
        # after every model: a run cut short keeps its part
        write_all(results, a, device, t0, markdown=not fresh)
    if not fresh:
        print(open(os.path.join(a.out, TABLES)).read())


def update(results: dict, name: str, new: dict) -> None:
    """Put a partial run's entries for model `name` into `results`, replacing those of the same
    label."""
    model = results["models"].setdefault(name, {"methods": {}})
    model["methods"].update(new["methods"])
    model.update({k: v for k, v in new.items() if k != "methods"})


def write_all(results: dict, a: argparse.Namespace, device: torch.device | None, t0: float,
              markdown: bool = True, env: bool = True) -> None:
    import transformers
    gpu = (torch.cuda.get_device_name() if device is not None and device.type == "cuda"
           else None)
    if env and a.methods != METHODS:  # the full run's environment stays; a re-run records its own
        results["reruns"][-1]["env"] = {"gpu": gpu or "cpu",
                                        "wall_seconds": time.perf_counter() - t0}
    elif env:  # (a merge keeps every entry's own environment)
        results["env"] = {"gpu": gpu or platform.processor() or "cpu", "torch": torch.__version__,
                          "transformers": transformers.__version__,
                          "python": platform.python_version(),
                          "wall_seconds": time.perf_counter() - t0,
                          "command": "python " + shlex.join(sys.argv)}
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    if not markdown:
        return
    write_markdown(results, os.path.join(a.out, TABLES))
    if any("mask-only" in r["methods"] for r in results["models"].values()):
        plot_elasticity(results, os.path.join(a.out, "elasticity.png"))


if __name__ == "__main__":
    main()
