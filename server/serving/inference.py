"""The gRPC `fedmoe.v1.InferenceService` over a `ServedModel`, with server reflection and
the standard health service.

Requests are checked in the handler thread (bad ones get INVALID_ARGUMENT, an unknown
gate NOT_FOUND, each with a one-line message) and then queued; one worker thread takes
whatever has queued up within `max_wait_s` (up to `max_batch`), groups it by (kind,
gate, top_k) and runs each group as one batch: one routing pass and one `generate`
whose sequences may go to different experts (peft `adapter_names`). The model runs on
that one thread, so no request sees another's adapter state.

Every call needs the server's bearer token (the operator API's `TokenInterceptor`);
the queue is bounded (a full one answers RESOURCE_EXHAUSTED at once, rather than
letting waiting callers pile up threads and memory) and a call cancelled while it
waits is dropped before the model spends time on it.
"""

from __future__ import annotations

import queue
import threading
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedmoe.protos import inference_pb2 as pb
from fedmoe.protos import inference_pb2_grpc as pb_grpc
from fedmoe.shared.errors import FedmoeError

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
DEFAULT_NEW_TOKENS = 16
MAX_NEW_TOKENS = 512
MAX_PROMPT_CHARS = 100_000
DEFAULT_MAX_QUEUE = 64


class RequestError(FedmoeError):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class _Job:
    kind: str  # "generate" | "route"
    prompt: str
    gate: str
    top_k: int = 1
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    done: futures.Future = field(default_factory=futures.Future)


class Batcher:
    """Collects concurrent requests and runs them as batches on one worker thread."""

    def __init__(self, served, max_batch: int = 16, max_wait_s: float = 0.01, max_queue: int = DEFAULT_MAX_QUEUE):
        self.served, self.max_batch, self.max_wait_s = served, max_batch, max_wait_s
        self.jobs: queue.Queue[_Job | None] = queue.Queue(maxsize=max_queue)
        self.batches_run = 0
        self.largest_batch = 0
        self.dropped = 0  # cancelled before they ran
        self._thread = threading.Thread(target=self._loop, name="fedmoe-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job, context=None):
        """Queue `job` and wait for it. `context` (gRPC): the job is cancelled when the
        call ends early (client cancel, deadline), so the worker skips it."""
        if context is not None:
            context.add_callback(job.done.cancel)  # runs when the RPC terminates; a no-op once done
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               f"server busy: {self.jobs.maxsize} requests already queued; retry later") from None
        try:
            return job.done.result()
        except futures.CancelledError:
            raise RequestError(grpc.StatusCode.CANCELLED, "call cancelled") from None

    def stop(self):
        self.jobs.put(None)
        self._thread.join(timeout=10)

    def _loop(self):
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            try:
                while len(batch) < self.max_batch:
                    nxt = self.jobs.get(timeout=self.max_wait_s)
                    if nxt is None:
                        self.jobs.put(None)
                        break
                    batch.append(nxt)
            except queue.Empty:
                pass
            groups: dict[tuple, list[_Job]] = {}
            for job in batch:
                groups.setdefault((job.kind, job.gate, job.top_k), []).append(job)
            for (kind, gate, top_k), jobs in groups.items():
                self._run(kind, gate, top_k, jobs)
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(batch))

    def _run(self, kind, gate, top_k, jobs):
        live = [j for j in jobs if j.done.set_running_or_notify_cancel()]  # False: cancelled while queued
        self.dropped += len(jobs) - len(live)
        if not (jobs := live):
            return
        try:
            prompts = [j.prompt for j in jobs]
            with self.served.pinned() as rnd:  # one round's experts for the whole batch (hot swap waits)
                if kind == "route":
                    weights = self.served.route(prompts, gate)
                    results = [(None, w) for w in weights]
                else:
                    results = self.served.generate(prompts, [j.max_new_tokens for j in jobs], gate=gate, top_k=top_k)
        except Exception as exc:  # hand every waiting caller the failure
            for j in jobs:
                j.done.set_exception(exc)
            return
        for j, (text, weights) in zip(jobs, results):
            j.done.set_result((text, weights, rnd))


def _expert_weights(served, weights, drop_zero: bool):
    pairs = sorted(zip(served.experts, weights.tolist()), key=lambda p: -p[1])
    return [pb.ExpertWeight(expert=e, weight=float(w)) for e, w in pairs if w > 0 or not drop_zero]


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, served, default_gate: str, batcher: Batcher):
        self.served, self.default_gate, self.batcher = served, default_gate, batcher

    def _gate(self, name: str) -> str:
        name = name or self.default_gate
        if name not in self.served.gates:
            raise RequestError(grpc.StatusCode.NOT_FOUND,
                               f"unknown gate {name!r}: this server has {', '.join(self.served.gates)}")
        return name

    def _prompt(self, prompt: str) -> str:
        if not prompt.strip():
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "empty prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"prompt longer than {MAX_PROMPT_CHARS} characters")
        return prompt

    def _call(self, context, fn):
        try:
            return fn()
        except RequestError as exc:
            context.abort(exc.code, str(exc))
        except FedmoeError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a bug, not the caller's fault: say so, keep serving
            context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")

    def Generate(self, request, context):
        def run():
            prompt, gate = self._prompt(request.prompt), self._gate(request.gate)
            n = request.max_new_tokens or DEFAULT_NEW_TOKENS
            if n < 0 or n > MAX_NEW_TOKENS:
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {n}")
            top_k = request.top_k or 1
            if not 1 <= top_k <= len(self.served.experts):
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"top_k must be between 1 and {len(self.served.experts)}, got {top_k}")
            self.served.check_request(prompt, n)  # too many tokens -> INVALID_ARGUMENT
            text, weights, rnd = self.batcher.submit(_Job("generate", prompt, gate, top_k, n), context)
            return pb.GenerateReply(text=text, experts=_expert_weights(self.served, weights, True), gate=gate,
                                    round=rnd or 0)
        return self._call(context, run)

    def Route(self, request, context):
        def run():
            prompt, gate = self._prompt(request.prompt), self._gate(request.gate)
            _, weights, rnd = self.batcher.submit(_Job("route", prompt, gate), context)
            return pb.RouteReply(experts=_expert_weights(self.served, weights, False), gate=gate, round=rnd or 0)
        return self._call(context, run)


