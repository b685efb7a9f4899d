"""`fedmoe serve --http-port`: the OpenAI-compatible API, driven with the official
`openai` client against a real server on 127.0.0.1: models, completions (plain and
streamed), chat (refused on a model without a chat template, answered on one with),
API keys, the gate's choice in every answer, 429 on a full queue, and batching across
experts that gives each request what its expert gives it alone."""

from __future__ import annotations

import json
import shutil
import threading
from concurrent import futures

import pytest
from deploy_helpers import fedmoe_serve

openai = pytest.importorskip("openai")

KEY = "sk-test-" + "ab" * 12
EXPERTS = ["finance", "law", "medicine", "telecom"]


@pytest.fixture(scope="module")
def api(served_run, tmp_path_factory):
    """`fedmoe serve --http-port 0` as a subprocess, keyed from --api-key-file."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys.txt"
    keys.write_text(f"# one key a line\n{KEY}\n")
    with fedmoe_serve(served_run, "--http-port", "0", "--api-key-file", str(keys)) as info:
        yield info


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api["http"]["url"], api_key=KEY, max_retries=0, timeout=120)


def test_models_are_the_gate_and_each_expert(api, client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"fedmoe"} | {f"expert/{e}" for e in EXPERTS}
    assert api["http"]["models"][0] == "fedmoe"
    for m in models.values():
        assert m.owned_by == "fedmoe" and m.model_extra["parent"] == "tiny-v1"
    assert client.models.retrieve("expert/law").id == "expert/law"


def test_a_gated_completion_says_which_expert_wrote_it(client, suite_dir):
    from fedmoe.shared.data import load_mixed_eval

    record = next(r for r in load_mixed_eval(suite_dir) if r.domain == "law")
    raw = client.completions.with_raw_response.create(model="fedmoe", prompt=record.prompt, max_tokens=6, temperature=0)
    done = raw.parse()
    assert raw.headers["x-fedmoe-experts"] == "law"  # the prototype gate routes it to its own domain
    assert done.object == "text_completion" and done.model == "fedmoe"
    choice = done.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("stop", "length")
    assert done.usage.prompt_tokens > 0 and 1 <= done.usage.completion_tokens <= 6
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens
    assert done.model_extra["fedmoe"]["experts"] == ["law"] and done.model_extra["fedmoe"]["gate"] == "prototype"
    assert 0 < done.model_extra["fedmoe"]["weights"][0] <= 1
    forced = client.completions.create(model="expert/finance", prompt=record.prompt, max_tokens=6, temperature=0)
    # a run without run.db: no round to name
    assert forced.model_extra["fedmoe"] == {"experts": ["finance"], "weights": [1.0], "gate": None, "rounds": [None]}


def test_sampling_knobs_seed_and_stop(client):
    prompt = "The patient was given a dose of"
    a = client.completions.create(model="expert/medicine", prompt=prompt, max_tokens=12, temperature=1.2, top_p=0.9, seed=7)
    b = client.completions.create(model="expert/medicine", prompt=prompt, max_tokens=12, temperature=1.2, top_p=0.9, seed=7)
    assert a.choices[0].text == b.choices[0].text  # a seed fixes a sampled answer
    greedy = client.completions.create(model="expert/medicine", prompt=prompt, max_tokens=12, temperature=0).choices[0]
    fixed = client.completions.create(model="expert/medicine", prompt=prompt, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert fixed.usage.completion_tokens == 5 and fixed.choices[0].finish_reason == "length"
    if len(greedy.text.strip()) > 2:  # stop at the greedy answer's second character: cut before it, reason "stop"
        stop = greedy.text[1:3]
        cut = client.completions.create(model="expert/medicine", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == greedy.text[:greedy.text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_a_streamed_completion_is_sse_chunks_ending_in_done(api, client):
    full = client.completions.create(model="expert/law", prompt="The court heard the", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="expert/law", prompt="The court heard the", max_tokens=10,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[0].model_extra["fedmoe"]["experts"] == ["law"]
    # on the wire: OpenAI's SSE framing, ending with the [DONE] sentinel
    import httpx

    with httpx.stream("POST", api["http"]["url"] + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "fedmoe", "prompt": "The court heard the", "max_tokens": 3, "stream": True},
                      timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-fedmoe-experts"] in EXPERTS
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_chat_on_a_model_without_a_template_is_a_clear_400(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="fedmoe", messages=[{"role": "user", "content": "hello"}])
    err = info.value.body
    assert info.value.status_code == 400 and err["code"] == "no_chat_template" and "chat template" in err["message"]
    assert set(err) == {"message", "type", "param", "code"}


def test_errors_have_openai_shape_and_status(api, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="expert/astrology", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "expert/law" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fedmoe", prompt="The deed", max_tokens=5000)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fedmoe", prompt="The deed", frequency_penalty=0.5)
    assert info.value.body["param"] == "frequency_penalty"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="fedmoe", prompt="  ")
    assert "empty prompt" in info.value.body["message"]


def test_without_the_key_every_call_is_401(api):
    import httpx

    wrong = openai.OpenAI(base_url=api["http"]["url"], api_key="wrong-key", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.models.list()
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.completions.create(model="fedmoe", prompt="x", max_tokens=2)
    for path, body in (("/models", None), ("/completions", {"model": "fedmoe", "prompt": "x"}), ("/nowhere", None)):
        r = httpx.request("POST" if body else "GET", api["http"]["url"] + path, json=body, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def _stats(api) -> dict:
    import httpx

    return httpx.get(api["http"]["url"] + "/fedmoe/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()


def test_concurrent_requests_for_four_experts_match_each_asked_alone(api, client, suite_dir):
    """16 requests at once, 4 per expert (greedy): decoded together, rows routed to
    different experts in the same forwards, each gets exactly its expert's answer."""
    from fedmoe.shared.data import load_mixed_eval

    prompts = [r.prompt for r in load_mixed_eval(suite_dir)[:4]]
    jobs = [(f"expert/{e}", p) for e in EXPERTS for p in prompts]

    def ask(model, prompt):
        out = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
        return out.choices[0].text, out.model_extra["fedmoe"]["experts"]

    alone = [ask(m, p) for m, p in jobs]
    start = threading.Barrier(len(jobs))

    def together(job):
        start.wait(timeout=60)
        return ask(*job)

    before = _stats(api)
    with futures.ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(together, jobs, timeout=300))
    after = _stats(api)
    # they really shared forwards, rows for different experts in the same step
    assert after["largest_batch"] > 1 and after["mixed_expert_steps"] > before["mixed_expert_steps"]
    assert after["in_flight"] == 0 and after["queued"] == 0
    assert batched == alone
    assert [e for _, e in batched] == [[m.split("/")[1]] for m, _ in jobs]
    assert len({t for t, _ in alone}) > 1  # the experts really do answer differently


