"""The learned policy's held-out evaluation (docs/policies.md, "Learned eviction"): prints the tables as markdown.

    python scripts/learned_eval.py [--skip-synthetic] [--skip-timed]

1. The real gpt-oss-20b trace, split by sequence (the first half trained the shipped model,
   strategies/models/gpt-oss-20b.policy.safetensors): per_layer hit rates of LRU, LFRU, class_lru, the learned
   policy and Belady on the held-out half at 4, 8, 12 and 16 slots per layer, and the share of the LRU-Belady gap
   the learned policy closes.
2. The synthetic presets of other models: a model trained on each preset's first half of sequences (25% of the
   experts per layer, at least top-k; a wider request is served in waves), evaluated on its second half.
3. Tokens/s on the held-out half (sim, whole model timed, 25% of the experts in VRAM) under rtx-4090 and h200:
   the learned policy against LRU, LFRU and every deployable preset (the best named).
Deterministic: the same trace, seed and options give the same numbers (the training fit runs on the CPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moesim.importers import open_trace  # noqa: E402
from moesim.synthetic import preset_trace  # noqa: E402
from moesim.train import hit_rates, split_by_sequence, train_policy  # noqa: E402

POLICIES = {"LRU": ("lru", None), "LFRU": ("lfru", None), "class_lru": ("class_lru", None)}


def gap(r: dict) -> str:
    closed = (r["learned"] - r["LRU"]) / max(r["Belady"] - r["LRU"], 1e-12)
    return f"{closed:.0%}"


def real_table(trace) -> None:
    cut, n = split_by_sequence(trace, 0.5)
    held = trace.slice_tokens(cut, trace.n_tokens)
    print(f"Held-out half: sequences {n}-{trace.n_seqs - 1} ({held.n_tokens} tokens); per_layer scope.\n")
    print("| slots per layer | LRU | LFRU | class_lru | learned | Belady | gap closed |")
    print("|---|---|---|---|---|---|---|")
    for slots in (4, 8, 12, 16):
        r = hit_rates(held, POLICIES | {"learned": ("learned", {"model": "gpt-oss-20b"}), "Belady": ("belady", None)},
                      slots)
        print(f"| {slots} | " + " | ".join(f"{r[k]:.4f}" for k in ("LRU", "LFRU", "class_lru", "learned", "Belady"))
              + f" | {gap(r)} |", flush=True)


def synthetic_table() -> None:
    print("\n| synthetic preset (model) | slots per layer | LRU | LFRU | learned | Belady | gap closed |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("gpt-oss-like", "gpt-oss-like-batch8", "gpt-oss-120b-like", "mixtral-like", "deepseek-v3-like",
                     "uniform"):
            tr = preset_trace(name)
            slots = max(tr.spec.experts // 4, tr.spec.top_k)  # wider requests are served in waves
            out = Path(tmp) / f"{name}.policy.safetensors"
            meta = train_policy(tr, out, slots=slots, log=lambda m: None)
            held = tr.slice_tokens(meta["train_tokens"], tr.n_tokens)
            r = hit_rates(held, {"LRU": ("lru", None), "LFRU": ("lfru", None), "learned": ("learned", {"model": str(out)}),
                                 "Belady": ("belady", None)}, slots)
            print(f"| {name} ({tr.spec.name}, {tr.spec.layers} x {tr.spec.experts}, top-{tr.spec.top_k}) | {slots} | "
                  + " | ".join(f"{r[k]:.4f}" for k in ("LRU", "LFRU", "learned", "Belady")) + f" | {gap(r)} |",
                  flush=True)


def timed_table(trace) -> None:
    from moesim.api import simulate
    from moesim.errors import NotApplicable
    from moesim.plan import default_strategies

    cut, _ = split_by_sequence(trace, 0.5)
    held = trace.slice_tokens(cut, trace.n_tokens)
    names = default_strategies()
    print("\n| hardware | LRU | LFRU | learned | best preset | learned in the best preset's place | belady (bound, "
          "no prefetch) |")
    print("|---|---|---|---|---|---|---|")
    for hw in ("rtx-4090", "h200"):
        tps = {}
        for name in names + ["belady"]:
            try:
                s = simulate(held, name, budget="25%", hardware=hw).summary
            except NotApplicable as e:  # e.g. a recorded prefetcher on a trace without recorded guesses
                print(f"  {hw} {name}: not applicable ({e})", file=sys.stderr, flush=True)
                continue
            tps[name] = s.get("decode_tokens_per_s") or s["tokens_per_s"]
            print(f"  {hw} {name}: {tps[name]:.2f} tokens/s", file=sys.stderr, flush=True)
        presets = {k: v for k, v in tps.items() if k not in ("lru", "lfru", "learned", "belady")}
        best = max(presets, key=presets.get)
        swapped = _with_learned_cache(best)  # the preset's prefetch, offload and scope with the learned cache
        s = simulate(held, swapped, budget="25%", hardware=hw).summary
        both = s.get("decode_tokens_per_s") or s["tokens_per_s"]
        print(f"| {hw} | {tps['lru']:.2f} | {tps['lfru']:.2f} | {tps['learned']:.2f} | {best} {presets[best]:.2f} | "
              f"{both:.2f} | {tps['belady']:.2f} |", flush=True)


def _with_learned_cache(preset: str) -> dict:
    """The preset's strategy config (moesim/conf/strategy/<preset>.yaml) with its cache replaced by the learned one."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(str(files("moesim.conf").joinpath("strategy", f"{preset}.yaml"))))
    learned = OmegaConf.to_container(OmegaConf.load(str(files("moesim.conf").joinpath("strategy", "learned.yaml"))))
    return cfg | {"name": f"learned+{preset}", "cache": learned["cache"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--skip-timed", action="store_true")
    args = ap.parse_args()
    trace = open_trace("gpt-oss-20b")
    real_table(trace)
    if not args.skip_synthetic:
        synthetic_table()
    if not args.skip_timed:
        timed_table(trace)


if __name__ == "__main__":
    main()
