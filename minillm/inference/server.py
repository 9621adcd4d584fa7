"""An OpenAI-compatible HTTP server for one model: FastAPI app factory + uvicorn runner.

    minillm serve --model runs/sft_mini_llama3_20250101-120000/final --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
        -d '{"model": "sft_mini_llama3_20250101-120000", "messages": [{"role": "user", "content": "Hi"}]}'

Endpoints: `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/chat/completions`,
`POST /v1/completions` (both with `stream: true` as server-sent events in OpenAI's chunk format, ending with
`data: [DONE]`).

Notable choices:
- One model, one request at a time: a lock sits in front of the model and each request decodes on a worker thread,
  so concurrent requests never share a cache or a sampler (each has its own seeded generator, so a reply depends
  only on its own request). `--max-concurrency` bounds how many requests may be admitted (decoding or waiting);
  beyond that the server answers 429 at once instead of queueing without bound.
- A client that goes away stops its generation at the next token: the streaming response is cancelled by the
  ASGI server, and non-streaming requests poll for the disconnect while they wait.
- Request bodies are parsed by hand (size-capped, then JSON, then a strict pydantic model) so every problem comes
  back in OpenAI's error shape `{"error": {"message", "type", "param", "code"}}` with OpenAI's status codes
  (400 bad request, 401 auth, 404 unknown model/route, 413 body too large, 429 busy), never FastAPI's 422.
- With `--api-key`, every request (health included) needs `Authorization: Bearer KEY`, compared in constant time.
- OpenAI fields it does not implement (tools, logprobs, echo, JSON mode, presence/frequency penalties) are refused
  with a 400 when they ask for something; a chat message that spells a control token is refused too
  (`minillm.inference.prompt`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from minillm.errors import UserError
from minillm.inference.engine import FINISH_CANCELLED, BaseEngine, Completion
from minillm.inference.prompt import InvalidText, chat_prompt_ids, text_prompt_ids
from minillm.inference.sampling import MAX_SEED, MIN_REPETITION_PENALTY, SamplingParams

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt a small model's context window can hold
ROLES = ("system", "developer", "user", "assistant")
DISCONNECT_POLL_S = 0.25
logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        """The JSON response: OpenAI's `{"error": {"message", "type", "param", "code"}}` with this status (a 429
        says when to retry, as HTTP asks; clients such as openai's honour `Retry-After`)."""
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"Retry-After": "1"} if self.status == 429 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


# -- request schemas (strict: "0.5" is not a number, 1 is not a bool) ----------------------------------------------
class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        """The message's text: a string content as is, text parts joined, no content as ""."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class _SamplingFields(BaseModel):
    # NaN and Infinity are not JSON, though Python's parser reads them: refused as numbers, not range-checked
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)  # extension (vLLM-style)
    repetition_penalty: float | None = Field(default=None, ge=MIN_REPETITION_PENALTY)  # extension
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)  # any int64, as OpenAI's; wrapped for the sampler
    stream: bool | None = False  # OpenAI's API marks these two nullable: null = the default
    stream_options: dict[str, Any] | None = None
    n: int | None = 1
    user: str | None = None


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]


def _validation_error(err: ValidationError) -> APIError:
    first = err.errors()[0]
    # pydantic adds the tried union member to the location ("messages.0.content.str"); users want the field
    loc = [str(p) for p in first["loc"] if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in str(p))]
    param = ".".join(loc) or None
    return APIError(400, f"invalid request: {param}: {first['msg']}" if param else first["msg"], param=param)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}

# OpenAI fields this server does not implement, each with its values that ask for nothing (what clients send by
# default). Any other value is refused with a 400 instead of answered as if it had not been asked: a client that
# wants log-probabilities, an echoed prompt or a tool call must not get a plain completion that looks like one.
_UNSUPPORTED_FIELDS: dict[str, tuple] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # "auto" with no tools asks for nothing; tools themselves are refused
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "response_format": (None, {"type": "text"}),
    "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "audio": (None,),
    "prediction": (None,),
}


def _same(value: Any, unused: Any) -> bool:
    """JSON equality that tells `false` from `0` (and `null` from both) but not `0` from `0.0`."""
    if unused is None or isinstance(unused, bool) or isinstance(value, bool):
        return value is unused
    return value == unused


def _refuse_unsupported(body: dict) -> None:
    """400 for the first field of `body` that asks for something this server does not do."""
    for name, unused in _UNSUPPORTED_FIELDS.items():
        value = body.get(name)
        if not any(_same(value, u) for u in unused):
            hint = " (repetition_penalty is)" if name.endswith("_penalty") else ""
            raise APIError(400, f"{name} is not supported by this server{hint}", param=name)


class _Slot:
    """One admitted request; `release()` may be called more than once (only the first counts)."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.released = False

    def release(self) -> None:
        """Give the admission slot back (the stream's end and the response's background task both call it)."""
        if not self.released:
            self.released = True
            self.server.in_flight -= 1


