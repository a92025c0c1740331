"""Load test of `mta serve` on loopback: concurrent clients for a bounded time, then restarts, on the real default model.

1. starts `mta serve` (a subprocess, 127.0.0.1, a free port) over the cached benchmark bank and a fresh store;
2. PUTs the users' profiles and starts adapt jobs for a few of them (they train while the load runs);
3. N client threads send /v1/generate, /v1/completions, inline-profile and profile-update requests until
   the time or request budget is spent; every answer other than 200 counts as an error;
4. checks that no user data was lost (every record as written, adapted users stacked), records every
   user's output, then stops the server with SIGTERM while requests are in flight (they must all be
   answered), restarts it, compares outputs, kills it with SIGKILL, restarts, and compares again.

    python benchmarks/load_test.py [--clients 16] [--duration 60] [--max-requests 2000]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from serving_setup import WORK, serving_bank, serving_data

RESULTS = Path(__file__).parent / "results"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bank: Path, store: Path, port: int, log: Path, threads: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mta.cli", "serve", "--bank", str(bank), "--store", str(store), "--host", "127.0.0.1",
           "--port", str(port), "--max-batch", "8", "--max-queue", "64", "--epochs", "0.25", "--batch-size", "2", "--max-length", "128",
           "--threads", str(threads), "--log-level", "warning"]  # adapt jobs: one small training step, as the bank
    proc = subprocess.Popen(cmd, stdout=log.open("a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not come up; see {log}")


def outputs(client: httpx.Client, users, clients: int) -> dict[str, str]:
    def one(u):
        r = client.post("/v1/generate", json={"user_id": u.user_id, "input": u.queries[0].input})
        r.raise_for_status()
        return u.user_id, r.json()["output"]

    with ThreadPoolExecutor(clients) as pool:
        return dict(pool.map(one, users))


def records(client: httpx.Client, users) -> dict[str, dict]:
    return {u.user_id: client.get(f"/v1/users/{u.user_id}").json() for u in users}


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--users", type=int, default=24)
    ap.add_argument("--adapt", type=int, default=2, help="users whose stacked LoRA trains during the load")
    ap.add_argument("--threads", type=int, default=1, help="the server's torch threads (see bench_serving.py)")
    ap.add_argument("--out", default=str(RESULTS / "load_test.json"))
    args = ap.parse_args()

    bank = serving_bank()
    _, _, served = serving_data()
    users = served[: args.users]
    adapted = {u.user_id for u in users[: args.adapt]}
    store = WORK / "load-test-store"
    shutil.rmtree(store, ignore_errors=True)
    log = WORK / "load-test-server.log"
    log.unlink(missing_ok=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    t0 = time.time()
    proc = start_server(bank.path, store, port, log, args.threads)
    report: dict = {"clients": args.clients, "users": len(users), "server_start_s": round(time.time() - t0, 1)}
    client = httpx.Client(base_url=base, timeout=300, limits=httpx.Limits(max_connections=4 * args.clients))

    with ThreadPoolExecutor(args.clients) as pool:
        written = dict(pool.map(lambda u: (u.user_id, client.put(f"/v1/users/{u.user_id}", json={"profile": u.profile}).json()), users))
    jobs = [client.post(f"/v1/users/{uid}/adapt").json()["id"] for uid in adapted]

    stats_lock, latencies, statuses, kinds, tokens = threading.Lock(), [], {}, {}, [0]
    sent = [0]
    deadline = time.time() + args.duration
    fixed = [u for u in users if u.user_id not in adapted]  # re-PUT only these: a new profile drops a stacked LoRA

    def request(rng: random.Random) -> tuple[str, httpx.Response]:
        u = rng.choice(users)
        text = rng.choice(u.queries).input
        roll = rng.random()
        if roll < 0.65:
            return "generate", client.post("/v1/generate", json={"user_id": u.user_id, "input": text})
        if roll < 0.85:
            return "completions", client.post("/v1/completions", json={"prompt": text, "user": u.user_id, "max_tokens": 8})
        if roll < 0.95:
            return "inline", client.post("/v1/generate", json={"user_id": f"guest-{rng.randrange(10**6)}", "input": text,
                                                               "profile": u.profile})
        v = rng.choice(fixed)
        return "put", client.put(f"/v1/users/{v.user_id}", json={"profile": v.profile})

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while time.time() < deadline:
            with stats_lock:
                if sent[0] >= args.max_requests:
                    return
                sent[0] += 1
            start = time.perf_counter()
            try:
                kind, r = request(rng)
                status, body = r.status_code, r.json()
            except httpx.HTTPError as e:
                kind, status, body = "error", type(e).__name__, {}
            with stats_lock:
                latencies.append(time.perf_counter() - start)
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                kinds[kind] = kinds.get(kind, 0) + 1
                tokens[0] += body.get("tokens", 0) if kind in ("generate", "inline") else body.get("usage", {}).get("completion_tokens", 0)

    load_start = time.time()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.time() - load_start
    metrics = client.get("/metrics").text
    lat = sorted(latencies)
    report["load"] = {
        "seconds": round(elapsed, 1), "requests": len(lat), "by_kind": kinds, "statuses": statuses,
        "errors": sum(n for s, n in statuses.items() if s != "200"),
        "requests_per_s": round(len(lat) / elapsed, 2), "generated_tokens_per_s": round(tokens[0] / elapsed, 1),
        "latency_s": {"p50": round(statistics.median(lat), 3), "p95": round(lat[int(0.95 * (len(lat) - 1))], 3),
                      "p99": round(lat[int(0.99 * (len(lat) - 1))], 3), "max": round(lat[-1], 3)},
        "mean_batch_size": round(metric(metrics, "mta_batch_size_sum") / metric(metrics, "mta_batch_size_count"), 2),
        "adapter_cache_hits": metric(metrics, "mta_adapter_cache_hits_total"),
        "adapter_cache_misses": metric(metrics, "mta_adapter_cache_misses_total"),
    }
    print(json.dumps(report["load"], indent=2))

    job_states = {}
    for job in jobs:
        while (j := client.get(f"/v1/jobs/{job}").json())["status"] in ("queued", "running"):
            time.sleep(1)
        job_states[j["user_id"]] = j["status"] if j["status"] == "done" else f"{j['status']}: {j['error']}"
    report["adapt_jobs"] = job_states
    now = records(client, users)
    lost = [uid for uid, r in now.items() if r.get("fusion") != written[uid]["fusion"]
            or r.get("profile_items") != written[uid]["profile_items"] or r.get("stacked") != (uid in adapted)]
    report["lost_or_wrong_users"] = lost
    before = outputs(client, users, args.clients)

    # graceful stop with requests in flight: all of them must be answered
    with ThreadPoolExecutor(args.clients) as pool:
        pending = [pool.submit(client.post, "/v1/generate", json={"user_id": u.user_id, "input": u.queries[0].input})
                   for u in (users * 2)[: args.clients]]
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        answered = [f.result().status_code for f in pending]
    report["sigterm"] = {"in_flight": len(pending), "answered_200": answered.count(200), "exit_code": proc.wait(timeout=600)}

    checks = {}
    for how in ("after SIGTERM", "after SIGKILL"):
        proc = start_server(bank.path, store, port, log, args.threads)
        checks[how] = {"records_equal": records(client, users) == now, "outputs_equal": outputs(client, users, args.clients) == before}
        if how == "after SIGTERM":
            proc.kill()
            proc.wait()
    report["restarts"] = checks
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=600)
    print(json.dumps({k: report[k] for k in ("adapt_jobs", "lost_or_wrong_users", "sigterm", "restarts")}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
