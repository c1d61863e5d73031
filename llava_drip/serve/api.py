"""`llava-drip serve-api`: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one ChatEngine.

POST /v1/chat/completions (non-streaming, or SSE with `stream: true`) and GET /v1/models. Images come
as `image_url` content parts holding data URLs (`data:image/png;base64,...`); the server fetches
nothing from the network, so http(s) URLs are refused. One image per conversation, placed in the
first user turn as LLaVA was trained. Responses carry OpenAI's `usage` (prompt tokens include the
visual ones) plus `visual_tokens: {in, out, budget}`: patch tokens, the tokens DRIP kept and the budget
they were kept at. A request picks the budget with the extra field `drip_budget` ("0.25", 16,
"mean:0.25"; `extra_body` in OpenAI's clients); --budget sets the server's default.

With an API key configured (the env var named by --api-key-env) every request needs
`Authorization: Bearer <key>`; the key is never printed or logged.

Without --model-path it serves the built-in tiny model (llava_drip/serve/builtin.py) as `llava-drip-tiny`;
another folder is served under its own name unless --model-name says otherwise.

Limits, so that one expensive request cannot stall or exhaust the server:
- request body: at most --max-body-mb (default 20) MB, checked from Content-Length before reading and
  counted while reading a chunked body; over it: 413;
- admission: at most --max-concurrent (default 64) chat requests inside the server at once, from
  reading the body to the last token; one more is answered 503 with Retry-After at once rather than
  queued. The engine decodes up to --max-batch-size (default 32) of them together, one batch with a
  shared KV cache; the others wait in its line, at most --max-queue (a full line: 503 too);
- images: decoded by llava_drip.image_io (pixel limit from the header, LLAVA_DRIP_MAX_IMAGE_PIXELS,
  default 64 Mpx), at most two at a time; over the limit: 400 naming the field;
- prompts: a message the context cannot hold is refused from its length in characters (400 naming
  messages[i].content) before it is tokenised;
- a client that goes away (closes the connection, streaming or not) stops its generation at the next
  token, and the model is free for the next request.
"""
import argparse
import asyncio
import base64
import binascii
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from typing import Callable, Iterator, Optional, Tuple

from PIL import Image

from llava_drip.image_io import ImageError, open_image

# the engine and the budgets load torch: imported where used (quoted in annotations; not `from __future__
# import annotations`, which would hide the routes' types from FastAPI), so `--help` answers without torch
from .builtin import (BUILTIN_MODEL_ID, DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE, add_dtype_arg, is_builtin,
                      model_path_help, resolve_model_path)
from .cli import BUDGET_HELP

_logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BODY_MB = 20.0  # a base64 data URL of a large phone photo fits
DEFAULT_MAX_CONCURRENT = 64
RETRY_AFTER_S = 1
# decoding one image at the pixel limit takes a few hundred MB for a few seconds: two at a time at
# most, per process (memory is the process's, whichever app decodes)
_DECODE_SLOTS = threading.BoundedSemaphore(2)


class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 type_: str = "invalid_request_error", code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type_, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- request parsing ---------------------------------------------------------------------------------
def decode_data_url(url: str, param: str) -> Image.Image:
    """`data:image/<fmt>;base64,<payload>` -> PIL image; APIError(400) naming `param` otherwise."""
    if not isinstance(url, str):
        raise APIError(400, f"{param} must be a string", param)
    if url.startswith(("http://", "https://")):
        raise APIError(400, f"{param}: this server does not fetch URLs; send the image as a data URL "
                            "(data:image/png;base64,...)", param)
    head, sep, payload = url.partition(",")
    if not (sep and head.startswith("data:image/") and head.endswith(";base64")):
        raise APIError(400, f"{param} must be a base64 data URL (data:image/<format>;base64,...), "
                            f"got {url[:40]!r}", param)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"{param}: invalid base64 ({e})", param) from e
    try:
        with _DECODE_SLOTS:  # the pixel limit is checked from the header, before this decodes anything
            return open_image(raw, name=param)
    except ImageError as e:  # its message names `param` and the problem in one line
        raise APIError(400, str(e), param, code="image_too_large" if e.kind == "too_large" else "invalid_image") from e