# -- the app -------------------------------------------------------------------------------------------------------
class _Server:
    """State shared by the routes: the engine, the model lock, admission control."""

    def __init__(
        self,
        engine: BaseEngine,
        model_name: str,
        api_key: str | None,
        max_concurrency: int,
        max_body_bytes: int,
    ) -> None:
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}")
        check_api_key(api_key)
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.api_key = api_key
        self.max_concurrency = max_concurrency
        self.max_body_bytes = max_body_bytes
        self.context_length = engine.context_length
        self.created = int(time.time())
        self.model_lock = threading.Lock()
        self.executor = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="minillm-decode")
        self.in_flight = 0  # only touched on the event loop thread

    # -- request parsing ---------------------------------------------------------------------------------------
    async def read_json(self, request: Request) -> dict:
        """The request body as a JSON object, read by hand so a size limit applies before parsing (413) and a bad
        body gets OpenAI's 400 error instead of FastAPI's 422."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise APIError(
                413, f"request body of {declared} bytes exceeds the limit of {self.max_body_bytes} bytes"
            )
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError as err:  # not JSON, not UTF-8, or an integer of more than 4,300 digits
            raise APIError(400, f"invalid JSON body: {err}") from None
        except RecursionError:  # arrays nested deeper than Python's parser recurses
            raise APIError(400, "invalid JSON body: nested too deeply") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    def check_model(self, name: str | None) -> None:
        """404 `model_not_found` unless `name` is this server's model (None, as many clients send, is accepted)."""
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model '{name}' does not exist; this server has '{self.model_name}'",
                param="model",
                code="model_not_found",
            )

    def sampling(
        self,
        req: _SamplingFields,
        prompt_tokens: int,
        max_tokens: int | None,
        prompt_param: str,
        max_tokens_param: str = "max_tokens",
    ) -> SamplingParams:
        """Validate the request's sampling fields against the context window and turn them into `SamplingParams`.

        Without `max_tokens` the completion may fill the rest of the context window; `prompt_param` and
        `max_tokens_param` name the fields that held the prompt and the length in errors ("messages" or "prompt";
        "max_tokens" or chat's "max_completion_tokens").
        """
        name = max_tokens_param
        if req.n not in (None, 1):
            raise APIError(
                400, f"n={req.n} is not supported: this server returns one choice (n=1)", param="n"
            )
        ctx = self.context_length
        if ctx is not None and prompt_tokens >= ctx:
            raise APIError(
                400,
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{prompt_tokens} tokens",
                param=prompt_param,
                code="context_length_exceeded",
            )
        if max_tokens is not None:
            if max_tokens <= 0:
                raise APIError(400, f"{name} must be at least 1, got {max_tokens}", param=name)
            if ctx is not None and max_tokens > ctx:
                raise APIError(
                    400, f"{name}={max_tokens} is above this model's context length of {ctx} tokens", param=name
                )
            if ctx is not None and prompt_tokens + max_tokens > ctx:
                raise APIError(
                    400,
                    f"This model's maximum context length is {ctx} tokens, but you requested "
                    f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
                    f"for the completion); reduce the prompt or {name}",
                    param=name,
                    code="context_length_exceeded",
                )
        else:
            max_tokens = (ctx - prompt_tokens) if ctx is not None else 512
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise APIError(400, f"stop: at most 4 stop sequences, got {len(stop)}", param="stop")
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=req.top_k or 0,
            repetition_penalty=req.repetition_penalty or 1.0,
            seed=None if req.seed is None else req.seed % (MAX_SEED + 1),  # negative seeds too, as OpenAI's
            stop=stop,
        )

    def completion_prompt(self, text: str) -> list[int]:
        """The prompt tokens of a completion request: its text as written (control tokens included)."""
        try:
            return text_prompt_ids(self.tokenizer, text)
        except InvalidText as err:
            raise APIError(400, f"prompt: {err.problem}", param="prompt") from None

    def chat_prompt(self, req: ChatRequest) -> list[int]:
        """The prompt tokens of a chat request: its messages through the model's chat template, ending with the
        assistant turn's opening (`developer` is OpenAI's newer name for `system`)."""
        if not req.messages:
            raise APIError(400, "messages must be a non-empty list", param="messages")
        messages = []
        for i, m in enumerate(req.messages):
            if m.role not in ROLES:
                raise APIError(
                    400,
                    f"messages.{i}.role: unknown role '{m.role}' (expected one of {', '.join(ROLES)})",
                    param=f"messages.{i}.role",
                )
            role = "system" if m.role == "developer" else m.role
            messages.append({"role": role, "content": m.text()})
        try:
            return chat_prompt_ids(self.tokenizer, messages)
        except InvalidText as err:
            param = f"messages.{err.index}.content"
            raise APIError(400, f"{param}: {err.problem}", param=param) from None

    # -- decoding ----------------------------------------------------------------------------------------------
    def admit(self) -> _Slot:
        """Take one of the `max_concurrency` slots, or answer 429 at once rather than queue without bound."""
        if self.in_flight >= self.max_concurrency:
            raise APIError(
                429,
                f"the server is busy ({self.max_concurrency} requests in flight); retry later",
                type_="server_busy",
                code="server_busy",
            )
        self.in_flight += 1
        return _Slot(self)

    async def events(
        self,
        prompt: list[int],
        params: SamplingParams,
        request: Request,
        slot: _Slot,
        watch_disconnect: bool = False,
    ) -> AsyncIterator[Any]:
        """Decode on a worker thread, yielding each step's events; stops the decode when the client leaves.

        `slot` (from `admit()`) is released when this generator finishes.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        end = object()

        def push(item) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down)
                cancel.set()

        def work() -> None:
            try:
                with self.model_lock:
                    if cancel.is_set():
                        return
                    for events in self.engine.stream([prompt], params, cancel):
                        push(events)
            except Exception as err:  # handed to the request's coroutine
                push(err)
            finally:
                push(end)

        future = loop.run_in_executor(self.executor, work)
        # a streaming response is cancelled by the ASGI server when its client leaves; a plain response is not,
        # so listen for the disconnect ourselves (also while the request waits for the model)
        gone = asyncio.Event()

        async def listen() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass
            gone.set()

        listener = asyncio.create_task(listen()) if watch_disconnect else None
        try:
            while not gone.is_set():
                try:
                    item = await asyncio.wait_for(q.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    continue
                if item is end:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            cancel.set()  # a no-op when the decode already ended
            slot.release()
            if listener is not None:
                listener.cancel()
            del future  # the worker ends on its own at the next token

    async def complete(
        self, prompt: list[int], params: SamplingParams, request: Request, slot: _Slot
    ) -> Completion:
        """Decode a whole (non-streaming) answer, stopping early if the client disconnects."""
        out = Completion(prompt_tokens=len(prompt))
        async for events in self.events(prompt, params, request, slot, watch_disconnect=True):
            for ev in events:
                if ev.token_id is not None:
                    out.token_ids.append(ev.token_id)
                out.text += ev.text
                out.finish_reason = ev.finish_reason or out.finish_reason
        return out


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _include_usage(req: _SamplingFields) -> bool:
    """OpenAI's `stream_options: {"include_usage": true}`: a last chunk with the token counts."""
    return bool((req.stream_options or {}).get("include_usage"))


