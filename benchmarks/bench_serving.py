"""Throughput of batched multi-user generation against the base model, on the real default model (SmolLM2-135M).

For 1, 4 and 8 distinct users per batch, `mta.serve.batched.generate_rows` runs each row with its own
adapter — fused from 2 anchors of rank 8 by exact merging (rank 16 on all linear layers) plus a stacked
LoRA of rank 2 on q_proj/v_proj of every layer — against the same rows on the base model without
adapters. Generation has a fixed length (no early stop) so both sides do the same work; prompts are
LaMP-2 queries with one retrieved history item. Runs alternate between the two sides so that machine
noise hits both alike. For scale: the naive alternative, one PEFT model per user, one after the other.

The stacked LoRAs are freshly initialised, not trained: training 8 of them would take minutes and
changes no shape, hence no cost.

    python benchmarks/bench_serving.py [--new-tokens 32] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from serving_setup import TASK, serving_bank, serving_data

from mta.adapters import LoraWeights, extract
from mta.config import FusionConfig, StackConfig
from mta.embedding import profile_embedding
from mta.fusion import merge, plan_fusion
from mta.models import load_base, load_embedder
from mta.serve.batched import PerRowLora, Row, generate_rows
from mta.stacking import STACK, base_of, with_adapters
from mta.tasks import query_prompt
from mta.training import fit, prompt_ids

RESULTS = Path(__file__).parent / "results"


def timed(lora: PerRowLora, rows: list[Row], pad: int) -> float:
    start = time.perf_counter()
    outs = generate_rows(lora, rows, pad, eos_token_id=None)
    assert all(len(o.tokens) == r.max_new_tokens for o, r in zip(outs, rows))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads; 1 by default: on a shared small box, spinning OpenMP threads make timings erratic")
    ap.add_argument("--out", default=str(RESULTS / "bench_serving.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, tok = load_base()
    embedder = load_embedder()
    bank = serving_bank(model, tok, embedder)
    _, _, served = serving_data()
    users = served[: max(args.batch_sizes)]
    parts, prompts = [], []
    for u in users:
        # k = 2 and a stack on every layer: heavier than today's defaults (k = 1, top 8 layers), so a bound
        fused = merge(bank, plan_fusion(bank, profile_embedding(embedder, TASK, u.profile), FusionConfig(k=2)))
        peft_model = with_adapters(model, None, StackConfig(top_layers=None))
        parts.append((fused, extract(peft_model, STACK)))
        model = base_of(peft_model)
        prompts.append(fit(prompt_ids(tok, query_prompt(TASK, u.queries[0].input, u.profile)), 384))
    lora = PerRowLora(model)
    adapters = [(lora.prepare(LoraWeights.concat(list(p))),) for p in parts]
    ranks = {a.shape[1] for a, _ in adapters[0][0].values()}
    print(f"{len(adapters[0][0])} adapted layers, rank {min(ranks)}-{max(ranks)} per user; prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens; "
          f"{args.new_tokens} new tokens; torch threads {torch.get_num_threads()}")

    n, results = args.new_tokens, []
    for b in args.batch_sizes:
        sides = {"base": [Row(prompts[i], None, n) for i in range(b)], "mta": [Row(prompts[i], adapters[i], n) for i in range(b)]}
        prefill = {k: [Row(r.prompt, r.adapter, 1) for r in rows] for k, rows in sides.items()}
        for k in sides:  # warm-up
            timed(lora, prefill[k], tok.pad_token_id)
        times: dict[str, list[float]] = {"base": [], "mta": [], "base_prefill": [], "mta_prefill": []}
        for _ in range(args.repeats):
            for k in sides:
                times[k].append(timed(lora, sides[k], tok.pad_token_id))
                times[f"{k}_prefill"].append(timed(lora, prefill[k], tok.pad_token_id))
        t = {k: statistics.median(v) for k, v in times.items()}
        row = {"users_per_batch": b,
               "base_tokens_per_s": b * n / t["base"], "mta_tokens_per_s": b * n / t["mta"],
               "base_decode_tokens_per_s": b * (n - 1) / (t["base"] - t["base_prefill"]),
               "mta_decode_tokens_per_s": b * (n - 1) / (t["mta"] - t["mta_prefill"]),
               "base_prefill_s": t["base_prefill"], "mta_prefill_s": t["mta_prefill"], "raw_seconds": times}
        row["ratio"] = row["mta_tokens_per_s"] / row["base_tokens_per_s"]
        row["decode_ratio"] = row["mta_decode_tokens_per_s"] / row["base_decode_tokens_per_s"]
        results.append(row)
        print(f"{b} users/batch: base {row['base_tokens_per_s']:.1f} tok/s, MTA per-row {row['mta_tokens_per_s']:.1f} tok/s "
              f"({row['ratio']:.2f}x); decode only {row['base_decode_tokens_per_s']:.1f} vs {row['mta_decode_tokens_per_s']:.1f} "
              f"({row['decode_ratio']:.2f}x); prefill {t['base_prefill']:.2f}s vs {t['mta_prefill']:.2f}s")

    b = max(args.batch_sizes)  # the naive way: one PEFT model per user, one user after the other
    start = time.perf_counter()
    for i in range(b):
        peft_model = with_adapters(model, *parts[i])
        generate_rows(PerRowLora(peft_model), [Row(prompts[i], None, n)], tok.pad_token_id, eos_token_id=None)
        model = base_of(peft_model)
    sequential = b * n / (time.perf_counter() - start)
    print(f"{b} users one at a time with PEFT (attach, generate, next): {sequential:.1f} tok/s")

    report = {"model": bank.manifest["base_model"], "adapter_ranks": sorted(ranks), "adapted_layers": len(adapters[0]),
              "new_tokens": n, "prompt_tokens": [len(p) for p in prompts], "repeats": args.repeats,
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "results": results, "sequential_peft_tokens_per_s": sequential}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