def parse_messages(raw, check: Optional[Callable[[list], object]] = None) -> Tuple[list, Optional[Image.Image]]:
    """OpenAI messages -> (engine messages with string content, the image or None).

    `check(messages)`, if given, runs before the image is decoded (a cheap refusal first), and its
    ValueError becomes a 400 naming its `param` (default: messages)."""
    if not isinstance(raw, list) or not raw:
        raise APIError(400, "messages must be a non-empty array", "messages")
    messages, image_url = [], None
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"{where}.role {m.get('role')!r} is not supported "
                                "(system, developer, user, assistant)", f"{where}.role")
        content = m.get("content")
        if isinstance(content, str):
            messages.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise APIError(400, f"{where}.content must be a string or an array of content parts",
                           f"{where}.content")
        texts = []
        for j, part in enumerate(content):
            pwhere = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url":
                if role != "user":
                    raise APIError(400, f"{pwhere}: images are accepted in user messages only", pwhere)
                if image_url is not None:
                    raise APIError(400, f"{pwhere}: this model takes one image per conversation", pwhere)
                spec = part.get("image_url")
                image_url = (spec.get("url") if isinstance(spec, dict) else spec, f"{pwhere}.image_url.url")
            else:
                raise APIError(400, f"{pwhere}: unsupported content part {kind!r} (text, image_url)", pwhere)
        messages.append({"role": role, "content": "\n".join(texts)})
    if check is not None:
        try:
            check(messages)
        except ValueError as e:
            raise APIError(400, str(e), getattr(e, "param", None) or "messages") from e
    return messages, (decode_data_url(*image_url) if image_url is not None else None)


