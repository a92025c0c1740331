"""The server fuzzed from its own OpenAPI schema with schemathesis: every operation, valid and invalid requests.

No response may be a 500 or break the schema (which declares each route's error responses), and a stored user
stays exactly as it was. MTA_FUZZ_EXAMPLES sets the examples per operation (default 25: seconds in CI); a longer
run is in docs/reliability.md.
"""

import os

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.python.asgi import shutdown_lifespans
from test_app import FAST_STACK, HashEmbedder

from mta.config import ServeConfig
from mta.models import load_base
from mta.serve.app import create_app
from mta.serve.store import open_store

EXAMPLES = int(os.environ.get("MTA_FUZZ_EXAMPLES", "25"))


def _snapshot(stored) -> tuple:
    return stored.record.to_dict(), stored.profile, stored.version, stored.adapter


@pytest.fixture
def fuzzed(tmp_path, random_bank, tiny_model_dir, users):
    """The app over a store holding one user, with limits small enough that generated requests reach them.

    Schemathesis runs the app's lifespan (its batcher) from loading the schema until `shutdown_lifespans`.
    """
    model, tok = load_base(str(tiny_model_dir), device="cpu")
    cfg = ServeConfig(stack=FAST_STACK, max_new_tokens=4, max_profile_items=20, max_input_chars=500, max_body_bytes=50_000)
    with open_store(tmp_path / "store") as store:
        app = create_app(random_bank, store, model, tok, HashEmbedder(), cfg)
        alice = app.state.server.put_user("alice", users[0].profile)
        try:
            yield schemathesis.openapi.from_asgi("/openapi.json", app), store, _snapshot(alice)
        finally:
            shutdown_lifespans()


@pytest.fixture
def api_schema(fuzzed):
    return fuzzed[0]


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_server_answers_every_request_within_its_schema(case, fuzzed):
    _, store, alice = fuzzed
    # every check but "a schema-valid request is accepted": the schema cannot say which fields a task's profile items
    # need, nor this server's limits (max_new_tokens, prompts per request), which answer 422/413 as declared
    case.call_and_validate(excluded_checks=[schemathesis.checks.positive_data_acceptance])
    assert _snapshot(store.get("alice")) == alice
