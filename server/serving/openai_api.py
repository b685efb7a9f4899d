"""The OpenAI-compatible HTTP API of `fedmoe serve --http-port P`: `/v1/models`,
`/v1/completions`, `/v1/chat/completions` (FastAPI on uvicorn), over the same
`ServedModel` as the gRPC service.

Model ids: `fedmoe` lets the server's default gate pick the expert for each request;
`expert/<domain>` forces one. Every answer says which expert wrote it: an extra field
`fedmoe: {"experts": [...], "weights": [...], "gate": ..., "rounds": [...]}` (rounds: the
run round whose experts decoded each prompt) and headers `x-fedmoe-experts`,
`x-fedmoe-rounds`. `/v1/models` carries `fedmoe: {"round": ...}`: the round served now
(on a live run it follows the committed rounds: see `serving/hot_swap.py`). Decoding goes through one `ContinuousBatcher`, whose bounded queue
turns overload into 429 rather than unbounded latency. Every error has OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, so the official clients raise their
usual exception classes.
"""

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations
# at run time, and the request models are local to build_app
import asyncio
import json
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from fedmoe.server.serving.continuous_batching import ContinuousBatcher, DecodeRequest, QueueFull
from fedmoe.shared.errors import FedmoeError

API_KEY_ENV = "FEDMOE_API_KEY"
GATED_MODEL = "fedmoe"
EXPERT_PREFIX = "expert/"
MAX_NEW_TOKENS = 512
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4


class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def load_api_keys(key_file: str | None) -> tuple[list[str], bool]:
    """The accepted keys (from `key_file`, one per line, '#' comments; else
    $FEDMOE_API_KEY; else one new key) and whether the key was generated here."""
    from fedmoe.server.ops.access import new_token

    if key_file:
        path = Path(key_file)
        if not path.is_file():
            raise FedmoeError(f"--api-key-file {key_file}: no such file")
        keys = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        if not keys:
            raise FedmoeError(f"--api-key-file {key_file}: no keys in it (one per line)")
        return keys, False
    if os.environ.get(API_KEY_ENV):
        return [os.environ[API_KEY_ENV].strip()], False
    return ["sk-fedmoe-" + new_token()], True


# -- request bodies ------------------------------------------------------------------------------

