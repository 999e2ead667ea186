"""HTTP surface over fakes: shapes, memory object, errors in the OpenAI shape, auth, limits."""

from __future__ import annotations

import json

from services.model_server.reasons import NOT_ALLOWED_REASON, levels_unavailable

from .fakes import FakeFetcher


def _assert_error_shape(resp, status):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    return err


def test_completion_auto_vs_off_gives_different_memory(make_client):
    client = make_client()
    body = {"model": "hiermem", "prompt": "about topic2 please", "max_tokens": 4, "temperature": 0}
    on = client.post("/v1/completions", json=body).json()
    off = client.post("/v1/completions", json={**body, "memory": "off"}).json()
    assert on["memory"]["mode"] == "auto" and on["memory"]["path"] == [2, 4]
    assert on["memory"]["levels"] == [1, 2] and on["memory"]["cache_misses"] == 2
    assert off["memory"] == {**off["memory"], "mode": "off", "path": None, "levels": []}
    # FakeRunner shifts each token by the memory it got: level 1 + level 2 = 3 letters
    shift = (ord(on["choices"][0]["text"][0]) - ord(off["choices"][0]["text"][0])) % 26
    assert shift == 3
    assert on["usage"] == {"prompt_tokens": len(body["prompt"]), "completion_tokens": 4, "total_tokens": 23}
    again = client.post("/v1/completions", json=body).json()
    assert again["memory"]["cache_hits"] == 2 and again["memory"]["cache_misses"] == 0


def test_explicit_path_generic_and_bad_path(make_client):
    client = make_client()
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "memory": [3, 7]}).json()
    assert r["memory"]["mode"] == "path" and r["memory"]["path"] == [3, 7]
    g = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "memory": "generic"}).json()
    assert g["memory"]["mode"] == "generic"
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "x", "memory": [3, 2]}), 400)
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "x", "memory": [9]}), 400)
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "x", "memory": [1, 2, 3]}), 400)


def test_chat_and_models(make_client):
    client = make_client()
    r = client.post("/v1/chat/completions", json={
        "model": "hiermem", "messages": [{"role": "user", "content": "tell me about topic3"}],
        "max_tokens": 3, "temperature": 0}).json()
    assert r["object"] == "chat.completion" and r["choices"][0]["message"]["role"] == "assistant"
    assert len(r["choices"][0]["message"]["content"]) == 3 and r["memory"]["path"][0] == 3
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["hiermem", "fake"]
    _assert_error_shape(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)


def _sse_events(text):
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def test_streaming_openai_and_tgi(make_client):
    client = make_client()
    with client.stream("POST", "/v1/completions", json={"prompt": "topic1", "max_tokens": 5, "stream": True,
                                                         "temperature": 0}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = _sse_events(resp.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["memory"]["path"][0] == 1 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len("".join(c["choices"][0]["text"] for c in chunks)) == 5
    with client.stream("POST", "/generate_stream", json={"inputs": "topic1", "parameters": {"max_new_tokens": 3}}
                       ) as resp:
        events = [json.loads(e) for e in _sse_events(resp.read().decode())]
    assert len(events) == 3 and events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"]["finish_reason"] == "length" and events[-1]["memory"]["path"][0] == 1
    g = client.post("/generate", json={"inputs": "topic1", "parameters": {"max_new_tokens": 3, "details": True}})
    assert g.json()["generated_text"] == events[-1]["generated_text"]
    assert g.json()["details"]["generated_tokens"] == 3


def test_stop_sequences(make_client):
    client = make_client()
    base = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 6, "memory": "off",
                                                "temperature": 0}).json()
    text = base["choices"][0]["text"]
    r = client.post("/v1/completions", json={"prompt": "a", "max_tokens": 6, "memory": "off", "temperature": 0,
                                             "stop": [text[3:5]]}).json()
    assert r["choices"][0]["text"] == text[:3] and r["choices"][0]["finish_reason"] == "stop"


def test_validation_and_limits_are_4xx_in_openai_shape(make_client):
    client = make_client(max_prompt_tokens=10, max_tokens_limit=8, default_max_tokens=4, max_body_bytes=2048)
    err = _assert_error_shape(client.post("/v1/completions", json={"prompt": "x" * 11}), 400)
    assert err["code"] == "context_length_exceeded"
    err = _assert_error_shape(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 9}), 400)
    assert err["param"] == "max_tokens"
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "x", "temperature": 7}), 400)
    _assert_error_shape(client.post("/v1/completions", content=b"{not json", headers={
        "content-type": "application/json"}), 400)
    _assert_error_shape(client.post("/v1/completions", json={"nope": 1}), 400)
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "x" * 5000}), 413)
    _assert_error_shape(client.get("/v1/nothing"), 404)
    _assert_error_shape(client.get("/v1/completions"), 405)
    _assert_error_shape(client.post("/v1/route", json={}), 400)


