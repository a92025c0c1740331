"""The personalization server: one base model, many users, every request with its own adapter.

A request is validated and turned into a `Row` (prompt ids + the user's prepared adapter, from an LRU
cache keyed by bank fingerprint, fusion record and stacked adapter) in a worker thread; one batcher
thread takes up to `max_batch` queued rows at a time through a single per-row-LoRA generation, so
concurrent users share forward passes. The queue is bounded (503 when full); shutdown stops intake and
drains what was accepted. Adapt jobs train on a private copy of the base model in one job thread, so the
serving weights are never touched, and commit only if the user did not change meanwhile; their state lives
in the store, so a job's status survives the server (and any replica sharing the store can report it).
"""

from __future__ import annotations

import asyncio
import json
import math
import queue
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Literal

from fastapi import FastAPI, HTTPException, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from mta.adapters import LoraWeights, extract
from mta.bank import Bank
from mta.config import ServeConfig
from mta.data.lamp import USER_ID_PATTERN, User
from mta.embedding import profile_embedding
from mta.fusion import plan_fusion, row_weights, unweighted
from mta.io import MTAError
from mta.serve.batched import LRUCache, PerRowLora, Row, RowOutput, Scaled, generate_rows
from mta.serve.store import Job, StoredUser, UserStore
from mta.stacking import STACK, PersonalizeConfig, UserRecord, fused_adapter, personalize
from mta.tasks import query_prompt
from mta.training import fit, prompt_ids


class GenerateRequest(BaseModel):
    user_id: str | None = Field(None, pattern=USER_ID_PATTERN)
    input: str = Field(min_length=1)
    max_new_tokens: int | None = Field(None, ge=1)
    profile: list[dict] | None = Field(None, min_length=1, description="used only when user_id is not stored; never stored")


class CompletionRequest(BaseModel):
    """OpenAI's /v1/completions, with `user` naming the stored user whose adapter answers. Decoding is greedy."""

    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]]
    max_tokens: int | None = Field(None, ge=1)
    user: str = Field(pattern=USER_ID_PATTERN)
    n: Literal[1] = 1
    stream: Literal[False] = False


class ProfileRequest(BaseModel):
    profile: list[dict] = Field(min_length=1)


class Problem(BaseModel):
    """Every error's body: one line saying what is wrong."""

    detail: str


_WHY = {400: "the body could not be read (not UTF-8 text)", 404: "unknown user or job",
        409: "the user was fused against another bank", 413: "body, profile or input too large", 422: "invalid request",
        503: "queue full or shutting down"}


def _errors(*codes: int) -> dict:
    """The error responses a route really returns, for an honest OpenAPI schema (every one a `Problem`)."""
    return {code: {"model": Problem, "description": _WHY[code]} for code in codes}


class Busy(Exception):
    """The batcher takes no more rows now (queue full, or shutting down): the client should retry (503)."""


