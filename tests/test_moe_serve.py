"""`fedmoe serve` on a run folder, reached through the generated gRPC stub: routed
answers, batching of concurrent requests, status codes for bad requests, health and
reflection; and `fedmoe ask` as its client."""

from __future__ import annotations

import json

import grpc
import pytest
from deploy_helpers import fedmoe_serve


@pytest.fixture(scope="module")
def run_dir(served_run):
    return served_run


@pytest.fixture(scope="module")
def server(run_dir):
    with fedmoe_serve(run_dir) as info:
        yield info


class Bearer(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call of a channel."""

    def __init__(self, token):
        self.token = token

    def _with(self, details):
        metadata = list(details.metadata or []) + [("authorization", f"Bearer {self.token}")]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with(details), request)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, d, metadata):
        self.method, self.timeout, self.metadata = d.method, d.timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = d.credentials, d.wait_for_ready, d.compression


def authed_channel(server):
    return grpc.intercept_channel(grpc.insecure_channel(server["address"]), Bearer(server["token"]))


@pytest.fixture(scope="module")
def stub(server):
    from fedmoe.protos import inference_pb2_grpc as pb_grpc

    raw = grpc.insecure_channel(server["address"])
    grpc.channel_ready_future(raw).result(timeout=30)
    channel = grpc.intercept_channel(raw, Bearer(server["token"]))
    yield pb_grpc.InferenceServiceStub(channel)
    raw.close()


def test_a_call_without_the_token_is_unauthenticated(server, stub):
    from fedmoe.protos import inference_pb2 as pb
    from fedmoe.protos import inference_pb2_grpc as pb_grpc

    assert len(server["token"]) >= 32  # generated (none was given) and printed once
    with grpc.insecure_channel(server["address"]) as channel:
        bare = pb_grpc.InferenceServiceStub(channel)
        for metadata in (None, [("authorization", "Bearer wrong")]):
            with pytest.raises(grpc.RpcError) as info:
                bare.Route(pb.RouteRequest(prompt="A nurse asked. Answer:"), timeout=30, metadata=metadata)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.Route(pb.RouteRequest(prompt="A nurse asked. Answer:"), timeout=60).gate == "prototype"


def test_serve_gives_a_routed_answer_through_the_stub(server, stub, suite_dir):
    from fedmoe.protos import inference_pb2 as pb
    from fedmoe.shared.data import load_mixed_eval

    assert server["address"].startswith("127.0.0.1:") and server["port"] > 0
    assert set(server["gates"]) == {"arrow", "smile", "prototype"} and server["default_gate"] == "prototype"
    records = load_mixed_eval(suite_dir)[:6]
    routed = []
    for r in records:
        route = stub.Route(pb.RouteRequest(prompt=r.prompt), timeout=60)
        assert route.gate == "prototype"
        routed.append(route.experts[0].expert)
        assert abs(sum(e.weight for e in route.experts) - 1) < 1e-4
    # A trained gate, so not perfect: most prompts go to their own domain.
    assert sum(e == r.domain for e, r in zip(routed, records)) >= 5, list(zip(routed, [r.domain for r in records]))
    reply = stub.Generate(pb.GenerateRequest(prompt=records[0].prompt, max_new_tokens=6), timeout=60)
    assert reply.gate == "prototype" and len(reply.experts) == 1 and reply.experts[0].expert == routed[0]
    assert reply.round == 0  # a run folder without run.db: not from a run's rounds
    assert isinstance(reply.text, str)
    arrow = stub.Generate(pb.GenerateRequest(prompt=records[0].prompt, max_new_tokens=3, gate="arrow", top_k=2), timeout=60)
    assert arrow.gate == "arrow" and 1 <= len(arrow.experts) <= 2


def test_concurrent_requests_are_batched_and_all_answered(stub, suite_dir):
    from fedmoe.protos import inference_pb2 as pb
    from fedmoe.shared.data import load_mixed_eval

    records = load_mixed_eval(suite_dir)[:12]
    requests = [pb.GenerateRequest(prompt=r.prompt, max_new_tokens=2 + i % 3) for i, r in enumerate(records)]
    alone = [stub.Generate(q, timeout=60) for q in requests]
    calls = [stub.Generate.future(q, timeout=120) for q in requests]
    replies = [c.result() for c in calls]
    # Batched together, each request gets exactly what it gets alone: same expert, same tokens.
    assert [(r.experts[0].expert, r.text) for r in replies] == [(r.experts[0].expert, r.text) for r in alone]
    assert len({r.experts[0].expert for r in replies}) > 1  # a mixed-expert batch, not one expert for all


@pytest.mark.parametrize("request_kwargs, code, words", [
    ({"prompt": ""}, grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    ({"prompt": "   "}, grpc.StatusCode.INVALID_ARGUMENT, "empty prompt"),
    ({"prompt": "A nurse asked. Answer:", "gate": "oracle"}, grpc.StatusCode.NOT_FOUND, "unknown gate 'oracle'"),
    ({"prompt": "A nurse asked. Answer:", "max_new_tokens": 100_000}, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    ({"prompt": "A nurse asked. Answer:", "max_new_tokens": 500}, grpc.StatusCode.INVALID_ARGUMENT, "too many tokens"),
    ({"prompt": "A nurse asked. Answer:", "top_k": 9}, grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
])
def test_bad_requests_get_status_codes(stub, request_kwargs, code, words):
    from fedmoe.protos import inference_pb2 as pb

    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(pb.GenerateRequest(**request_kwargs), timeout=30)
    assert info.value.code() == code
    assert words in info.value.details()


def test_health_and_reflection(server, stub):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with authed_channel(server) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "fedmoe.v1.InferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        names = {s.name for s in answers[0].list_services_response.service}
        assert "fedmoe.v1.InferenceService" in names and "grpc.health.v1.Health" in names


def test_fedmoe_ask_is_the_client(server, stub, capsys, monkeypatch, tmp_path):
    from fedmoe.shared.cli import main

    monkeypatch.delenv("FEDMOE_SERVE_TOKEN", raising=False)
    assert main(["ask", "--addr", server["address"], "hello"]) == 2
    assert "needs the server's token" in capsys.readouterr().err
    assert main(["ask", "--addr", server["address"], "--token", "wrong", "hello"]) == 2
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    (tmp_path / "token").write_text(server["token"] + "\n")
    assert main(["ask", "--addr", server["address"], "--token-file", str(tmp_path / "token"), "--route", "hello"]) == 0
    capsys.readouterr()
    monkeypatch.setenv("FEDMOE_SERVE_TOKEN", server["token"])
    prompt = "The judge in the appeals court read the deed. What is the escrow? Answer:"
    assert main(["ask", "--addr", server["address"], "--json", "--max-new-tokens", "4", prompt]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gate"] == "prototype" and set(out["experts"]) <= {"finance", "law", "medicine", "telecom"}
    assert "text" in out
    assert main(["ask", "--addr", server["address"], "--route", "--json", prompt]) == 0
    route = json.loads(capsys.readouterr().out)
    assert max(route["experts"], key=route["experts"].get) == "law"
    assert main(["ask", "--addr", server["address"], "--gate", "nope", prompt]) == 2
    assert "NOT_FOUND" in capsys.readouterr().err


def test_serve_refuses_a_public_host_without_tls(run_dir, capsys):
    from fedmoe.shared.cli import main

    assert main(["serve", "--run", str(run_dir), "--host", "0.0.0.0", "--grpc-port", "0"]) == 2
    assert "--host 0.0.0.0 is not loopback" in capsys.readouterr().err
    assert main(["serve", "--run", str(run_dir), "--tls-cert", "x.pem", "--grpc-port", "0"]) == 2
    assert "go together" in capsys.readouterr().err


def test_a_full_queue_answers_resource_exhausted_and_cancelled_calls_are_dropped():
    """The Batcher alone, over a served model that blocks until released: no model needed."""
    import threading

    from fedmoe.server.serving.inference import Batcher, RequestError, _Job

    release, started = threading.Event(), threading.Event()

    class Slow:
        def pinned(self):  # a served model pins its round for the batch (hot swap); this one has none
            import contextlib

            return contextlib.nullcontext(None)

        def route(self, prompts, gate):
            started.set()
            release.wait(30)
            return [[1.0] for _ in prompts]

    b = Batcher(Slow(), max_batch=1, max_wait_s=0.0, max_queue=2)
    first = threading.Thread(target=b.submit, args=(_Job("route", "p0", "g"),))
    first.start()
    assert started.wait(10)  # the worker holds job 0; the queue is empty again
    queued = [_Job("route", f"p{i}", "g") for i in (1, 2)]
    for j in queued:
        b.jobs.put_nowait(j)
    with pytest.raises(RequestError) as info:
        b.submit(_Job("route", "p3", "g"))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "2 requests already queued" in str(info.value)
    assert queued[0].done.cancel()  # its caller went away (what the RPC callback does)
    release.set()
    assert queued[1].done.result(timeout=10) == (None, [1.0], None)
    first.join(10)
    assert b.dropped == 1 and queued[0].done.cancelled()
    b.stop()


def test_serve_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from fedmoe.shared.cli import main

    assert main(["serve", "--run", str(tmp_path), "--grpc-port", "0"]) == 2
    assert "not a fedmoe run folder" in capsys.readouterr().err