def _request_models():
    from pydantic import BaseModel, ConfigDict, Field

    class _Sampling(BaseModel):
        # unknown fields are refused (400 naming them), never silently ignored
        model_config = ConfigDict(extra="forbid")

        model: str
        max_tokens: int | None = Field(None, ge=1)
        temperature: float = Field(1.0, ge=0, le=2)
        top_p: float = Field(1.0, gt=0, le=1)
        stop: str | list[str] | None = None
        seed: int | None = None
        stream: bool = False
        stream_options: dict | None = None
        n: Literal[1] = 1
        user: str | None = None
        presence_penalty: Literal[0, 0.0] = 0
        frequency_penalty: Literal[0, 0.0] = 0
        ignore_eos: bool = False  # not OpenAI's: vLLM's extension, for fixed-length benchmarks

    class CompletionRequest(_Sampling):
        prompt: str | list[str]
        echo: Literal[False] = False
        logprobs: None = None

    class ChatMessage(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[dict] | None = None

    class ChatCompletionRequest(_Sampling):
        messages: list[ChatMessage] = Field(min_length=1)
        max_completion_tokens: int | None = Field(None, ge=1)
        logprobs: Literal[False] | None = None

    return CompletionRequest, ChatCompletionRequest


# -- the app -------------------------------------------------------------------------------------

def build_app(served, default_gate: str, batcher: ContinuousBatcher, api_keys: list[str]):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from fedmoe.server.ops.access import bearer, token_matches

    CompletionRequest, ChatCompletionRequest = _request_models()
    app = FastAPI(title="fedmoe", docs_url=None, redoc_url=None, openapi_url=None)
    base_name = Path(served.model_dir).name
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            msg = f"unsupported parameter {param!r}"
        elif err.get("type") == "json_invalid":
            msg, param = "the request body is not valid JSON", None
        else:
            msg = f"{param}: {err.get('msg', 'invalid')}" if param else err.get("msg", "invalid request")
        return JSONResponse(APIError(400, msg, param=param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind).body(),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        # before routing and body validation: without the key, every answer is 401
        given = bearer(request.headers.get("authorization"))
        if not any(token_matches(given, key) for key in api_keys):
            err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")
            return JSONResponse(err.body(), status_code=401, headers={"www-authenticate": "Bearer"})
        return await call_next(request)

    def model_card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "fedmoe", "parent": base_name,
                "root": base_name}

    def model_ids() -> list[str]:
        return [GATED_MODEL] + [EXPERT_PREFIX + e for e in served.experts]

    def resolve_model(model: str) -> tuple[str | None, str | None]:
        """(forced expert, gate) for a model id; 404 for one this server does not have."""
        if model == GATED_MODEL:
            return None, default_gate
        if model.startswith(EXPERT_PREFIX) and model[len(EXPERT_PREFIX):] in served.experts:
            return model[len(EXPERT_PREFIX):], None
        raise APIError(404, f"unknown model {model!r}: this server has {', '.join(model_ids())}", param="model",
                       code="model_not_found")

    @app.get("/v1/models")
    async def list_models():
        # `fedmoe` (not OpenAI's): the run round served now, and the hot-swap watcher's view
        return {"object": "list", "data": [model_card(m) for m in model_ids()], "fedmoe": served.swap_status()}

    @app.get("/v1/fedmoe/stats")
    async def stats():
        """The decoder's counters (not an OpenAI endpoint): how well requests are batched."""
        return batcher.stats() | {"hot_swap": served.swap_status()}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        resolve_model(model_id)
        return model_card(model_id)

    def decode_params(body, max_tokens: int | None, prompt_ids: list[int]) -> dict:
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stop) > MAX_STOP or any(not s for s in stop):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop")
        room = (served.max_positions - len(prompt_ids)) if served.max_positions else MAX_NEW_TOKENS
        if room < 1:
            raise APIError(400, f"the prompt has {len(prompt_ids)} tokens; the model takes at most {served.max_positions}",
                           param="messages" if hasattr(body, "messages") else "prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(room, MAX_NEW_TOKENS, DEFAULT_COMPLETION_TOKENS if not hasattr(body, "messages") else MAX_NEW_TOKENS)
        if max_tokens > MAX_NEW_TOKENS:
            raise APIError(400, f"max_tokens must be at most {MAX_NEW_TOKENS}, got {max_tokens}", param="max_tokens")
        if max_tokens > room:
            raise APIError(400, f"too many tokens: the prompt has {len(prompt_ids)} and max_tokens is {max_tokens}, "
                           f"but the model takes at most {served.max_positions}", param="max_tokens",
                           code="context_length_exceeded")
        return dict(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
                    ignore_eos=body.ignore_eos)

    def tokenize(prompt: str, param: str) -> list[int]:
        if not prompt.strip():
            raise APIError(400, "empty prompt", param=param)
        return served.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def start(prompt: str, prompt_ids: list[int], expert, gate, params: dict):
        """Queue one decode; returns (request, asyncio queue of its events)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(event):
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down)
                pass

        req = DecodeRequest(prompt, prompt_ids, emit, expert=expert, gate=gate, **params)
        try:
            batcher.submit(req)
        except QueueFull as exc:
            raise APIError(429, str(exc), "rate_limit_error", code="queue_full") from None
        return req, events

    def fail(exc) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, FedmoeError):
            return APIError(400, str(exc))
        first = str(exc).splitlines()[0] if str(exc) else ""
        return APIError(500, f"{type(exc).__name__}: {first}", "server_error")

    async def next_event(request: Request, req: DecodeRequest, events: asyncio.Queue):
        """The next event; a client that hung up while we wait is dropped from the batch."""
        while True:
            try:
                return await asyncio.wait_for(events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    req.cancelled.set()
                    raise asyncio.CancelledError

    def fedmoe_field(expert: str, weight: float, gate: str | None, rnd: int | None) -> dict:
        return {"experts": [expert], "weights": [round(weight, 6)], "gate": gate, "rounds": [rnd]}

    async def serve(request: Request, body, prompts: list[str], chat: bool):
        expert, gate = resolve_model(body.model)
        if body.stream and len(prompts) != 1:
            raise APIError(400, "stream: only one prompt per streamed request", param="prompt")
        max_tokens = getattr(body, "max_completion_tokens", None) or body.max_tokens
        param = "messages" if chat else "prompt"
        started = []
        try:
            for p in prompts:
                ids = tokenize(p, param)
                started.append((ids,) + start(p, ids, expert, gate, decode_params(body, max_tokens, ids)))
            kind = "chatcmpl" if chat else "cmpl"
            rid = f"{kind}-{uuid.uuid4().hex[:24]}"
            now = int(time.time())
            routed = []
            for _, req, events in started:
                ev = await next_event(request, req, events)
                if ev[0] == "error":
                    raise fail(ev[1])
                routed.append(ev)
        except BaseException:
            for _, req, _ in started:
                req.cancelled.set()
            raise
        headers = {"x-fedmoe-experts": ",".join(ev[1] for ev in routed),
                   "x-fedmoe-rounds": ",".join("-" if ev[3] is None else str(ev[3]) for ev in routed)}
        if body.stream:
            ids, req, events = started[0]
            extra = fedmoe_field(routed[0][1], routed[0][2], gate, routed[0][3])
            usage_wanted = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(stream(request, req, events, rid, now, body.model, chat, len(ids), extra, usage_wanted),
                                     media_type="text/event-stream", headers=headers | {"cache-control": "no-cache"})
        choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        try:
            for i, ((ids, req, events), ev) in enumerate(zip(started, routed)):
                text = []
                while True:
                    ev = await next_event(request, req, events)
                    if ev[0] == "text":
                        text.append(ev[1])
                    elif ev[0] == "done":
                        break
                    else:
                        raise fail(ev[1])
                reason, n = ev[1], ev[2]
                usage["prompt_tokens"] += len(ids)
                usage["completion_tokens"] += n
                if chat:
                    choices.append({"index": i, "message": {"role": "assistant", "content": "".join(text)},
                                    "logprobs": None, "finish_reason": reason})
                else:
                    choices.append({"index": i, "text": "".join(text), "logprobs": None, "finish_reason": reason})
        except BaseException:
            for _, req, _ in started:
                req.cancelled.set()
            raise
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        experts = [ev[1] for ev in routed]
        weights = [round(ev[2], 6) for ev in routed]
        out = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": now,
               "model": body.model, "choices": choices, "usage": usage,
               "fedmoe": {"experts": experts, "weights": weights, "gate": gate, "rounds": [ev[3] for ev in routed]}}
        return JSONResponse(out, headers=headers)

    async def stream(request, req, events, rid, now, model, chat, n_prompt, extra, usage_wanted):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            body = {"id": rid, "object": obj, "created": now, "model": model, "choices": [choice], "fedmoe": extra}
            return f"data: {json.dumps(body)}\n\n"

        try:
            if chat:
                yield chunk(None, None, first=True)
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    yield chunk(ev[1], None)
                elif ev[0] == "done":
                    yield chunk(None, ev[1])
                    if usage_wanted:
                        usage = {"prompt_tokens": n_prompt, "completion_tokens": ev[2], "total_tokens": n_prompt + ev[2]}
                        yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': now, 'model': model, 'choices': [], 'usage': usage})}\n\n"
                    break
                else:  # headers are gone: the error travels as an event, as OpenAI's does
                    yield f"data: {json.dumps(fail(ev[1]).body())}\n\n"
                    break
            yield "data: [DONE]\n\n"
        finally:  # a client that disconnected mid-stream lands here too: stop decoding for it
            req.cancelled.set()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise APIError(400, "prompt: at least one prompt", param="prompt")
        return await serve(request, body, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if not getattr(served.tokenizer, "chat_template", None):
            raise APIError(400, f"model {base_name!r} has no chat template (its tokenizer_config.json sets none); "
                           "use /v1/completions with a plain prompt", param="messages", code="no_chat_template")
        messages = []
        for m in body.messages:
            content = m.content
            if isinstance(content, list):  # OpenAI content parts: text only
                if any(part.get("type") != "text" for part in content):
                    raise APIError(400, "messages: only text content parts are supported", param="messages")
                content = "".join(part.get("text", "") for part in content)
            messages.append({"role": m.role, "content": content or ""})
        try:
            prompt = served.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template that rejects these roles, for one
            raise APIError(400, f"messages: the chat template refused them: {str(exc).splitlines()[0]}",
                           param="messages") from None
        return await serve(request, body, [prompt], chat=True)

    return app


# -- the server ----------------------------------------------------------------------------------

class OpenAIServer:
    """The HTTP API running on a uvicorn thread: `port`, `url`, `api_keys`, `stop()`."""

    def __init__(self, served, default_gate: str, host: str = "127.0.0.1", port: int = 0,
                 api_keys: list[str] | None = None, max_batch: int = 16, max_queue: int = 64,
                 max_wait_s: float = 0.005, tls: tuple[str, str] | None = None):
        """`tls` = (certificate chain, private key), PEM files: serve HTTPS (as `fedmoe
        serve --tls-cert/--tls-key` does for gRPC, needed off loopback)."""
        from fedmoe.server.ops.access import TLSFiles
        from fedmoe.server.ops.asgi_server import AsgiServer

        if default_gate not in served.gates:
            raise FedmoeError(f"unknown gate {default_gate!r}: available gates are {', '.join(served.gates)}")
        if not api_keys:
            raise FedmoeError("the HTTP API needs at least one API key")
        self.served, self.default_gate, self.api_keys = served, default_gate, list(api_keys)
        self.batcher = ContinuousBatcher(served, max_batch=max_batch, max_queue=max_queue, max_wait_s=max_wait_s)
        app = build_app(served, default_gate, self.batcher, self.api_keys)
        try:
            # idle connections closed after 5 s; at most max_queue + max_batch + 16 open (503 beyond)
            self.server = AsgiServer(app, host, port, tls=TLSFiles(*tls) if tls else None, idle_timeout=5,
                                     max_connections=max_queue + max_batch + 16, name="fedmoe-http", what="the HTTP API")
        except BaseException:
            self.batcher.stop()
            raise
        self.host, self.port, self.scheme = host, self.server.port, self.server.scheme

    @property
    def url(self) -> str:
        return self.server.url + "v1"

    def stop(self) -> None:
        self.server.stop()
        self.batcher.stop()