class Serving:
    """A running inference server: `port`, `served`, `stop()`, `wait()`."""

    def __init__(self, served, default_gate: str, host: str = "127.0.0.1", port: int = 0, max_batch: int = 16,
                 max_wait_s: float = 0.01, workers: int = 32, token: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 tls: tuple[bytes, bytes] | None = None):
        """`token`: required on every call (None: a new one, in `.token`); `tls`: (key PEM,
        certificate chain PEM) to serve TLS; `max_queue`: waiting requests before RESOURCE_EXHAUSTED."""
        from grpc_health.v1 import health, health_pb2, health_pb2_grpc
        from grpc_reflection.v1alpha import reflection

        from fedmoe.server.ops.access import new_token
        from fedmoe.server.ops.operator_service import TokenInterceptor

        if default_gate not in served.gates:
            raise FedmoeError(f"unknown gate {default_gate!r}: available gates are {', '.join(served.gates)}")
        if token is not None and not token.strip():
            raise FedmoeError("serve token must not be empty")
        if max_queue < 1:
            raise FedmoeError(f"--max-queue must be >= 1, got {max_queue}")
        self.token = token or new_token()
        self.served, self.default_gate = served, default_gate
        self.watcher = None  # a live run's hot-swap RoundWatcher (fedmoe serve starts it), stopped with us
        self.batcher = Batcher(served, max_batch, max_wait_s, max_queue)
        # Handler threads beyond the queue would only wait: a full queue refuses at once instead.
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), interceptors=[TokenInterceptor(self.token)],
                                  maximum_concurrent_rpcs=max_queue + workers)
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(served, default_gate, self.batcher), self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        try:
            self.port = (self.server.add_secure_port(f"{host}:{port}", grpc.ssl_server_credentials([tls])) if tls
                         else self.server.add_insecure_port(f"{host}:{port}"))
        except RuntimeError as exc:
            raise FedmoeError(f"cannot listen on {host}:{port}: {exc}") from None
        if not self.port:
            raise FedmoeError(f"cannot listen on {host}:{port} (in use?)")
        self.host = host
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float = 2.0):
        if self.watcher is not None:
            self.watcher.stop()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        self.batcher.stop()

    def wait(self):
        self.server.wait_for_termination()


def load_served_run(run_dir: str | Path, device: str | None = None):
    """A `ServedModel` for a run: its base, its experts and every gate it can serve.

    The experts are `experts/*` once the run wrote them (`served.round`: the run's last
    committed round if it is finished, else None until the round watcher swaps one in);
    a run still federating has none yet, so its newest verified round's checkpoints are
    served (padded to one rank, which Arrow needs; `served.round` is that round)."""
    import json
    import tempfile

    from fedmoe.server.moe.gates import available_gates, load_gate
    from fedmoe.server.moe.served_model import ServedModel
    from fedmoe.server.serving.hot_swap import checkpointed_experts, run_state
    from fedmoe.shared.features import FeatureConfig
    from fedmoe.shared.runs import list_experts, read_run_info

    run_dir = Path(run_dir)
    info = read_run_info(run_dir)
    model_dir = info.get("model") or info.get("model_dir")
    if not model_dir:
        raise FedmoeError(f"{run_dir / 'run.json'} does not name the base model ('model')")
    gate_dir = run_dir / "gates"
    features = None
    if (gate_dir / "features.json").is_file():
        features = FeatureConfig.from_dict(json.loads((gate_dir / "features.json").read_text()))
    experts = list_experts(run_dir)
    state, last = run_state(run_dir)
    if experts:
        served = ServedModel(model_dir, {e: run_dir / "experts" / e for e in experts}, device, features)
        served.round = last if state == "finished" and last else None
    else:
        from fedmoe.server.federation.experts import save_expert

        rnd, deltas = checkpointed_experts(run_dir)
        if not deltas:
            raise FedmoeError(f"run {run_dir} has no experts (experts/<domain>/adapter_config.json) "
                              "and no committed round with verified checkpoints yet")
        rank = max(d.rank for d in deltas.values())
        with tempfile.TemporaryDirectory(prefix="fedmoe-round-") as tmp:
            dirs = {e: save_expert(d.padded_to(rank), Path(tmp) / e, model_dir, domain=e, round=rnd)
                    for e, d in deltas.items()}
            served = ServedModel(model_dir, dirs, device, features)
        served.round = rnd
    for name in available_gates(gate_dir):
        served.add_gate(name, load_gate(served, name, gate_dir))
    return served


def best_gate(run_dir: str | Path, gates: list[str]) -> str:
    """The default gate: the one with the best mixed accuracy in report.json, else the
    first of learned, prototype, arrow that the run has."""
    import json

    report = Path(run_dir) / "report.json"
    if report.is_file():
        try:
            methods = json.loads(report.read_text()).get("methods", {})
            scored = [(methods[f"moe_{g}"].get("mixed", -1), g) for g in gates if f"moe_{g}" in methods]
            if scored:
                return max(scored)[1]
        except (ValueError, AttributeError):
            pass
    for g in ("learned", "prototype", "arrow"):
        if g in gates:
            return g
    return gates[0]
