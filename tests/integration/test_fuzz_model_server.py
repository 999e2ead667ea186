"""Property-based fuzz of the model server's own OpenAPI schema (schemathesis), in process over the real
tiny anchor and a synthetic bank: no 5xx, and every error in the OpenAI error shape."""

from __future__ import annotations

import collections
import json

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from lm import load_anchor
from memory_store import AnchorIdentity, BankSpec
from memory_store.synth import synth_bank
from services.model_server.app import create_app
from services.model_server.auth import hash_key
from services.model_server.settings import ModelServerSettings

MAX_EXAMPLES = 60  # per operation and mode; the whole fuzz takes about 20 s on 2 cores


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory):
    anchor = load_anchor("tiny")
    c = anchor.config
    root = tmp_path_factory.mktemp("fuzz")
    spec = BankSpec(branching=[4, 4], ranks=[4, 2], memory_layers=list(range(c.n_layers)), n_layers=c.n_layers,
                    d_model=c.d_model, dtype="float16", embedder_name="hash-trigram", embedder_dim=384)
    synth_bank(root / "bank", spec, 2, anchor=AnchorIdentity(**anchor.identity))
    keys = root / "keys.json"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key("fuzz-key"), "tenant": "fuzz", "subtrees": [1, 2]}]}))
    app = create_app(ModelServerSettings(anchor="tiny", bank=root / "bank", max_batch=4, max_queue=64,
                                         max_seq_len=96, max_prompt_tokens=64, max_tokens_limit=4,
                                         default_max_tokens=2, max_body_bytes=8192, api_keys_file=keys))
    with TestClient(app):  # runs the lifespan: the engine thread serves while the fuzz runs
        yield app


STATUSES: collections.Counter = collections.Counter()


def _check(case) -> None:
    given_auth = case.headers and "authorization" in {k.lower() for k in case.headers}
    response = case.call(headers=None if given_auth else {"Authorization": "Bearer fuzz-key"})
    STATUSES[(case.path, response.status_code)] += 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"}, body
        assert set(body["error"]) == {"message", "type", "param", "code"}, body
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]


@pytest.mark.integration
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_fuzz_no_5xx_and_openai_error_shape(fuzz_app, mode):
    """Every operation of /openapi.json, valid (positive) and invalid (negative) inputs.

    (schemathesis.pytest.from_fixture does not work with pytest 9, so hypothesis drives the strategies.)"""
    schema = schemathesis.openapi.from_asgi("/openapi.json", fuzz_app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/v1/route"} <= {op.path for op in operations}
    ran_out = []
    for op in operations:
        run = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                       suppress_health_check=list(HealthCheck))(given(case=op.as_strategy(mode))(_check))
        try:
            run()
        except Unsatisfiable:
            assert mode == GenerationMode.NEGATIVE and not op.body, op.path  # no input to make invalid
            ran_out.append(op.path)
    assert len(ran_out) < len(operations)
    seen = {code for (_, code) in STATUSES}
    # the fuzz really reached generation (200) and really sent invalid input (400)
    assert (200 in seen) if mode == GenerationMode.POSITIVE else (400 in seen), STATUSES