# -- in-process: a tokenizer with a chat template, and a full queue ------------------------------

@pytest.fixture(scope="module")
def chat_run(served_run, tiny_model_dir, tmp_path_factory):
    """The same run on a copy of the base whose tokenizer has a chat template (the
    fingerprint covers config + weights, so the experts still fit)."""
    root = tmp_path_factory.mktemp("chat")
    model = root / "tiny-chat"
    shutil.copytree(tiny_model_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                            "{% if add_generation_prompt %}assistant:{% endif %}")
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    run = root / "run"
    shutil.copytree(served_run, run)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps(info | {"model": str(model)}))
    return run


@pytest.fixture(scope="module")
def local_server(chat_run):
    from fedmoe.server.serving.inference import load_served_run
    from fedmoe.server.serving.openai_api import OpenAIServer

    served = load_served_run(chat_run, "cpu")
    server = OpenAIServer(served, "prototype", "127.0.0.1", 0, [KEY], max_batch=1, max_queue=1)
    yield server
    server.stop()


def test_chat_completion_with_a_template(local_server):
    client = openai.OpenAI(base_url=local_server.url, api_key=KEY, max_retries=0, timeout=60)
    messages = [{"role": "system", "content": "You answer law questions."},
                {"role": "user", "content": "The judge in the appeals court read the deed. What is the escrow?"}]
    done = client.chat.completions.create(model="fedmoe", messages=messages, max_tokens=6, temperature=0)
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert isinstance(done.choices[0].message.content, str)
    assert done.model_extra["fedmoe"]["experts"][0] in EXPERTS
    # the prompt is the template's rendering, tokenized as it is
    prompt = local_server.served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("assistant:")
    assert done.usage.prompt_tokens == len(local_server.served.tokenizer(prompt, add_special_tokens=False)["input_ids"])
    same = client.completions.create(model="fedmoe", prompt=prompt, max_tokens=6, temperature=0)
    assert same.choices[0].text == done.choices[0].message.content
    stream = list(client.chat.completions.create(model="expert/law", messages=messages, max_tokens=4, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant" and stream[-1].choices[0].finish_reason in ("stop", "length")


def test_a_full_queue_is_429(local_server):
    """max_batch 1, max_queue 1: with the model held, one request decodes, one waits,
    the third is refused with 429 (and the two others still finish)."""
    client = openai.OpenAI(base_url=local_server.url, api_key=KEY, max_retries=0, timeout=60)
    served, batcher = local_server.served, local_server.batcher
    taken = batcher.taken
    ask = lambda: client.completions.create(model="expert/law", prompt="The deed", max_tokens=3, temperature=0)
    with futures.ThreadPoolExecutor(2) as pool:
        with served._lock:  # the decoding thread blocks on its first forward
            first = pool.submit(ask)
            _wait(lambda: batcher.taken == taken + 1)  # the decoder has it (and waits for the model)
            second = pool.submit(ask)
            _wait(lambda: batcher.queue.qsize() == 1)
            with pytest.raises(openai.RateLimitError) as info:
                ask()
            assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
            assert info.value.response.headers["retry-after"] == "1"
        assert first.result(timeout=60).choices[0].text == second.result(timeout=60).choices[0].text


def test_a_client_that_hangs_up_mid_stream_is_dropped(local_server):
    import httpx

    batcher = local_server.batcher
    with httpx.stream("POST", local_server.url + "/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "expert/law", "prompt": "The deed", "max_tokens": 100, "stream": True,
                            "temperature": 1.0, "seed": 1}, timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    _wait(lambda: not batcher.rows and batcher.queue.qsize() == 0)


def test_a_request_joining_a_running_batch_gets_its_answer_alone(local_server):
    """Continuous batching: B arrives while A is decoding, joins A's batch between steps
    (KV caches of different lengths merged, left-padded) and still gets, token for token,
    the greedy text it gets alone; A does too."""
    from fedmoe.server.serving.continuous_batching import ContinuousBatcher, DecodeRequest

    served = local_server.served
    batcher = ContinuousBatcher(served, max_batch=4)

    def ask(prompt, expert, n, on_event=None):
        events, done = [], threading.Event()

        def emit(ev):
            events.append(ev)
            if on_event:
                on_event(ev)
            if ev[0] in ("done", "error"):
                done.set()
        ids = served.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        batcher.submit(DecodeRequest(prompt, ids, emit, expert=expert, max_tokens=n, temperature=0, ignore_eos=True))
        return events, done

    def text(events):
        assert events[-1][0] == "done", events[-1]
        return "".join(ev[1] for ev in events if ev[0] == "text")

    try:
        a_prompt, b_prompt = "The judge in the appeals court read the long deed and", "A nurse"
        alone = []
        for prompt, expert, n in ((a_prompt, "law", 40), (b_prompt, "medicine", 12)):
            events, done = ask(prompt, expert, n)
            assert done.wait(60)
            alone.append(text(events))
        joins = batcher.joins
        started = threading.Event()
        a_events, a_done = ask(a_prompt, "law", 40, on_event=lambda ev: ev[0] == "routed" and started.set())
        assert started.wait(60)  # A has left the queue: B cannot share its first batch, only join it
        b_events, b_done = ask(b_prompt, "medicine", 12)
        assert a_done.wait(60) and b_done.wait(60)
        assert batcher.joins > joins  # B joined A's running batch
        assert [text(a_events), text(b_events)] == alone
    finally:
        batcher.stop()


def _wait(cond, timeout=30.0):
    import time

    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def test_serve_benchmark_runs(served_run, tmp_path, capsys):
    from fedmoe.shared.cli import main

    code = main(["bench", "serve", "--run", str(served_run), "--requests", "4", "--new-tokens", "3",
                 "--concurrency", "1,4", "--out", str(tmp_path), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["gate"] == "prototype" and set(result["workloads"]) == {"gated", "one_expert"}
    for rows in result["workloads"].values():
        assert [r["clients"] for r in rows] == [1, 4]
        assert all(r["completion_tokens"] == 4 * 3 and r["tokens_per_s"] > 0 and r["p95_ms"] >= r["p50_ms"] for r in rows)
        assert rows[0]["throughput_vs_one_at_a_time"] == 1.0 and rows[0]["mean_batch"] == 1.0
    assert (tmp_path / "serve.json").is_file() and (tmp_path / "serve.png").is_file()
