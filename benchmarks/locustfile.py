"""Locust load for `mta serve`: stored users drawn with Zipf popularity, plus a share of never-seen users.

Each simulated client loops: with probability MTA_NEW_SHARE a new user arrives (PUT their profile, then
generate for them); otherwise a stored user `s{i:06d}` is drawn with P(rank k) ∝ 1/k^MTA_ZIPF_S (ranks are a
seeded permutation of the ids, so popularity is unrelated to insertion order) and asks for one answer.
Every request's latency is appended to MTA_LATENCY_OUT (JSON lines: name, ms, ok), so the caller computes
exact percentiles over the requests it cares about.

    MTA_WORKLOAD=workload.json MTA_LATENCY_OUT=lat.jsonl locust -f benchmarks/locustfile.py --headless \
        -u 8 -r 8 -t 60s --host http://127.0.0.1:8000

workload.json: {"users": N, "zipf_s": 1.1, "new_share": 0.05, "seed": 0,
                "profiles": [[item, ...], ...], "inputs": [[query, ...], ...]}  (user i has profile i % len(profiles))
"""

import bisect
import itertools
import json
import os
import random

from locust import FastHttpUser, events, task

WORKLOAD = json.loads(open(os.environ["MTA_WORKLOAD"]).read())
N, PROFILES, INPUTS = WORKLOAD["users"], WORKLOAD["profiles"], WORKLOAD["inputs"]
_perm = list(range(N))
random.Random(WORKLOAD["seed"]).shuffle(_perm)  # _perm[k]: the user of popularity rank k
_cdf = list(itertools.accumulate(1.0 / (k + 1) ** WORKLOAD["zipf_s"] for k in range(N)))
_clients = itertools.count()
_latency_out = open(os.environ["MTA_LATENCY_OUT"], "a", buffering=1)


@events.request.add_listener
def _record(request_type, name, response_time, exception, **kwargs):
    _latency_out.write(json.dumps([name, response_time, exception is None]) + "\n")


class MtaClient(FastHttpUser):
    def on_start(self):
        self.rng = random.Random(WORKLOAD["seed"] * 1000 + next(_clients))

    def _user(self) -> int:
        return _perm[bisect.bisect_left(_cdf, self.rng.random() * _cdf[-1])]

    @task
    def request(self):
        if self.rng.random() < WORKLOAD["new_share"]:
            uid, i = f"new-{self.rng.getrandbits(48):012x}", self.rng.randrange(len(PROFILES))
            self.client.put(f"/v1/users/{uid}", json={"profile": PROFILES[i]}, name="put new user")
            name = "generate new user"
        else:
            n = self._user()
            uid, i, name = f"s{n:06d}", n % len(PROFILES), "generate"
        self.client.post("/v1/generate", json={"user_id": uid, "input": self.rng.choice(INPUTS[i])}, name=name)