class Batcher:
    """Groups queued rows into batches for one worker thread. Bounded; `stop` drains what was accepted."""

    def __init__(self, run, max_batch: int, max_queue: int, max_wait_s: float):
        self._run, self.max_batch, self.max_queue, self.max_wait_s = run, max_batch, max_queue, max_wait_s
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.pending, self.closed = 0, False
        self._thread = threading.Thread(target=self._loop, name="mta-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, row: Row) -> Future:
        fut: Future = Future()
        with self._lock:
            if self.closed:
                raise Busy("the server is shutting down")
            if self.pending >= self.max_queue:
                raise Busy(f"the request queue is full ({self.max_queue} waiting); retry shortly")
            self.pending += 1
            self._queue.put((row, fut))
        return fut

    def stop(self) -> None:
        with self._lock:
            self.closed = True
            self._queue.put(None)  # after every accepted row: FIFO, so they all run first
        if self._thread.is_alive():
            self._thread.join()

    def _take(self, item) -> tuple[list, bool]:
        batch, deadline = [item], time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            try:
                nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
        return batch, False

    def _loop(self) -> None:
        stopping = False
        while not stopping:
            item = self._queue.get()
            if item is None:
                break
            batch, stopping = self._take(item)
            with self._lock:
                self.pending -= len(batch)
            # a request whose client went away was cancelled: skip it; the rest can no longer be cancelled
            batch = [(row, fut) for row, fut in batch if fut.set_running_or_notify_cancel()]
            if not batch:
                continue
            try:
                results = self._run([row for row, _ in batch])
                for (_, fut), res in zip(batch, results):
                    fut.set_result(res)
            except Exception as e:  # a failed batch fails its requests, never the server
                for _, fut in batch:
                    fut.set_exception(e)


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str, labels: str = "") -> list[str]:
        bucket = f"{labels}," if labels else ""
        braces = f"{{{labels}}}" if labels else ""
        out = [f'{name}_bucket{{{bucket}le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        out += [f'{name}_bucket{{{bucket}le="+Inf"}} {self.count}', f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {self.count}"]
        return out


class Metrics:
    """Prometheus text exposition, by hand: a handful of counters and histograms need no client library."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter = Counter()
        self.latency: dict[str, _Histogram] = {}
        self.batch_size = _Histogram((1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = _Histogram((0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.adapter_load_seconds = _Histogram((0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
        self.tokens = 0
        self.jobs: Counter = Counter()

    def observe_request(self, path: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[(path, status)] += 1
            self.latency.setdefault(path, _Histogram((0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))).observe(seconds)

    def observe_batch(self, size: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.batch_size.observe(size)
            self.batch_seconds.observe(seconds)
            self.tokens += tokens

    def observe_adapter_load(self, seconds: float) -> None:
        with self._lock:
            self.adapter_load_seconds.observe(seconds)

    def render(self, gauges: dict[str, tuple[str, float]]) -> str:
        with self._lock:
            out = ["# HELP mta_requests_total HTTP requests by route and status.", "# TYPE mta_requests_total counter"]
            out += [f'mta_requests_total{{path="{p}",status="{s}"}} {n}' for (p, s), n in sorted(self.requests.items())]
            out += ["# HELP mta_request_latency_seconds HTTP request latency by route.", "# TYPE mta_request_latency_seconds histogram"]
            for p, h in sorted(self.latency.items()):
                out += h.lines("mta_request_latency_seconds", f'path="{p}"')
            out += ["# HELP mta_batch_size Rows per batched forward pass.", "# TYPE mta_batch_size histogram"]
            out += self.batch_size.lines("mta_batch_size")
            out += ["# HELP mta_batch_seconds Time to generate one batch.", "# TYPE mta_batch_seconds histogram"]
            out += self.batch_seconds.lines("mta_batch_seconds")
            out += ["# HELP mta_adapter_load_seconds Time to read a user's stacked LoRA from the store and prepare it (cache misses).",
                    "# TYPE mta_adapter_load_seconds histogram"]
            out += self.adapter_load_seconds.lines("mta_adapter_load_seconds")
            out += ["# HELP mta_generated_tokens_total Tokens generated.", "# TYPE mta_generated_tokens_total counter",
                    f"mta_generated_tokens_total {self.tokens}"]
            out += ["# HELP mta_adapt_jobs_total Adapt jobs by final status.", "# TYPE mta_adapt_jobs_total counter"]
            out += [f'mta_adapt_jobs_total{{status="{s}"}} {n}' for s, n in sorted(self.jobs.items())]
        for name, (kind, value) in gauges.items():
            out += [f"# TYPE {name} {kind}", f"{name} {value:g}"]
        return "\n".join(out) + "\n"


class Server:
    """Everything behind the routes; the FastAPI app is a thin layer over it."""

    def __init__(self, bank: Bank, store: UserStore, model, tokenizer, embedder, cfg: ServeConfig):
        bank.check_model(model)
        self.bank, self.store, self.tokenizer, self.cfg, self.task = bank, store, tokenizer, cfg, bank.task
        self.embedder = _Locked(embedder)
        self.num_retrieved = cfg.num_retrieved if cfg.num_retrieved is not None else bank.config.num_retrieved
        self.lora = PerRowLora(model)
        self.cache: LRUCache = LRUCache(cfg.cache_size)  # per user: their prepared adapter parts
        self.fused: LRUCache = LRUCache(cfg.cache_size)  # per set of anchors (or fusion record): prepared, shared by users
        self.metrics = Metrics()
        self.batcher = Batcher(self._run_batch, cfg.max_batch, cfg.max_queue, cfg.max_wait_ms / 1000)
        self.id = uuid.uuid4().hex  # this server instance: it owns the adapt jobs it runs, and renews their leases
        self._job_runner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mta-adapt")
        self._train_model = None  # a private copy of the base model, made by the first adapt job
        self._stopping = threading.Event()
        self._lease_renewer = threading.Thread(target=self._renew_leases, name="mta-job-leases", daemon=True)

    # -- users ---------------------------------------------------------------------------------------
    def check_profile(self, profile: list[dict]) -> None:
        if len(profile) > self.cfg.max_profile_items:
            raise HTTPException(413, f"profile has {len(profile)} items; the limit is {self.cfg.max_profile_items}")
        try:
            for j, item in enumerate(profile):
                self.task.check_item(item, f"profile item {j}")
        except MTAError as e:
            raise HTTPException(422, str(e)) from None

    def fuse(self, user_id: str, profile: list[dict]) -> UserRecord:
        """Embed the profile and pick anchors and weights: no training, milliseconds."""
        self.check_profile(profile)
        record = plan_fusion(self.bank, profile_embedding(self.embedder, self.task, profile), self.cfg.fusion)
        return UserRecord(user_id, self.task.id, self.bank.manifest["base_model"], self.bank.fingerprint, record, None)

    def put_user(self, user_id: str, profile: list[dict]) -> StoredUser:
        return self.store.put(self.fuse(user_id, profile), profile)

    # -- generation ----------------------------------------------------------------------------------
    def row(self, user_id: str | None, text: str, max_new_tokens: int | None, inline_profile: list[dict] | None,
            api: Literal["generate", "completions"] = "generate") -> Row:
        """The user's prompt and adapter: stored users first; an inline profile is fused on the fly, never stored.
        Errors name `api`'s own fields (/v1/completions: prompt, max_tokens; it takes no inline profile)."""
        text_field, tokens_field = ("input", "max_new_tokens") if api == "generate" else ("prompt", "max_tokens")
        if len(text) > self.cfg.max_input_chars:
            raise HTTPException(413, f"{text_field} has {len(text)} characters; the limit is {self.cfg.max_input_chars}")
        if max_new_tokens is not None and max_new_tokens > self.cfg.max_new_tokens:
            raise HTTPException(422, f"{tokens_field} is {max_new_tokens}; this server allows at most {self.cfg.max_new_tokens}")
        stored = self.store.get(user_id) if user_id is not None else None
        if stored is not None:
            record, profile, adapter_file = stored.record, stored.profile, stored.adapter
            if record.bank_fingerprint != self.bank.fingerprint:
                raise HTTPException(409, f"user {user_id!r} was fused against bank {record.bank_fingerprint}, this server "
                                         f"runs bank {self.bank.fingerprint}: PUT their profile again")
        elif inline_profile is not None:
            record, profile, adapter_file = self.fuse(user_id or "inline", inline_profile), inline_profile, None
        elif user_id is not None:
            inline = ", or send a profile inline" if api == "generate" else ""
            raise HTTPException(404, f"unknown user {user_id!r}: PUT /v1/users/{{user_id}} first{inline}")
        else:
            raise HTTPException(422, "pass a user_id, or a profile to fuse on the fly")
        key = (*self._fusion_key(record), adapter_file)
        adapter = self.cache.get(key, lambda: self._prepare(record, stored))
        prompt = fit(prompt_ids(self.tokenizer, query_prompt(self.task, text, profile, self.num_retrieved)), self.cfg.max_prompt_tokens)
        return Row(prompt, adapter, max_new_tokens or self.task.max_new_tokens)

    def _prepare(self, record: UserRecord, stored: StoredUser | None) -> tuple:
        """A user's adapter parts: the fused one and their own stacked LoRA (kilobytes), read from the store.

        An exact fusion's factors (k anchors of rank r on every layer, megabytes) are prepared once per set of anchors
        and shared by every user fused from them; each user holds only their weights (planned, picked or learned per
        layer), applied as a batch is gathered. Other merges (linear, svd: ΔW not linear in the weights) are prepared
        once per fusion record.
        """
        fused, f = None, record.fusion
        if f is not None and f.merge == "exact":
            shared = self.fused.get((self.bank.fingerprint, tuple(f.anchor_ids)),
                                    lambda: self.lora.prepare(unweighted(self.bank, f.anchor_ids)))
            fused = Scaled(shared, {n: w.to(device=self.lora.device, dtype=self.lora.dtype) for n, w in row_weights(self.bank, f).items()})
        elif f is not None:
            fused = self.fused.get(self._fusion_key(record), lambda: self._prepared(fused_adapter(self.bank, record)))
        start = time.perf_counter()
        stacked = self._prepared(self.store.stacked(stored) if stored else None)
        self.metrics.observe_adapter_load(time.perf_counter() - start)
        return tuple(p for p in (fused, stacked) if p is not None)

    def _fusion_key(self, record: UserRecord) -> tuple:
        return self.bank.fingerprint, json.dumps(record.fusion.to_dict() if record.fusion else None, sort_keys=True)

    def _prepared(self, weights: LoraWeights | None):
        return self.lora.prepare(weights) if weights is not None else None

    async def generate(self, row: Row) -> tuple[str, RowOutput]:
        try:
            fut = self.batcher.submit(row)
        except Busy as e:
            raise HTTPException(503, str(e)) from None
        return await asyncio.wrap_future(fut)

    def _run_batch(self, rows: list[Row]) -> list[tuple[str, RowOutput]]:
        start = time.perf_counter()
        outs = generate_rows(self.lora, rows, self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, self.cfg.decoding)
        self.metrics.observe_batch(len(rows), sum(len(o.tokens) for o in outs), time.perf_counter() - start)
        return [(self.tokenizer.decode(o.tokens, skip_special_tokens=True).strip(), o) for o in outs]

    # -- adapt jobs ----------------------------------------------------------------------------------
    def start(self) -> None:
        self.batcher.start()
        self._lease_renewer.start()

    def adapt(self, user_id: str) -> Job:
        """Queue a stacked-LoRA training job; a user's queued or running job is returned, not duplicated."""
        if self.store.get(user_id) is None:
            raise HTTPException(404, f"unknown user {user_id!r}: PUT /v1/users/{{user_id}} first")
        job, new = self.store.add_job(user_id, self.id, self.cfg.job_lease_s, self.cfg.keep_finished_jobs)
        if new:
            self._job_runner.submit(self._adapt, job)
        return job

    def _renew_leases(self) -> None:
        while not self._stopping.wait(self.cfg.job_lease_s / 3):
            try:
                self.store.renew_jobs(self.id, self.cfg.job_lease_s)
            except MTAError:
                pass  # the store is unreachable for now: the next round tries again, well within the lease

    def _adapt(self, job: Job) -> None:
        job.status = "running"
        self.store.update_job(job)
        try:
            user = self.store.get(job.user_id)
            if self._train_model is None:
                self._train_model = self.lora.clone_base()
            model, record = personalize(self.bank, User(job.user_id, user.profile),
                                        PersonalizeConfig(self.cfg.fusion, self.cfg.stack, self.num_retrieved),
                                        self._train_model, self.tokenizer, self.embedder, self.task, progress=False)
            stacked = extract(model, STACK)
            self._train_model = model  # its adapter layers stay for the next job (mta.stacking.with_adapters)
            self.store.set_stacked(record, stacked, expected_version=user.version)
            job.stack, job.status = record.stack, "done"
        except Exception as e:
            job.error, job.status = str(e) if isinstance(e, MTAError) else f"{type(e).__name__}: {e}", "failed"
            self._train_model = None  # it may still carry the failed job's adapter layers: clone afresh next time
        job.finished = time.time()
        self.store.update_job(job)
        self.metrics.jobs[job.status] += 1

    def close(self) -> None:
        """Finish accepted requests, then the running adapt job; queued jobs are cancelled."""
        self.batcher.stop()
        self._job_runner.shutdown(wait=True, cancel_futures=True)
        self._stopping.set()
        self.store.expire_jobs(math.inf, "cancelled: the server shut down", owner=self.id)


class _Locked:
    """The embedder behind a lock: request threads and the adapt job share one model."""

    def __init__(self, embedder):
        self._embedder, self._lock = embedder, threading.Lock()

    def encode(self, *args, **kwargs):
        with self._lock:
            return self._embedder.encode(*args, **kwargs)


UserId = Annotated[str, Path(pattern=USER_ID_PATTERN, description="letters, digits, '_', '.', '@', '-'; at most 128")]


def _user_json(u: StoredUser) -> dict:
    return {"user_id": u.record.user_id, "task": u.record.task, "fusion": u.record.fusion.to_dict(), "stacked": u.adapter is not None,
            "stack": u.record.stack, "profile_items": len(u.profile), "version": u.version}


def _job_json(job: Job) -> dict:
    return {"id": job.id, "user_id": job.user_id, "status": job.status, "error": job.error, "created": job.created,
            "finished": job.finished, "stack": job.stack}


@dataclass
class ServerSpec:
    """What a server process loads: `mta serve`'s settings, the same for one process and for every replica."""

    bank: str
    store: str  # a SQLite folder, or a postgresql:// URL (which replicas share)
    cfg: ServeConfig = field(default_factory=ServeConfig)
    device: str | None = None
    dtype: str = "auto"
    threads: int | None = None  # torch CPU threads (None: torch's choice)
    adapter_dtype: str = "fp32"  # how the store keeps new stacked LoRAs


def load_app(spec: ServerSpec) -> FastAPI:
    """Open the store and load the bank, base model and embedder that `spec` names; the caller closes the store
    (`app.state.server.store`)."""
    import torch

    from mta.models import load_base, load_embedder
    from mta.serve.store import open_store

    if spec.threads:
        torch.set_num_threads(spec.threads)
    bank = Bank.load(spec.bank)
    store = open_store(spec.store, adapter_dtype=spec.adapter_dtype)  # before the slow loads: a bad store fails at once
    try:
        model, tok = load_base(bank.manifest["base_model"], spec.device, spec.dtype)
        return create_app(bank, store, model, tok, load_embedder(bank.manifest["embedding_model"]), spec.cfg)
    except BaseException:
        store.close()
        raise


def create_app(bank: Bank, store: UserStore, model, tokenizer, embedder, cfg: ServeConfig | None = None) -> FastAPI:
    """The FastAPI app over `model`; any model, tokenizer and embedder that fit the bank will do (tests pass tiny ones)."""
    server = Server(bank, store, model, tokenizer, embedder, cfg or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        await run_in_threadpool(server.close)  # uvicorn has already let in-flight requests finish

    # the body limit counts the bytes received, so a chunked body (no Content-Length) is bounded too
    app = FastAPI(title="mta personalization server", lifespan=lifespan, max_body_size=server.cfg.max_body_bytes)
    app.state.server = server

    @app.middleware("http")
    async def observe(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")  # the template, not the raw path: user ids must not become label values
        server.metrics.observe_request(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(x) for x in e['loc'][1:]) or e['loc'][0]}: {e['msg']}" for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 413 and exc.detail == "Content Too Large":  # the body limit's own words: say the limit
            exc = StarletteHTTPException(413, f"the request body exceeds the limit of {server.cfg.max_body_bytes} bytes")
        elif exc.status_code == 405:  # Starlette's Allow names the first route that matched the path, not every one
            allowed = {m for r in app.routes if r.matches(request.scope)[0] != Match.NONE for m in getattr(r, "methods", ())}
            exc = StarletteHTTPException(405, exc.detail, headers={"Allow": ", ".join(sorted(allowed))})
        return await http_exception_handler(request, exc)

    @app.exception_handler(MTAError)
    async def failed(request: Request, exc: MTAError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 500)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "draining" if server.batcher.closed else "ok", "bank": bank.fingerprint, "users": len(store),
                "queue": server.batcher.pending}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        text = server.metrics.render({
            "mta_queue_depth": ("gauge", server.batcher.pending), "mta_users": ("gauge", len(store)),
            "mta_adapter_cache_hits_total": ("counter", server.cache.hits),
            "mta_adapter_cache_misses_total": ("counter", server.cache.misses),
            "mta_adapter_cache_entries": ("gauge", len(server.cache)),
        })
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.put("/v1/users/{user_id}", responses=_errors(400, 413, 422))
    def put_user(user_id: UserId, body: ProfileRequest) -> dict:
        """Store the profile and its fusion (anchor ids and weights); any stacked LoRA of an older profile is dropped."""
        return _user_json(server.put_user(user_id, body.profile))

    @app.get("/v1/users/{user_id}", responses=_errors(404, 422))
    def get_user(user_id: UserId) -> dict:
        stored = store.get(user_id)
        if stored is None:
            raise HTTPException(404, f"unknown user {user_id!r}")
        return _user_json(stored)

    @app.post("/v1/users/{user_id}/adapt", status_code=202, responses=_errors(404, 422))
    def adapt(user_id: UserId) -> dict:
        return _job_json(server.adapt(user_id))

    @app.get("/v1/jobs/{job_id}", responses=_errors(404, 422))
    def get_job(job_id: str) -> dict:
        job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"unknown job {job_id!r}")
        return _job_json(job)

    @app.post("/v1/generate", responses=_errors(400, 404, 409, 413, 422, 503))
    async def generate(body: GenerateRequest) -> dict:
        row = await run_in_threadpool(server.row, body.user_id, body.input, body.max_new_tokens, body.profile)
        text, out = await server.generate(row)
        return {"user_id": body.user_id, "output": text, "tokens": len(out.tokens), "finish_reason": "stop" if out.stopped else "length"}

    @app.post("/v1/completions", responses=_errors(400, 404, 409, 413, 422, 503))
    async def completions(body: CompletionRequest) -> dict:
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not 1 <= len(prompts) <= server.cfg.max_batch:
            raise HTTPException(422, f"prompt: pass 1 to {server.cfg.max_batch} prompts, not {len(prompts)}")
        rows = [await run_in_threadpool(server.row, body.user, p, body.max_tokens, None, "completions") for p in prompts]
        results = await asyncio.gather(*(server.generate(r) for r in rows))
        completion = sum(len(o.tokens) for _, o in results)
        prompt = sum(len(r.prompt) for r in rows)
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": body.model or bank.manifest["base_model"],
                "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": "stop" if o.stopped else "length"}
                            for i, (text, o) in enumerate(results)],
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}

    return app