def _event_stream(
    events: AsyncIterator[Any],
    envelope: Callable[[list[dict]], dict],
    choices: Callable[[Any], list[dict]],
    slot: _Slot,
    first: dict | None = None,
    usage_prompt_tokens: int | None = None,
) -> StreamingResponse:
    """The SSE response of a streaming request (chat or completion, told apart by `envelope` and `choices`).

    `envelope(choices)` wraps a list of choices in the endpoint's chunk object; `choices(event)` gives the choices
    one decoding event produces (possibly none); `first`, if given, is sent before decoding starts (chat's role
    delta); with `usage_prompt_tokens` a last chunk carries the usage (and, as in OpenAI's stream, every other
    chunk says `"usage": null`). The stream always ends with
    `data: [DONE]`, except when the client has left. An error after the 200 status is already sent is reported as
    an OpenAI error event (`{"error": {...}}`, what the openai client raises on) instead of a truncated stream.
    """

    def chunk(chs: list[dict]) -> dict:
        return envelope(chs) if usage_prompt_tokens is None else {**envelope(chs), "usage": None}

    async def body() -> AsyncIterator[str]:
        produced = 0
        try:
            if first is not None:
                yield _sse(chunk([first]))
            async for step in events:
                for ev in step:
                    if ev.finish_reason == FINISH_CANCELLED:
                        return  # the client is gone: nobody reads the rest
                    produced += ev.token_id is not None
                    for choice in choices(ev):
                        yield _sse(chunk([choice]))
            if usage_prompt_tokens is not None:
                yield _sse({**envelope([]), "usage": _usage(usage_prompt_tokens, produced)})
        except Exception as err:  # noqa: BLE001  (reported to the client and logged, not raised into uvicorn)
            logger.error("streaming request failed: %s: %s", type(err).__name__, err)
            message = f"internal error: {type(err).__name__}: {err}"
            yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": None}})
        yield "data: [DONE]\n\n"

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache"},
        background=BackgroundTask(slot.release),  # releases the slot even if the stream never started
    )


