"""The HTTP server on the tiny model and the random bank: routes, batching, adapt jobs, persistence, bad input."""

import json
import re
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from conftest import snapshot
from fastapi.testclient import TestClient

from mta.config import FusionConfig, ServeConfig, StackConfig, TrainConfig
from mta.generation import generate
from mta.models import load_base
from mta.serve.app import Batcher, create_app
from mta.serve.store import INTERRUPTED, open_store
from mta.stacking import fused_adapter, with_adapters
from mta.tasks import get_task, query_prompt

TASK = get_task("LaMP-2")
FAST_STACK = StackConfig(rank=2, train=TrainConfig(epochs=1, batch_size=4, max_length=128, learning_rate=1e-2))
INPUT = "A clumsy wedding planner starts a prank war"


class HashEmbedder:
    """3-d text embeddings for the random bank (whose anchors are 3-d): distinct profiles, distinct fusions."""

    def encode(self, texts, **kwargs):
        vecs = np.stack([np.random.default_rng(zlib.crc32(t.encode())).random(3) for t in texts]).astype(np.float32)
        return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


@pytest.fixture
def serve(tmp_path, random_bank, tiny_model_dir):
    """Start a server over a store folder; the store and model are fresh objects every time, as after a restart."""

    @contextmanager
    def start(where=tmp_path / "store", **cfg):
        model, tok = load_base(str(tiny_model_dir), device="cpu")
        store = open_store(where)
        app = create_app(random_bank, store, model, tok, HashEmbedder(), ServeConfig(**{"stack": FAST_STACK, **cfg}))
        try:
            with TestClient(app) as client:
                yield client, app.state.server
        finally:
            store.close()

    return start


def _put(client, user_id, profile):
    r = client.put(f"/v1/users/{user_id}", json={"profile": profile})
    assert r.status_code == 200, r.text
    return r.json()


def _generate(client, user_id, text=INPUT, **extra):
    r = client.post("/v1/generate", json={"user_id": user_id, "input": text, "max_new_tokens": 8, **extra})
    assert r.status_code == 200, r.text
    return r.json()["output"]