def _number(body: dict, name: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise APIError(400, f"{name} must be {kind} in [{lo}, {hi}], got {value!r}", name)
    return value


def parse_budget_field(value) -> Optional["Budget"]:
    """The request's `drip_budget`: a spec string ("0.25", "16", "mean:0.25") or a JSON number (an
    integer is a count, a fraction a ratio); null or absent: the server's default."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise APIError(400, f"drip_budget must be a string or a number (0.25, 16, \"mean:0.25\"), got {value!r}",
                       "drip_budget")
    from llava_drip.drip.budget import parse_budget
    try:
        return parse_budget(value)
    except ValueError as e:
        raise APIError(400, f"drip_budget: {e}", "drip_budget") from e


def parse_request(body, check_messages: Optional[Callable[[list], object]] = None) -> dict:
    """Validate a chat.completions body; returns the engine arguments plus `stream` options.

    check_messages: see parse_messages (the server passes the engine's prompt-length check)."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, allowed in (("n", (None, 1)), ("stop", (None, [], "")), ("tools", (None, []))):
        if body.get(name) not in allowed:
            raise APIError(400, f"{name} is not supported by this server", name)
    messages, image = parse_messages(body.get("messages"), check_messages)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    max_tokens = _number({param: max_tokens}, param, DEFAULT_MAX_TOKENS, 1, 1 << 20, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    options = body.get("stream_options") or {}
    return dict(messages=messages, image=image, max_new_tokens=max_tokens,
                temperature=float(_number(body, "temperature", 0.2, 0.0, 2.0)),
                top_p=float(_number(body, "top_p", 0.7, 1e-6, 1.0)), stream=stream,
                seed=_number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True),
                budget=parse_budget_field(body.get("drip_budget")),
                include_usage=bool(isinstance(options, dict) and options.get("include_usage")))


# ---- responses ---------------------------------------------------------------------------------------
def usage_fields(stats: "ChatStats") -> dict:
    return {"usage": {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                      "total_tokens": stats.prompt_tokens + stats.generated_tokens},
            "visual_tokens": {"in": stats.visual_tokens_in, "out": stats.visual_tokens_out, "budget": stats.budget}}


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def stream_events(stream, model_id: str, include_usage: bool) -> Iterator[str]:
    """SSE lines for one ChatStream: role chunk, content chunks, finish chunk, [usage chunk], [DONE]."""
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model_id}

    def chunk(delta: dict, finish: Optional[str] = None) -> dict:
        return {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        for piece in stream:
            yield _sse(chunk({"content": piece}))
        extra = usage_fields(stream.stats)
        yield _sse({**chunk({}, stream.stats.finish_reason), "visual_tokens": extra["visual_tokens"]})
        if include_usage:
            yield _sse({**head, "choices": [], **extra})
    except Exception as e:  # headers are sent already: report in-band, as OpenAI does
        _logger.exception("generation failed")
        yield _sse(APIError(500, f"generation failed: {e}", type_="server_error").body())
    finally:
        stream.close()
    yield "data: [DONE]\n\n"


class Admission:
    """At most `limit` chat requests inside the server at once; `try_enter` never waits."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"max_concurrent must be >= 1, got {limit}")
        self.limit = limit
        self._lock = threading.Lock()
        self.active = 0

    def try_enter(self) -> bool:
        with self._lock:
            if self.active >= self.limit:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.active -= 1


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is over the limit of {limit / 1e6:g} MB (--max-body-mb); send a "
                         "smaller image (the model sees a few hundred pixels a side) or a shorter conversation",
                    code="request_too_large")


async def read_body(request, limit: int) -> bytes:
    """The body, refused (413) from Content-Length before reading it, or once a chunked body passes `limit`."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise APIError(400, f"invalid Content-Length {length[:40]!r}")
        if int(length) > limit:
            raise _too_large(limit)
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def _until_disconnect(receive, cancel: threading.Event) -> None:
    """Set `cancel` when the client goes away (after the body, the next ASGI message is the disconnect)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            cancel.set()
            return


def create_app(engine: "ChatEngine", model_id: str, api_key: Optional[str] = None, budget=None,
               max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 1e6), max_concurrent: int = DEFAULT_MAX_CONCURRENT):
    """The FastAPI app. api_key None or empty: no authentication. budget: the DRIP budget of requests
    without `drip_budget` (None: the model's default); ValueError if the model cannot serve it.
    max_body_bytes: larger request bodies get 413. max_concurrent: chat requests handled at once (reading,
    decoding, waiting for the model, generating); one more gets 503 with Retry-After. `app.state` holds
    both (`admission.active`: how many are in)."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    from .engine import EngineBusy

    class EventStream(StreamingResponse):
        """SSE that stops its generation as soon as the client goes away and then runs `done` once."""

        def __init__(self, content, stream, done: Callable[[], None]):
            super().__init__(content, media_type="text/event-stream")
            self._stream, self._done = stream, done

        async def listen_for_disconnect(self, receive) -> None:
            await super().listen_for_disconnect(receive)
            # now, not after: the worker thread is blocked waiting for the next token, and Starlette
            # waits for that thread before it returns
            self._stream.close()

        async def __call__(self, scope, receive, send) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:  # any ending: done, disconnected (either ASGI spec), or failed
                self._stream.close()
                self._done()

    default_budget = engine.resolve_budget(budget)
    admission = Admission(max_concurrent)
    app = FastAPI(title="llava-drip", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.admission, app.state.max_body_bytes = admission, max_body_bytes
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(exc.status_code, str(exc.detail), type_=kind).body(),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(APIError(400, str(exc.errors())[:500]).body(), status_code=400)

    def check_key(request: Request):
        if not api_key:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, given = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer <key>'",
                           type_="invalid_request_error", code="invalid_api_key")

    def parse(raw: bytes) -> dict:  # in a worker thread: JSON of megabytes and image decoding take a while
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from e
        if isinstance(body, dict) and body.get("model") not in (None, model_id):
            raise APIError(404, f"model {body['model']!r} does not exist; this server serves {model_id!r}",
                           "model", code="model_not_found")
        return parse_request(body, check_messages=engine.check_prompt_length)

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def list_models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "llava-drip"}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(request: Request):
        if not admission.try_enter():
            raise APIError(503, f"the server is busy: {admission.limit} requests are in progress "
                                f"(--max-concurrent); retry in {RETRY_AFTER_S} s",
                           type_="server_error", code="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)})
        handed_over = False  # once a stream owns the admission slot, it gives it back
        try:
            try:
                raw = await read_body(request, max_body_bytes)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody to answer
            req = await run_in_threadpool(parse, raw)
            try:  # what the model can serve: a DRIP tower, at most N tokens, calibrated for a mean
                budget = engine.resolve_budget(req["budget"] if req["budget"] is not None else default_budget)
            except ValueError as e:
                raise APIError(400, f"drip_budget: {e}", "drip_budget") from e
            args = dict(temperature=req["temperature"], top_p=req["top_p"], max_new_tokens=req["max_new_tokens"],
                        budget=budget, seed=req["seed"])
            try:
                if req["stream"]:
                    stream = await run_in_threadpool(engine.stream, req["messages"], req["image"], **args)
                    response = EventStream(stream_events(stream, model_id, req["include_usage"]), stream,
                                           admission.leave)
                    handed_over = True
                    return response
                cancel = threading.Event()
                work = asyncio.ensure_future(run_in_threadpool(engine.chat, req["messages"], req["image"],
                                                               cancel=cancel, **args))
                watch = asyncio.ensure_future(_until_disconnect(request.receive, cancel))
                try:
                    # a client that leaves sets `cancel`: generation stops at the next token, and the
                    # slot is given back only once the model is free
                    await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                    text, stats = await work
                finally:
                    watch.cancel()
            except EngineBusy as e:  # the engine's line is full
                raise APIError(503, f"the server is busy: {e}", type_="server_error", code="server_busy",
                               headers={"Retry-After": str(RETRY_AFTER_S)}) from e
            except ValueError as e:  # the engine's input checks: roles, order, prompt length
                raise APIError(400, str(e), getattr(e, "param", None) or "messages") from e
        finally:
            if not handed_over:
                admission.leave()
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": stats.finish_reason}],
                **usage_fields(stats)}

    return app


def default_model_id(model_path: str) -> str:
    """The id clients send without --model-name: llava-drip-tiny for the built-in model, else the folder's name."""
    if is_builtin(model_path):
        return BUILTIN_MODEL_ID
    from llava_drip.mm_utils import get_model_name_from_path
    return get_model_name_from_path(model_path)


def _log_to_stderr(level: str) -> None:
    """The project's own log lines (dropped turns, cancelled generations) next to uvicorn's."""
    log = logging.getLogger("llava_drip")
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        log.addHandler(handler)
    log.setLevel(level.upper())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="llava-drip serve-api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help=model_path_help())
    p.add_argument("--model-base", default=None, help="base LLM for LoRA / projector checkpoints")
    p.add_argument("--model-name", default=None, help=f"model id clients send (default: {BUILTIN_MODEL_ID} for "
                   "the built-in model, else the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 exposes it on the network)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at startup)")
    p.add_argument("--api-key-env", default="LLAVA_DRIP_API_KEY",
                   help="env var holding the API key; unset or empty: no authentication")
    p.add_argument("--budget", default=None, help=BUDGET_HELP + "; a request's drip_budget overrides it")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help="largest request body in MB (default %(default)g); larger ones get 413 unread")
    p.add_argument("--max-concurrent", type=int, default=DEFAULT_MAX_CONCURRENT,
                   help="chat requests handled at once, from reading the body to the last token (default "
                        "%(default)s); one more gets 503 with Retry-After instead of waiting in a queue")
    p.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                   help="requests the engine decodes together (default %(default)s; 1: one at a time)")
    p.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                   help="requests that may wait for a place in the batch (default %(default)s); one more "
                        "gets 503 with Retry-After")
    p.add_argument("--device", default="cpu")
    add_dtype_arg(p)
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    args = p.parse_args(argv)
    prog = "llava-drip serve-api"
    if args.max_body_mb <= 0 or min(args.max_concurrent, args.max_batch_size, args.max_queue) < 1:
        print(f"{prog}: --max-body-mb must be > 0 and --max-concurrent, --max-batch-size, --max-queue >= 1",
              file=sys.stderr)
        return 2
    from llava_drip.drip.budget import parse_budget
    try:  # before loading the model: a typo fails in a second
        budget = parse_budget(args.budget)
    except ValueError as e:
        print(f"{prog}: --budget: {e}", file=sys.stderr)
        return 2

    import uvicorn

    from .engine import ChatEngine, budget_text
    model_path = resolve_model_path(args.model_path)
    api_key = os.environ.get(args.api_key_env) or None
    model_id = args.model_name or default_model_id(model_path)
    engine = ChatEngine(model_path, model_base=args.model_base, device=args.device,
                        max_batch_size=args.max_batch_size, max_queue=args.max_queue, dtype=args.dtype)
    _log_to_stderr(args.log_level)
    try:
        app = create_app(engine, model_id, api_key, budget, max_body_bytes=int(args.max_body_mb * 1e6),
                         max_concurrent=args.max_concurrent)
    except ValueError as e:  # a budget this model cannot serve
        print(f"{prog}: --budget: {e}", file=sys.stderr)
        return 2
    auth = f"API key required (from ${args.api_key_env})" if api_key else f"no API key (${args.api_key_env} is unset)"
    shown = engine.budget_label(budget_text(budget))
    print(f"serving {model_id!r} from {model_path}; {auth}; DRIP budget {shown}", flush=True)
    if not api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: {args.host} is reachable from other machines and no API key is set", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
