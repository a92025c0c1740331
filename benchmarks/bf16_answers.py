"""Do stacked LoRAs stored in bf16 answer as the fp32 ones do? Counted on a finished `mta bench` run.

Every user a method personalized in the run's history-size conditions is loaded from their folder twice, with the
stacked LoRA as saved (fp32) and rounded to bf16 (what `--adapter-dtype bf16` stores), and answers all their
questions both ways with the run's decoding. Reported per size: answers that change, the main metric both ways
with the paired interval of the difference, and the bytes of the stacked LoRA both ways. As a control, the fp32
reload is compared with the answers the run itself saved (the in-process model, same weights).

Usage: python benchmarks/bf16_answers.py RUN [--method mta] [--sizes 2,4] [--out FILE]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from mta.bank import Bank
from mta.bench import versus
from mta.config import Decoding
from mta.data.lamp import load_users
from mta.generation import generate
from mta.io import atomic_write_json, read_json
from mta.models import load_base
from mta.serve.store import encode_adapter
from mta.stacking import base_of, load_profile, user_adapters, with_adapters
from mta.tasks import get_task, query_prompt


def measure(run: Path, method: str, sizes: list[str] | None = None) -> dict:
    r = read_json(run / "results.json", "results")
    task, cfg = get_task(r["task"]), r["config"]["bench"]
    decoding, retrieved = Decoding(**cfg["decoding"]), cfg["num_retrieved"]
    bank = Bank.load(r["config"]["bank_path"]) if r["config"]["bank_path"] else None
    model, tok = load_base(cfg["base_model"])
    out = {"run": str(run), "method": method, "sizes": {}}
    for n in sorted(sizes or r["history_sizes"], key=int):
        folder = run / f"h{n}"
        saved = read_json(folder / "answers" / f"{method}.json", "saved answers")["outputs"]
        answers = {"fp32": [], "bf16": []}
        golds, users, ids, nbytes = [], [], [], {"fp32": 0, "bf16": 0}
        start = time.perf_counter()
        for u in load_users(folder / "eval_users.json", task):
            record, fused, stacked = user_adapters(bank, folder / "users" / method / u.user_id)
            profile = load_profile(folder / "users" / method / u.user_id)
            prompts = [query_prompt(task, q.input, profile, retrieved) for q in u.queries]
            rounded = stacked.to(torch.bfloat16).to(torch.float32)
            for dtype, weights in (("fp32", stacked), ("bf16", rounded)):
                personalized = with_adapters(model, fused, weights)
                answers[dtype] += generate(personalized, tok, prompts, task.max_new_tokens, decoding)
                model = base_of(personalized)  # PEFT wraps in place: unwrap before the next user
                nbytes[dtype] += len(encode_adapter(stacked, dtype))
            golds += [q.gold for q in u.queries]
            users += [u.user_id] * len(u.queries)
            ids += [q.id for q in u.queries]
        main = task.main_metric
        scores = {d: task.evaluate(a, golds)[main] for d, a in answers.items()}
        v = versus(task, answers["bf16"], answers["fp32"], golds, users)
        out["sizes"][n] = {
            "n_answers": len(golds), "changed": sum(a != b for a, b in zip(answers["fp32"], answers["bf16"])),
            "control_changed": sum(a != saved[i] for a, i in zip(answers["fp32"], ids)),
            main: scores, "bf16_minus_fp32": [v["diff"], *v["ci95"]],
            "bytes_per_user": {d: b / len(set(users)) for d, b in nbytes.items()}, "seconds": time.perf_counter() - start}
        print(f"n = {n}: {out['sizes'][n]['changed']} of {len(golds)} answers change in bf16 "
              f"(control: {out['sizes'][n]['control_changed']} fp32 reloads differ from the run's answers); {main} "
              f"fp32 {scores['fp32']:.4f}, bf16 {scores['bf16']:.4f}, difference {v['diff']:+.4f} "
              f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}]", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--method", default="mta")
    p.add_argument("--sizes", type=lambda t: t.split(","), help="history sizes to measure (default: all the run's)")
    p.add_argument("--out")
    a = p.parse_args()
    result = measure(Path(a.run), a.method, a.sizes)
    if a.out:
        atomic_write_json(a.out, result)


if __name__ == "__main__":
    main()