def test_api_keys_and_subtree_restriction(make_client, keys_file):
    fetcher = FakeFetcher()
    client = make_client(api_keys_file=keys_file, fetcher=fetcher)
    _assert_error_shape(client.get("/v1/models"), 401)
    _assert_error_shape(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert client.get("/health").status_code == 200  # ops endpoints stay open
    sub1 = {"Authorization": "Bearer k-sub1"}
    # the prompt routes to subtree 2 for an unrestricted key, but the restricted key stays inside 1
    r = client.post("/v1/completions", headers=sub1, json={"prompt": "topic2", "max_tokens": 2}).json()
    assert r["memory"]["path"][0] == 1
    route = client.post("/v1/route", headers=sub1, json={"prompt": "topic2"}).json()
    assert route["path"][0] == 1
    err = _assert_error_shape(client.post("/v1/completions", headers=sub1,
                                          json={"prompt": "x", "memory": [2, 4]}), 403)
    assert err["param"] == "memory"
    assert all(r.index == 1 if r.level == 1 else r.index // 2 == 1 for r in fetcher.fetched)
    nomem = client.post("/v1/completions", headers={"Authorization": "Bearer k-none"},
                        json={"prompt": "topic2", "max_tokens": 2}).json()
    assert nomem["memory"]["levels"] == [] and nomem["memory"]["reason"] == NOT_ALLOWED_REASON
    full = client.post("/v1/completions", headers={"Authorization": "Bearer k-all"},
                       json={"prompt": "topic2", "max_tokens": 2}).json()
    assert full["memory"]["path"][0] == 2


def test_degraded_and_strict(make_client):
    fetcher = FakeFetcher()
    fetcher.down.add("s1")  # subtrees 1 and 3
    client = make_client(fetcher=fetcher)
    r = client.post("/v1/completions", json={"prompt": "topic3", "max_tokens": 2}).json()
    every_level = list(range(1, len(r["memory"]["path"]) + 1))
    assert r["memory"]["degraded"] and r["memory"]["reason"] == levels_unavailable(every_level), r["memory"]
    assert r["memory"]["levels"] == []
    ok = client.post("/v1/completions", json={"prompt": "topic2", "max_tokens": 2}).json()
    assert not ok["memory"]["degraded"]
    strict = make_client(fetcher=fetcher, strict=True)
    err = _assert_error_shape(strict.post("/v1/completions", json={"prompt": "topic3", "max_tokens": 2}), 503)
    assert err["code"] == "memory_unavailable"
    metrics = client.get("/metrics").text
    assert "hiermem_degraded_requests_total 1.0" in metrics
    assert 'hiermem_block_cache_misses_total{level="1"}' in metrics


def test_no_bank_server(make_client):
    client = make_client(with_bank=False)
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).json()
    assert r["memory"]["mode"] == "none"
    _assert_error_shape(client.post("/v1/completions", json={"prompt": "hi", "memory": [1]}), 400)
    assert client.get("/ready").json()["status"] == "ready"


def test_full_queue_is_429_with_retry_after(make_client):
    client = make_client(max_queue=0, retry_after_s=3)
    resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    err = _assert_error_shape(resp, 429)
    assert err["code"] == "queue_full" and resp.headers["Retry-After"] == "3"
    assert client.get("/health").status_code == 200


def test_no_key_or_prompt_text_in_logs(make_client, keys_file, caplog):
    import logging

    client = make_client(api_keys_file=keys_file)
    secret_prompt = "my very secret prompt topic2"
    with caplog.at_level(logging.INFO):
        client.post("/v1/completions", headers={"Authorization": "Bearer k-all"},
                    json={"prompt": secret_prompt, "max_tokens": 2})
        client.post("/v1/chat/completions", headers={"Authorization": "Bearer k-sub1"},
                    json={"messages": [{"role": "user", "content": secret_prompt}], "max_tokens": 2})
        client.post("/v1/completions", headers={"Authorization": "Bearer not-a-key"}, json={"prompt": "x"})
    text = caplog.text
    assert "queued" in text  # requests are logged, but only by id, size and path
    for secret in ("secret", "k-all", "k-sub1", "not-a-key"):
        assert secret not in text