def create_app(
    engine: BaseEngine,
    model_name: str,
    api_key: str | None = None,
    max_concurrency: int = 32,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """Build the FastAPI app serving `engine` under `model_name`."""
    state = _Server(engine, model_name, api_key, max_concurrency, max_body_bytes)
    app = FastAPI(title="minillm", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.minillm = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return APIError(
            err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code
        ).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        return APIError(500, f"internal error: {type(err).__name__}: {err}", type_="server_error").response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key is not None:
            header = request.headers.get("authorization", "")
            scheme, _, token = header.partition(" ")
            # compare_digest takes time independent of where the strings differ
            ok = scheme.lower() == "bearer" and hmac.compare_digest(
                token.strip().encode(), state.api_key.encode()
            )
            if not ok:
                return APIError(
                    401,
                    "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                ).response()
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": state.model_name, "in_flight": state.in_flight}

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "minillm"}

    @app.get("/v1/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")  # a checkpoint's name holds a slash: run/step_00000200
    async def get_model(model_id: str) -> dict:
        state.check_model(model_id)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await state.read_json(request)
        if "messages" not in body:
            raise APIError(400, "missing required field: messages", param="messages")
        _refuse_unsupported(body)
        try:
            req = ChatRequest.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        state.check_model(req.model)
        prompt = state.chat_prompt(req)
        if req.max_completion_tokens is not None:  # OpenAI's newer name; it wins over max_tokens
            params = state.sampling(req, len(prompt), req.max_completion_tokens, "messages", "max_completion_tokens")
        else:
            params = state.sampling(req, len(prompt), req.max_tokens, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        slot = state.admit()
        if not req.stream:
            c = await state.complete(prompt, params, request, slot)
            return {
                "id": rid,
                "object": "chat.completion",
                "created": created,
                "model": state.model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": c.text},
                        "logprobs": None,
                        "finish_reason": c.finish_reason,
                    }
                ],
                "usage": _usage(c.prompt_tokens, c.completion_tokens),
            }

        def delta(content: dict, finish: str | None) -> dict:
            return {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish}

        def choices(ev) -> list[dict]:
            text = [delta({"content": ev.text}, None)] if ev.text else []
            return text + ([delta({}, ev.finish_reason)] if ev.finish_reason is not None else [])

        return _event_stream(
            state.events(prompt, params, request, slot),
            lambda chs: {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": state.model_name,
                "choices": chs,
            },
            choices,
            slot,
            first=delta({"role": "assistant", "content": ""}, None),
            usage_prompt_tokens=len(prompt) if _include_usage(req) else None,
        )

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await state.read_json(request)
        if "prompt" not in body:
            raise APIError(400, "missing required field: prompt", param="prompt")
        _refuse_unsupported(body)
        try:
            req = CompletionRequest.model_validate(body)
        except ValidationError as err:
            raise _validation_error(err) from None
        state.check_model(req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if len(texts) != 1:
            raise APIError(
                400, f"prompt: one prompt per request is supported, got {len(texts)}", param="prompt"
            )
        prompt = state.completion_prompt(texts[0])
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        max_tokens = req.max_tokens if req.max_tokens is not None else 16  # OpenAI's default
        params = state.sampling(req, len(prompt), max_tokens, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        slot = state.admit()
        if not req.stream:
            c = await state.complete(prompt, params, request, slot)
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": [{"index": 0, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}],
                "usage": _usage(c.prompt_tokens, c.completion_tokens),
            }

        def choices(ev) -> list[dict]:
            if not ev.text and ev.finish_reason is None:
                return []
            return [{"index": 0, "text": ev.text, "logprobs": None, "finish_reason": ev.finish_reason}]

        return _event_stream(
            state.events(prompt, params, request, slot),
            lambda chs: {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": state.model_name,
                "choices": chs,
            },
            choices,
            slot,
            usage_prompt_tokens=len(prompt) if _include_usage(req) else None,
        )

    return app


def serve(
    model: str | None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_concurrency: int = 32,
    device: str = "auto",
    engine_kind: str = "minillm",
) -> None:
    """Load the model and run the server until interrupted (what `minillm serve` does)."""
    import uvicorn
    from rich.console import Console

    from minillm.inference.engine import make_engine
    from minillm.inference.loading import load_model_and_tokenizer, model_display_name

    console = Console(stderr=True)
    check_api_key(api_key)
    sock = listening_socket(host, port)  # before the model loads: a busy port fails at once, in one line
    loaded, tokenizer, model_dir = load_model_and_tokenizer(model, device)
    name = model_display_name(model_dir)
    app = create_app(
        make_engine(engine_kind, loaded, tokenizer), name, api_key=api_key, max_concurrency=max_concurrency
    )
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        console.print(
            f"[yellow]warning:[/] serving on {host} without --api-key: anyone who can reach it can use it"
        )
    console.print(f"serving [bold]{name}[/] ({model_dir}) on http://{host}:{port}/v1")
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run(sockets=[sock])


def check_api_key(api_key: str | None) -> None:
    """`UserError` for a key no client can send: HTTP header values are ASCII (httpx and openai refuse others)."""
    if api_key is not None and (not api_key.isascii() or not api_key.isprintable() or not api_key.strip()):
        raise UserError("--api-key: use printable ASCII characters (an HTTP header carries the key)")


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port) for uvicorn to serve on; `UserError` for a host that does not resolve or an
    address that cannot be bound (in use, not this machine's). Bound here rather than by uvicorn, whose own
    failure is several log lines and exit code 3."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as err:
        raise UserError(f"--host {host}: cannot resolve it ({err.strerror})") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restarts reuse the port at once
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror})") from None
    return sock
