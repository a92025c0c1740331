"""The server as N replicas on Ray Serve, sharing one PostgreSQL user store; each user's requests go to one replica.

    client ──HTTP──▶ Ray Serve proxy ──▶ Ingress ──handle, multiplexed by user id──▶ Replica × N ──▶ PostgreSQL

- `Replica` is the whole single-process server (`create_app`: its own batcher, per-row LoRA and adapter LRU
  cache) over the shared store; requests reach its FastAPI app in process, through httpx's ASGI transport.
- `Ingress` reads the user id of a request (the path of /v1/users/{id}[/adapt], `user_id` of /v1/generate,
  `user` of /v1/completions) and calls the replicas with it as Ray Serve's multiplexed model id. Ray Serve
  then prefers the replica that already holds that user (a replica "holds" the last `cache_size` users it
  served, the same LRU as its adapter cache) and places a new user on the replica holding the fewest: a
  user's adapter is prepared once, on one replica, and their requests batch there. Requests without a user
  (job status, health, metrics, inline profiles) go to any replica: every replica reads the same store.
- Every response names the replica that answered in the `x-mta-replica` header.

`mta serve --replicas N` runs this; `build` is the entry point for a Ray Serve config file (`serve run` /
`serve deploy`, multi-node clusters, KubeRay): see docs/serving.md.
"""

import json
import re
import signal
import time

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from mta.data.lamp import USER_ID_PATTERN

REPLICA_HEADER = "x-mta-replica"
_USER_PATH = re.compile(r"/v1/users/([^/]+)(?:/adapt)?")
_BODY_KEY = {"/v1/generate": "user_id", "/v1/completions": "user"}
_HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


def routing_key(path: str, body: bytes) -> str | None:
    """The user a request is about, if it names one validly; None sends the request to any replica."""
    m = _USER_PATH.fullmatch(path)
    if m:
        key = m.group(1)
    elif path in _BODY_KEY:
        try:
            data = json.loads(body)
        except ValueError:
            return None
        key = data.get(_BODY_KEY[path]) if isinstance(data, dict) else None
    else:
        return None
    return key if isinstance(key, str) and re.fullmatch(USER_ID_PATTERN, key) else None


class Replica:
    """One copy of the single-process server, behind Ray Serve."""

    def __init__(self, spec):
        from mta.serve.app import load_app  # here, not at the top: the ingress needs no torch

        self.app = load_app(spec)  # every replica: the same bank, model and settings, the one shared store
        self.server = self.app.state.server
        self.server.start()  # what the app's lifespan does under uvicorn; the ASGI transport does not run it
        self.id = serve.get_replica_context().replica_id.unique_id
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://replica", timeout=None)

        async def hold(user_id: str) -> str:
            """What Ray Serve counts as loaded here: the users this replica served last (their adapters are cached)."""
            return user_id

        self.hold = serve.multiplexed(max_num_models_per_replica=spec.cfg.cache_size)(hold)

    async def handle(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> tuple[int, list, bytes]:
        user_id = serve.get_multiplexed_model_id()
        if user_id:
            await self.hold(user_id)
        r = await self.client.request(method, target, headers=headers, content=body)
        out = [(k, v) for k, v in r.headers.multi_items() if k.lower() not in _HOP_HEADERS]
        return r.status_code, out + [(REPLICA_HEADER, self.id)], r.content

    def __del__(self):
        """Ray Serve stops a replica: finish its accepted requests and running job, as SIGTERM does under uvicorn."""
        if hasattr(self, "server"):
            self.server.close()
            self.server.store.close()


router = FastAPI(title="mta personalization server (Ray Serve ingress)")


@serve.ingress(router)
class Ingress:
    """Forwards every request to a replica, keyed by the user it names."""

    def __init__(self, replicas, max_body_bytes: int):
        self.replicas, self.max_body_bytes = replicas, max_body_bytes

    @router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"], include_in_schema=False)
    async def forward(self, request: Request) -> Response:
        body = bytearray()
        async for chunk in request.stream():  # bounded however the body arrives (Content-Length or chunked)
            body += chunk
            if len(body) > self.max_body_bytes:
                return JSONResponse({"detail": f"request body exceeds {self.max_body_bytes} bytes"}, 413)
        raw = request.scope.get("raw_path") or request.url.path.encode()
        query = request.scope.get("query_string", b"")
        target = raw.decode("latin-1") + (f"?{query.decode('latin-1')}" if query else "")
        key = routing_key(request.url.path, bytes(body))
        handle = self.replicas.options(multiplexed_model_id=key) if key else self.replicas
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS]
        status, out, content = await handle.handle.remote(request.method, target, headers, bytes(body))
        return Response(content, status, headers=dict(out))


def build_app(spec, num_replicas: int = 2, max_replicas: int | None = None, num_cpus: float = 1.0,
              num_gpus: float = 0.0):
    """The Ray Serve application over `spec` (an app.ServerSpec): `serve.run(build_app(spec, 2), route_prefix="/")`.

    With `max_replicas`, Ray Serve autoscales between `num_replicas` and it, aiming at `max_batch` requests in
    flight per replica (a full batch: more would only queue). `num_cpus` and `num_gpus` are reserved per replica.
    """
    scaling = ({"autoscaling_config": {"min_replicas": num_replicas, "max_replicas": max_replicas,
                                       "target_ongoing_requests": spec.cfg.max_batch}}
               if max_replicas else {"num_replicas": num_replicas})
    replica = serve.deployment(Replica, name="Replica").options(
        max_ongoing_requests=spec.cfg.max_queue, ray_actor_options={"num_cpus": num_cpus, "num_gpus": num_gpus}, **scaling)
    ingress = serve.deployment(Ingress, name="Ingress").options(max_ongoing_requests=10 * spec.cfg.max_queue,
                                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(spec), spec.cfg.max_body_bytes)


def build(args: dict):
    """Application builder for Ray Serve config files: `args` are `mta serve` flags without dashes, e.g.
    ``{"bank": "/shared/bank", "store": "postgresql://...", "replicas": 4, "max-batch": 16}``."""
    from mta.cli import build_parser, serve_spec

    argv = ["serve"]
    for k, v in args.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    a = build_parser().parse_args(argv)
    return build_app(serve_spec(a), a.replicas, a.max_replicas, a.replica_cpus, a.replica_gpus)


def run(app, host: str, port: int, ray_address: str | None = None) -> None:
    """Serve `app` on Ray Serve at host:port until Ctrl-C or SIGTERM; replicas then drain, as one server does."""
    from mta.executors import ray_connect

    ray, started = ray_connect("ray", ray_address)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="mta", route_prefix="/")
        print(f"mta: serving on http://{host}:{port} (Ray Serve; Ctrl-C stops)", flush=True)
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete("mta")
        if started:
            serve.shutdown()
            ray.shutdown()