def _wait(client, job_id, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


def test_users_generate_and_completions(serve, random_bank, users):
    with serve() as (client, server):
        assert client.get("/healthz").json()["status"] == "ok"
        user = _put(client, "alice", users[0].profile)
        assert user["fusion"]["anchor_ids"][0] in random_bank.anchor_ids and abs(sum(user["fusion"]["weights"]) - 1) < 1e-6
        assert not user["stacked"] and client.get("/v1/users/alice").json() == user

        out = _generate(client, "alice")
        r = client.post("/v1/completions", json={"model": "x", "prompt": INPUT, "max_tokens": 8, "user": "alice"})
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
        assert r.json()["choices"][0]["text"] == out and r.json()["usage"]["completion_tokens"] > 0

        assert client.post("/v1/generate", json={"user_id": "bob", "input": INPUT}).status_code == 404
        # an inline profile is fused on the fly, equals the stored user with that profile, and is not stored
        assert _generate(client, "bob", profile=users[0].profile) == out
        assert client.get("/v1/users/bob").status_code == 404 and len(server.store) == 1
        assert _generate(client, "carol", profile=users[1].profile) != out or users[1].profile == users[0].profile

        metrics = client.get("/metrics").text
        assert '# TYPE mta_requests_total counter' in metrics
        assert re.search(r'mta_requests_total\{path="/v1/generate",status="200"\} \d+', metrics)
        assert 'mta_requests_total{path="/v1/generate",status="404"} 1' in metrics
        assert re.search(r"mta_adapter_cache_hits_total [1-9]", metrics) and "mta_batch_size_count" in metrics


def test_adapted_users_survive_a_restart_and_match_the_reference(serve, store_at, random_bank, tiny_model_dir, users):
    ids = ["u0", "u1", "u2"]
    with serve(store_at) as (client, server):
        for i, uid in enumerate(ids):
            _put(client, uid, users[i].profile)
        jobs = [client.post(f"/v1/users/{uid}/adapt").json() for uid in ids[:2]]
        assert client.post("/v1/users/u0/adapt").json()["id"] == jobs[0]["id"]  # not queued twice
        assert all(_wait(client, j["id"])["status"] == "done" for j in jobs)
        assert client.post("/v1/users/nobody/adapt").status_code == 404
        assert client.get("/v1/jobs/nope").status_code == 404
        before = {uid: [_generate(client, uid, t) for t in (INPUT, "Detectives chase a killer")] for uid in ids}
        records = {uid: client.get(f"/v1/users/{uid}").json() for uid in ids}
        assert records["u0"]["stacked"] and records["u1"]["stacked"] and not records["u2"]["stacked"]

        # the served output is what the user's PEFT model generates alone
        model, tok = load_base(str(tiny_model_dir), device="cpu")
        stored = server.store.get("u0")
        ref = with_adapters(model, fused_adapter(random_bank, stored.record), server.store.stacked(stored))
        assert generate(ref, tok, [query_prompt(TASK, INPUT, users[0].profile)], 8)[0] == before["u0"][0]
    sqlite = "://" not in store_at
    assert not sqlite or len(snapshot(Path(store_at) / "adapters")) == 2
    with open_store(store_at) as store:  # a server that died with a job running: nobody renews its lease
        store.put(store.get("u2").record, users[2].profile)
        dead, _ = store.add_job("u2", "a-dead-server", lease_s=0.2, keep_finished=10)
    time.sleep(0.3)

    with serve(store_at) as (client, _):  # a new process's view: fresh store object, model and app
        assert {uid: client.get(f"/v1/users/{uid}").json()["version"] for uid in ids} == {"u0": 2, "u1": 2, "u2": 2}
        records["u2"]["version"] = 2
        assert {uid: client.get(f"/v1/users/{uid}").json() for uid in ids} == records
        assert {uid: [_generate(client, uid, t) for t in (INPUT, "Detectives chase a killer")] for uid in ids} == before
        assert [client.get(f"/v1/jobs/{j['id']}").json()["status"] for j in jobs] == ["done", "done"]  # jobs outlive it
        assert client.get(f"/v1/jobs/{dead.id}").json() | {"created": 0, "finished": 0} == {
            "id": dead.id, "user_id": "u2", "status": "failed", "error": INTERRUPTED, "created": 0, "finished": 0, "stack": None}
        _put(client, "u0", users[3].profile)  # a new profile drops the stale stacked LoRA and its file
        assert not client.get("/v1/users/u0").json()["stacked"]
    assert not sqlite or len(snapshot(Path(store_at) / "adapters")) == 1


def test_users_fused_from_the_same_anchors_share_them_whatever_their_weights(serve, random_bank, tiny_model_dir, users):
    """Learned per-layer weights make every user's fusion their own; the served rows still share the anchors'
    prepared factors (one per set of anchors) and answer as each user's PEFT model does alone."""
    fusion = FusionConfig(k=2, adapt="learn-layer", learn_lr=0.3)
    stack = StackConfig(rank=2, top_layers=1, train=FAST_STACK.train)
    ids = ["w0", "w1", "w2", "w3"]
    with serve(fusion=fusion, stack=stack) as (client, server):
        for i, uid in enumerate(ids):
            _put(client, uid, users[i].profile)
        jobs = [client.post(f"/v1/users/{uid}/adapt").json() for uid in ids]
        assert all(_wait(client, j["id"])["status"] == "done" for j in jobs)
        records = [server.store.get(uid).record for uid in ids]
        assert all(r.fusion.adapt == "learn-layer" and set(r.fusion.layer_weights) == {"1"} for r in records)
        assert len({json.dumps(r.fusion.layer_weights) for r in records}) == len(ids)  # every user's own weights
        served = {uid: _generate(client, uid) for uid in ids}
        assert len(server.fused) == len({tuple(r.fusion.anchor_ids) for r in records}) < len(ids) + 1
        model, tok = load_base(str(tiny_model_dir), device="cpu")
        for i, uid in enumerate(ids):
            stored = server.store.get(uid)
            ref = with_adapters(model, fused_adapter(random_bank, stored.record), server.store.stacked(stored))
            assert generate(ref, tok, [query_prompt(TASK, INPUT, users[i].profile)], 8)[0] == served[uid]


def test_concurrent_requests_share_a_forward_pass(serve, users):
    with serve(max_batch=8, max_wait_ms=300) as (client, server):
        for i in range(6):
            _put(client, f"u{i}", users[i].profile)
        alone = [_generate(client, f"u{i}") for i in range(6)]
        batches = server.metrics.batch_size.count
        with ThreadPoolExecutor(6) as pool:
            together = list(pool.map(lambda i: _generate(client, f"u{i}"), range(6)))
        assert together == alone
        assert server.metrics.batch_size.count - batches < 6, "concurrent requests must share batches"
        assert len(set(alone)) > 1


def test_bad_input_is_rejected_with_a_message(serve, tmp_path, users):
    with serve(tmp_path / "store", max_input_chars=200, max_new_tokens=16, max_profile_items=8, max_body_bytes=20_000) \
            as (client, _):
        _put(client, "alice", users[0].profile)
        cases = [
            ({"user_id": "alice"}, 422, "input: Field required"),
            ({"input": INPUT}, 422, "pass a user_id, or a profile"),
            ({"user_id": "alice", "input": INPUT, "max_new_tokens": 17}, 422, "at most 16"),
            ({"user_id": "alice", "input": INPUT, "max_new_tokens": 0}, 422, "max_new_tokens"),
            ({"user_id": "../../etc/passwd", "input": INPUT}, 422, "user_id"),
            ({"user_id": "alice", "input": "x" * 201}, 413, "limit is 200"),
            ({"user_id": "zed", "input": INPUT, "profile": [{"description": "no tag"}]}, 422, "tag"),
        ]
        for body, status, message in cases:
            r = client.post("/v1/generate", json=body)
            assert r.status_code == status and message in r.json()["detail"], (body, r.status_code, r.text)
        r = client.post("/v1/completions", json={"prompt": INPUT, "user": "alice", "n": 2})
        assert r.status_code == 422 and "n:" in r.json()["detail"]
        assert client.post("/v1/generate", content=b"{", headers={"content-type": "application/json"}).status_code == 422
        assert client.post("/v1/generate", json={"user_id": "alice", "input": "y" * 30_000}).status_code == 413
        item = users[0].profile[0]
        assert client.put("/v1/users/bob", json={"profile": [item] * 9}).status_code == 413
        assert client.put("/v1/users/bob", json={"profile": []}).status_code == 422

        before = snapshot(tmp_path)
        for bad in ["..", ".hidden", "a b", "x" * 129, "..%2F..%2Fescaped", "%2E%2E", "a%00b"]:
            r = client.put(f"/v1/users/{bad}", json={"profile": users[0].profile})
            assert r.status_code in (404, 405, 422), (bad, r.status_code)
        assert client.get("/v1/users/..%2Fstore").status_code in (404, 422)
        assert snapshot(tmp_path) == before and len(client.app.state.server.store) == 1


def test_full_queue_answers_503_and_shutdown_drains(serve, users):
    with serve(max_batch=1, max_queue=2, max_wait_ms=0) as (client, server):
        _put(client, "alice", users[0].profile)
        gate, run = threading.Event(), server.batcher._run
        server.batcher._run = lambda rows: gate.wait() and run(rows)
        row = server.row("alice", INPUT, 4, None)
        first = server.batcher.submit(row)
        while server.batcher.pending:  # the batcher has taken it and waits at the gate
            time.sleep(0.01)
        queued = [server.batcher.submit(row) for _ in range(2)]
        r = client.post("/v1/generate", json={"user_id": "alice", "input": INPUT})
        assert r.status_code == 503 and "queue is full" in r.json()["detail"]

        closer = threading.Thread(target=server.close)
        closer.start()
        while not server.batcher.closed:
            time.sleep(0.01)
        assert client.post("/v1/generate", json={"user_id": "alice", "input": INPUT}).status_code == 503
        gate.set()
        closer.join(timeout=30)
        assert not closer.is_alive()
        outs = [f.result(timeout=0) for f in [first, *queued]]  # every accepted request was answered
        assert len({text for text, _ in outs}) == 1


def test_batcher_survives_cancelled_requests_and_failing_batches():
    seen = []

    def run(rows):
        seen.append(rows)
        if 0 in rows:
            raise RuntimeError("boom")
        return [r * 10 for r in rows]

    batcher = Batcher(run, max_batch=4, max_queue=8, max_wait_s=0.05)
    first, gone, last = batcher.submit(1), batcher.submit(2), batcher.submit(3)
    gone.cancel()  # its client went away before the batch ran
    batcher.start()
    assert (first.result(5), last.result(5)) == (10, 30) and seen == [[1, 3]]
    with pytest.raises(RuntimeError, match="boom"):
        batcher.submit(0).result(5)
    assert batcher.submit(4).result(5) == 40
    batcher.stop()


def test_a_chunked_body_is_bounded_by_the_bytes_received(serve, users):
    """No Content-Length to check: the limit counts what arrives, and nothing of the request is stored."""
    item = users[0].profile[0]

    def chunks(n):
        yield b'{"profile": ['
        for i in range(n):
            yield json.dumps(item).encode() + (b"," if i < n - 1 else b"")
        yield b"]}"

    with serve(max_body_bytes=20_000, max_profile_items=10_000) as (client, server):
        headers = {"content-type": "application/json"}
        r = client.put("/v1/users/big", content=chunks(2_000), headers=headers)
        assert r.status_code == 413 and "exceeds the limit of 20000 bytes" in r.json()["detail"], r.text
        assert "content-length" not in r.request.headers and client.get("/v1/users/big").status_code == 404
        r = client.put("/v1/users/small", content=chunks(2), headers=headers)  # a chunked body within the limit is read whole
        assert r.status_code == 200, r.text
        assert r.json()["profile_items"] == 2 and len(server.store) == 1
        assert 'mta_requests_total{path="/v1/users/{user_id}",status="413"} 1' in client.get("/metrics").text


@pytest.mark.parametrize("field, value", [("tag", {"x": 1}), ("description", ["a", "b"]), ("tag", 3), ("description", True)])
def test_profile_fields_must_be_strings(serve, users, field, value):
    with serve() as (client, server):
        item = {**users[0].profile[0], field: value}
        r = client.put("/v1/users/alice", json={"profile": [item]})
        assert r.status_code == 422 and f"field '{field}' must be a string" in r.json()["detail"], r.text
        r = client.post("/v1/generate", json={"input": INPUT, "profile": [item]})
        assert r.status_code == 422 and f"field '{field}' must be a string" in r.json()["detail"], r.text
        assert len(server.store) == 0


def test_completions_errors_speak_its_own_fields(serve, users):
    with serve(max_new_tokens=16, max_input_chars=200) as (client, _):
        _put(client, "alice", users[0].profile)
        r = client.post("/v1/completions", json={"prompt": INPUT, "user": "alice", "max_tokens": 17})
        assert r.status_code == 422 and r.json()["detail"] == "max_tokens is 17; this server allows at most 16"
        r = client.post("/v1/completions", json={"prompt": "x" * 201, "user": "alice"})
        assert r.status_code == 413 and r.json()["detail"].startswith("prompt has 201 characters"), r.text
        r = client.post("/v1/completions", json={"prompt": INPUT, "user": "bob"})
        assert r.status_code == 404 and r.json()["detail"] == "unknown user 'bob': PUT /v1/users/{user_id} first"


def test_method_not_allowed_lists_every_method_of_the_path(serve):
    with serve() as (client, _):
        r = client.delete("/v1/users/alice")
        assert r.status_code == 405 and r.headers["allow"] == "GET, PUT"
