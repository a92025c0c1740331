"""Two replicas on a local Ray Serve over one PostgreSQL store: each user's requests stay on one replica, and what
one replica writes (a user, an adapted LoRA, a job) the other serves."""

import json
import socket
import time

import numpy as np
import pytest
from conftest import write_random_bank

from mta.config import ServeConfig, StackConfig, TrainConfig

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install -e '.[ray]'")
httpx = pytest.importorskip("httpx")

from mta.serve.app import ServerSpec  # noqa: E402
from mta.serve.replicas import REPLICA_HEADER, build_app, routing_key  # noqa: E402

FAST_STACK = StackConfig(rank=2, train=TrainConfig(epochs=1, batch_size=4, max_length=128, learning_rate=1e-2))
INPUT = "A clumsy wedding planner starts a prank war"


@pytest.fixture(scope="module")
def serve_port():
    """A local Ray (2 CPUs) with Serve's HTTP proxy on a free port; skipped where Ray Serve cannot start."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    except Exception as e:
        ray.shutdown()
        pytest.skip(f"cannot start Ray Serve here: {type(e).__name__}: {e}")
    yield port
    serve.shutdown()
    ray.shutdown()


def test_routing_key_names_the_user_of_a_request():
    assert routing_key("/v1/users/alice", b"") == routing_key("/v1/users/alice/adapt", b"") == "alice"
    assert routing_key("/v1/generate", b'{"user_id": "bob", "input": "x"}') == "bob"
    assert routing_key("/v1/completions", b'{"user": "carol", "prompt": "x"}') == "carol"
    for path, body in [("/v1/generate", b"{"), ("/v1/generate", b'{"user_id": "../x"}'), ("/v1/generate", b"[1]"),
                       ("/v1/jobs/123", b""), ("/healthz", b""), ("/v1/users/a/b/c", b"")]:
        assert routing_key(path, body) is None


def test_build_takes_mta_serve_flags(random_bank):
    """The entry point of Ray Serve config files: `args` are `mta serve` flags without dashes."""
    from mta.serve.replicas import build

    app = build({"bank": str(random_bank.path), "store": "postgresql://mta@db/mta", "replicas": 3, "max-batch": 4})
    assert isinstance(app, serve.Application)
    with pytest.raises(SystemExit):
        build({"bank": str(random_bank.path)})  # no --store: argparse's usage error


def _generate(client, user_id):
    r = client.post("/v1/generate", json={"user_id": user_id, "input": INPUT, "max_new_tokens": 6})
    assert r.status_code == 200, r.text
    return r.headers[REPLICA_HEADER], r.json()["output"]


def test_two_replicas_route_by_user_and_share_the_store(serve_port, postgres_url, tiny_model_dir, tmp_path, users):
    # a random bank whose anchors live in the real embedder's space (384-d), as every replica loads that embedder
    emb = np.random.default_rng(0).standard_normal((4, 384))
    bank = write_random_bank(tmp_path / "bank", tiny_model_dir, embeddings=(emb / np.linalg.norm(emb, axis=1, keepdims=True)).tolist())
    spec = ServerSpec(str(bank.path), postgres_url, ServeConfig(stack=FAST_STACK, max_wait_ms=0), device="cpu", threads=1)
    serve.run(build_app(spec, num_replicas=2, num_cpus=0.5), name="mta", route_prefix="/")
    client = httpx.Client(base_url=f"http://127.0.0.1:{serve_port}", timeout=120)

    home = {}
    for i in range(4):  # a new user goes to the replica that holds the fewest users
        r = client.put(f"/v1/users/u{i}", json={"profile": users[i].profile})
        assert r.status_code == 200, r.text
        home[f"u{i}"] = r.headers[REPLICA_HEADER]
        time.sleep(0.5)  # replicas report the users they hold every 0.1 s
    assert len(set(home.values())) == 2
    outputs = {}
    for uid in home:  # and stays there
        for _ in range(2):
            replica, outputs[uid] = _generate(client, uid)
            assert replica == home[uid]

    job = client.post("/v1/users/u0/adapt").json()
    assert job["status"] in ("queued", "running")
    polled = set()
    while (r := client.get(f"/v1/jobs/{job['id']}")).json()["status"] not in ("done", "failed"):  # any replica answers
        polled.add(r.headers[REPLICA_HEADER])
        time.sleep(0.2)
    assert r.json()["status"] == "done", r.json()
    assert polled <= set(home.values())
    adapted = _generate(client, "u0")
    assert adapted[0] == home["u0"]

    # requests without a routing key go to either replica: both serve u0's new adapter and every other user alike
    replicas = serve.get_deployment_handle("Replica", app_name="mta")
    seen: dict[str, set] = {}
    for attempt in range(40):
        uid = f"u{attempt % 4}"
        body = json.dumps({"user_id": uid, "input": INPUT, "max_new_tokens": 6}).encode()
        status, headers, content = replicas.handle.remote("POST", "/v1/generate", [("content-type", "application/json")], body).result()
        assert status == 200, content
        seen.setdefault(dict(headers)[REPLICA_HEADER], set()).add((uid, json.loads(content)["output"]))
        if len(seen) == 2 and all(len(s) >= 2 for s in seen.values()):
            break
    assert set(seen) == set(home.values())
    expected = {**outputs, "u0": adapted[1]}
    assert all(out == expected[uid] for s in seen.values() for uid, out in s)
    assert client.get("/healthz").json()["users"] == 4
    serve.delete("mta")
