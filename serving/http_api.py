"""The OpenAI-compatible HTTP API, beside gRPC on the same engine, keys, roles and rate limits.

``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models`` as vLLM, TGI and
llama.cpp's server offer them, so the ``openai`` SDK, LangChain, lm-eval and curl reach Flywheel
without a gRPC stub. A request becomes the gRPC ``CompleteRequest`` and goes through the same
``validate_request``; its group is stored as a gRPC one (``InferenceServer.record_group``), so it
is ranked and trained on alike. Every response carries the group id and each choice's completion
id (extra fields ``group_id``, ``policy_version``, ``choices[i].completion_id``), which is what a
ranking names. More routes (the rankings, the ranking page) are added by the process wiring
(``flywheel.app.serve``) as ``HttpRoute``s, since they belong to feedback.

The server is the standard library's ``ThreadingHTTPServer``: one thread per connection, which
waits on the engine's per-request event queue exactly as a gRPC handler thread does; the engine
keeps its own thread and never waits on HTTP. At most ``http_workers`` requests are handled at
once (503 beyond). No dependency is added for a handful of JSON routes and server-sent events.

Errors have OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 naming the
parameter, 401 for a missing or unknown key, 403 for a client key on ``/v1/admin/``, 404 for an
unknown model or route, 429 with ``Retry-After`` (and ``retry-after-ms``, which the SDK honours)
when the key's rate is exceeded, 503 while the model loads or the queue is full.
"""

from __future__ import annotations

import json
import logging
import math
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator
from urllib.parse import parse_qs, urlsplit

from flywheel.api_keys import ROLE_ADMIN, ROLE_CLIENT, Caller, KeyStore, caller_context
from flywheel.models import EMBEDDED_NAME
from flywheel.v1 import inference_pb2
from serving.auth import LOOPBACK_HOSTS
from serving.engine import DoneEvent, EngineStoppedError, GenerationRequest, QueueFullError, TokenEvent, iter_events
from serving.logprobs import ScoredToken, scored_tokens
from serving.rate_limit import RateLimiter, retry_after_ms
from serving.validation import InvalidRequest, validate_request

if TYPE_CHECKING:
    from serving.server import InferenceServer

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_COMPLETIONS_LOGPROBS = 5  # the legacy completions API's limit on `logprobs`
IDLE_CONNECTION_SECONDS = 120
ADMIN_PREFIX = "/v1/admin/"

# OpenAI's parameter names for the fields validate_request names
PARAM_OF_FIELD = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens"}
# parameters whose meaning this server cannot honour: refused by name rather than silently ignored
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "logit_bias", "suffix",
               "echo", "best_of")
UNSUPPORTED_NONZERO = ("presence_penalty", "frequency_penalty")
# status names of feedback's Rejection (and gRPC's codes, lower case) -> HTTP status and error type
HTTP_STATUS_OF = {
    "invalid_argument": (400, "invalid_request_error"), "not_found": (404, "not_found_error"),
    "permission_denied": (403, "permission_error"), "already_exists": (409, "conflict_error"),
    "unavailable": (503, "service_unavailable_error"), "unauthenticated": (401, "authentication_error"),
    "resource_exhausted": (429, "rate_limit_error"),
}


class HttpError(Exception):
    """A refusal in OpenAI's error shape."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = list(headers)

    @classmethod
    def of_status(cls, status: str, message: str, param: str | None = None, reason: str | None = None) -> "HttpError":
        """From a status name as gRPC names its codes (``invalid_argument``)."""
        http_status, error_type = HTTP_STATUS_OF.get(status, (500, "server_error"))
        return cls(http_status, message, type=error_type, param=param or None, code=reason)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: Any  # email.message.Message: case-insensitive .get
    body: bytes
    caller: Caller | None = None

    def json(self) -> dict:
        try:
            data = json.loads(self.body or b"{}")
        except (ValueError, UnicodeDecodeError) as exc:
            raise HttpError(400, f"the request body is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise HttpError(400, "the request body must be a JSON object")
        return data

    def query_value(self, name: str, default: str = "") -> str:
        values = self.query.get(name)
        return values[0] if values else default


@dataclass
class JsonResponse:
    body: Any
    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class EventStream:
    """Server-sent events: each item is one ``data:`` line (a dict is sent as JSON). ``on_close``
    runs however the stream ends (the client went away: the generation is cancelled)."""

    events: Iterator[Any]
    on_close: Callable[[], None] = lambda: None


@dataclass
class StaticResponse:
    content: bytes
    content_type: str


@dataclass(frozen=True)
class HttpRoute:
    """``handler(request)`` for ``method path``; ``role`` = the least role that may call it (None: open)."""

    method: str
    path: str
    handler: Callable[[HttpRequest], Any]
    role: str | None = ROLE_CLIENT


def static_route(path: str, file, content_type: str = "text/html; charset=utf-8") -> HttpRoute:
    """An open route serving one file of a package (a path or an ``importlib.resources`` file, read once)."""
    content = file.read_bytes()
    return HttpRoute("GET", path, lambda request: StaticResponse(content, content_type), role=None)


# ---- the OpenAI-compatible routes ----


def served_model_id(config) -> str:
    """The name clients pass as ``model``: the model folder's name, or the embedded model's."""
    return Path(config.model.rstrip("/")).name if config.model else EMBEDDED_NAME


def _typed(data: dict, name: str, kinds: tuple[type, ...], what: str):
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise HttpError(400, f"{name}: must be {what}; got {json.dumps(value)[:80]}", param=name)
    return value


def _text_content(content, where: str) -> str:
    """A chat message's content: a string, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise HttpError(400, f"{where}[{i}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                     f"supported", param=f"{where}[{i}]")
            parts.append(part["text"])
        return "".join(parts)
    raise HttpError(400, f"{where}: must be a string or a list of text parts", param=where)


@dataclass(frozen=True)
class OpenAIRequest:
    """An OpenAI request as the engine takes it: the gRPC request plus what only shapes the answer."""

    request: inference_pb2.CompleteRequest
    chat: bool
    stream: bool
    include_usage: bool
    top_logprobs: int


def openai_request(data: dict, chat: bool) -> OpenAIRequest:
    """Map the OpenAI parameters onto a ``CompleteRequest``; raises HttpError naming the parameter."""
    for name in UNSUPPORTED:
        if data.get(name) not in (None, [], {}) and not (name == "best_of" and data.get(name) in (1, data.get("n"))):
            raise HttpError(400, f"{name}: not supported by this server", param=name)
    for name in UNSUPPORTED_NONZERO:
        if _typed(data, name, (int, float), "a number"):
            raise HttpError(400, f"{name}: only 0 is supported by this server", param=name)
    request = inference_pb2.CompleteRequest()
    if chat:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise HttpError(400, "messages: a non-empty list of {role, content} is required", param="messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise HttpError(400, f"messages[{i}]: must be an object with role and content", param=f"messages[{i}]")
            role = message.get("role")
            role = "system" if role == "developer" else role  # OpenAI's newer name for the system role
            request.messages.add(role=role if isinstance(role, str) else "",
                                 content=_text_content(message.get("content") or "", f"messages[{i}].content"))
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise HttpError(400, "prompt: must be one string (lists of prompts and token ids are not supported)",
                            param="prompt")
        request.prompt = prompt
    n = _typed(data, "n", (int,), "an integer")
    max_tokens = _typed(data, "max_completion_tokens" if chat and "max_completion_tokens" in data else "max_tokens",
                        (int,), "an integer")
    min_tokens = _typed(data, "min_tokens", (int,), "an integer")
    temperature = _typed(data, "temperature", (int, float), "a number")
    top_p = _typed(data, "top_p", (int, float), "a number")
    seed = _typed(data, "seed", (int,), "an integer")
    for name, value, bits in (("n", n, 32), ("max_tokens", max_tokens, 32), ("min_tokens", min_tokens, 32),
                              ("seed", seed, 64)):
        if value is not None and not 0 <= value < 2 ** bits:  # the proto's unsigned fields
            raise HttpError(400, f"{name}: must be between 0 and {2 ** bits - 1}; got {value}", param=name)
    for name, value in (("n", n), ("max_new_tokens", max_tokens), ("min_new_tokens", min_tokens),
                        ("temperature", temperature), ("top_p", top_p), ("seed", seed)):
        if value is not None:
            setattr(request, name, value)
    stop = data.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise HttpError(400, "stop: must be a string or a list of strings", param="stop")
    request.stop.extend(stop or [])
    if chat:
        logprobs = bool(_typed(data, "logprobs", (bool,), "true or false"))
        top = _typed(data, "top_logprobs", (int,), "an integer") or 0
        if top and not logprobs:
            raise HttpError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")
    else:
        top = _typed(data, "logprobs", (int,), "an integer (the alternatives per token, 0-5)")
        logprobs = top is not None
        if top is not None and not 0 <= top <= MAX_COMPLETIONS_LOGPROBS:
            raise HttpError(400, f"logprobs: must be between 0 and {MAX_COMPLETIONS_LOGPROBS}; got {top}",
                            param="logprobs")
        top = top or 0
    if top < 0:
        raise HttpError(400, f"top_logprobs: must be between 0 and 20; got {top}", param="top_logprobs")
    request.logprobs = logprobs
    request.top_logprobs = top
    # OpenAI's store (default false there: OpenAI keeps outputs only on request); here a group is kept
    # for ranking unless the request says "store": false (evaluation traffic that must stay unseen)
    store = _typed(data, "store", (bool,), "true or false")
    request.store = True if store is None else store
    stream = bool(_typed(data, "stream", (bool,), "true or false"))
    options = _typed(data, "stream_options", (dict,), "an object") or {}
    return OpenAIRequest(request, chat, stream, bool(options.get("include_usage")), top)


def chat_logprobs(tokens: list[ScoredToken]) -> dict:
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [entry(t.token, t.logprob) | {"top_logprobs": [entry(c.token, c.logprob) for c in t.top]}
                        for t in tokens]}


def completion_logprobs(tokens: list[ScoredToken], offset: int = 0) -> dict:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{c.token: c.logprob for c in t.top} for t in tokens], "text_offset": offsets}


class OpenAIRoutes:
    """The completion and model routes over one ``InferenceServer``."""

    def __init__(self, server: "InferenceServer") -> None:
        self.server = server
        self.model_id = served_model_id(server.config)
        self.created = int(time.time())

    def routes(self) -> list[HttpRoute]:
        return [
            HttpRoute("GET", "/health", self.health, role=None),
            HttpRoute("GET", "/v1/models", self.models),
            HttpRoute("GET", "/v1/models/" + self.model_id, lambda request: JsonResponse(self.model_card())),
            HttpRoute("POST", "/v1/chat/completions", lambda request: self.complete(request, chat=True)),
            HttpRoute("POST", "/v1/completions", lambda request: self.complete(request, chat=False)),
            HttpRoute("GET", ADMIN_PREFIX + "status", self.status, role=ROLE_ADMIN),
        ]

    def health(self, request: HttpRequest) -> JsonResponse:
        ready = self.server.engine is not None
        return JsonResponse({"status": "ok" if ready else "loading"}, 200 if ready else 503)

    def model_card(self) -> dict:
        engine = self.server.engine
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "flywheel",
                "policy_version": engine.policy_version if engine else 0}

    def models(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"object": "list", "data": [self.model_card()]})

    def status(self, request: HttpRequest) -> JsonResponse:
        engine = self._engine()
        return JsonResponse({"policy_version": engine.policy_version, "running_sequences": engine.running_sequences,
                             "queued_requests": engine.queued, "model": self.model_id})

    def _engine(self):
        engine = self.server.engine
        if engine is None:
            raise HttpError(503, "the model is still loading; retry shortly", type="service_unavailable_error",
                            headers=[("Retry-After", "5")])
        return engine

    def complete(self, request: HttpRequest, chat: bool):
        data = request.json()
        model = data.get("model")
        if model not in (None, "", self.model_id, self.server.config.model):
            raise HttpError(404, f"the model {json.dumps(model)} does not exist; this server serves {self.model_id!r}",
                            param="model", code="model_not_found")
        asked = openai_request(data, chat)
        engine = self._engine()
        try:
            valid = validate_request(asked.request, engine.tokenizer, self.server.limits)
        except InvalidRequest as exc:
            name = PARAM_OF_FIELD.get(exc.field, exc.field)
            if exc.field == "prompt" and chat:
                name = "messages"
            raise HttpError(400, f"{name}: {str(exc).split(': ', 1)[1]}", param=name) from None
        generation = GenerationRequest(valid.prompt, valid.prompt_token_ids, valid.params, stream=asked.stream,
                                       top_logprobs=valid.top_logprobs)
        try:
            engine.submit(generation)
        except QueueFullError as exc:
            self.server.metrics.queue_full.inc()
            raise HttpError(503, str(exc), type="service_unavailable_error", headers=[("Retry-After", "1")]) from None
        except EngineStoppedError:
            raise HttpError(503, "the server is shutting down", type="service_unavailable_error") from None
        answer = CompletionAnswer(self, asked, engine.tokenizer, valid.logprobs, int(time.time()))
        if asked.stream:
            return EventStream(answer.chunks(generation), on_close=generation.cancel)
        try:
            for event in self._events(generation):
                if isinstance(event, DoneEvent):
                    if asked.request.store:
                        self.server.record_group(event.result)
                    return JsonResponse(answer.whole(event.result))
        finally:
            generation.cancel()
        raise HttpError(500, "the request ended before generation finished", type="server_error")

    @staticmethod
    def _events(generation: GenerationRequest):
        try:
            yield from iter_events(generation)
        except EngineStoppedError:
            raise HttpError(503, "the server is shutting down", type="service_unavailable_error") from None
        except HttpError:
            raise
        except Exception:
            log.exception("request %s failed in the engine", generation.request_id)
            raise HttpError(500, "the engine failed while generating; see the server log", type="server_error") from None


@dataclass
class CompletionAnswer:
    """One request's answer in the chat or the completions format, whole or as stream chunks."""

    routes: OpenAIRoutes
    asked: OpenAIRequest
    tokenizer: Any
    logprobs: bool
    created: int

    @property
    def kind(self) -> str:
        return "chat.completion" if self.asked.chat else "text_completion"

    def _head(self, group_id: str, policy_version: int | None = None) -> dict:
        head = {"id": ("chatcmpl-" if self.asked.chat else "cmpl-") + group_id, "object": self.kind,
                "created": self.created, "model": self.routes.model_id, "group_id": group_id}
        if policy_version is not None:
            head["policy_version"] = policy_version
            head["system_fingerprint"] = f"flywheel-policy-v{policy_version}"
        return head

    def _logprobs(self, tokens: list[ScoredToken]) -> dict | None:
        if not self.logprobs:
            return None
        return chat_logprobs(tokens) if self.asked.chat else completion_logprobs(tokens)

    def _scored(self, token_ids, logprobs, top) -> list[ScoredToken]:
        return scored_tokens(self.tokenizer, token_ids, logprobs, top) if self.logprobs else []

    @staticmethod
    def usage(result) -> dict:
        completion_tokens = sum(len(s.token_ids) for s in result.samples)
        prompt_tokens = len(result.prompt_token_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def whole(self, result) -> dict:
        choices = []
        for s in result.samples:
            choice = {"index": s.index, "completion_id": s.completion_id, "finish_reason": s.finish_reason,
                      "logprobs": self._logprobs(self._scored(s.token_ids, s.logprobs, s.top_logprobs))}
            if self.asked.chat:
                choice["message"] = {"role": "assistant", "content": s.text}
            else:
                choice["text"] = s.text
            choices.append(choice)
        return self._head(result.group_id, result.policy_version) | {"choices": choices, "usage": self.usage(result)}

    def chunks(self, generation: GenerationRequest) -> Iterator[dict | str]:
        """The stream: per sample a role chunk (chat), its text deltas, a finish chunk; then the
        usage chunk when asked; then ``[DONE]``. The group is stored when it finishes."""
        kind = "chat.completion.chunk" if self.asked.chat else "text_completion"
        started: set[int] = set()
        for event in self.routes._events(generation):
            if isinstance(event, TokenEvent):
                if not event.text and not event.token_ids:
                    continue
                choice: dict = {"index": event.index, "completion_id": f"{event.group_id}-{event.index}",
                                "finish_reason": None,
                                "logprobs": self._logprobs(self._scored(event.token_ids, event.logprobs,
                                                                        event.top_logprobs))}
                if self.asked.chat:
                    choice["delta"] = {"content": event.text}
                    if event.index not in started:
                        choice["delta"]["role"] = "assistant"
                else:
                    choice["text"] = event.text
                started.add(event.index)
                yield self._head(event.group_id) | {"object": kind, "choices": [choice]}
            elif isinstance(event, DoneEvent):
                result = event.result
                if self.asked.request.store:
                    self.routes.server.record_group(result)
                for s in result.samples:
                    choice = {"index": s.index, "completion_id": s.completion_id, "finish_reason": s.finish_reason,
                              "logprobs": None}
                    if self.asked.chat:
                        choice["delta"] = {} if s.index in started else {"role": "assistant", "content": ""}
                    else:
                        choice["text"] = ""
                    yield self._head(result.group_id, result.policy_version) | {"object": kind, "choices": [choice]}
                if self.asked.include_usage:
                    yield self._head(result.group_id, result.policy_version) | {
                        "object": kind, "choices": [], "usage": self.usage(result)}
                yield "[DONE]"
                return


# ---- the server ----


def ssl_context(security) -> ssl.SSLContext | None:
    """The server's TLS, from the same certificate settings as gRPC (None: plaintext)."""
    if not security.tls_cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(security.tls_cert, security.tls_key)
    if security.tls_client_ca:
        context.load_verify_locations(security.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class HttpFrontEnd:
    """Owns the HTTP server of one serving process: routing, keys, roles, the rate limit."""

    def __init__(self, server: "InferenceServer", extra_routes: Iterable[HttpRoute] = ()) -> None:
        config = server.config
        self.config = config
        self.metrics = server.metrics
        self.limiter: RateLimiter | None = server.rate_limiter
        self.auth = config.security.auth != "off"
        self.keys = KeyStore.from_settings(config) if self.auth else None
        self.routes: dict[tuple[str, str], HttpRoute] = {}
        for route in [*OpenAIRoutes(server).routes(), *extra_routes]:
            self.routes[(route.method, route.path)] = route
        self.slots = threading.BoundedSemaphore(config.serving.http_workers)
        self.host = config.grpc_address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        self.tls = ssl_context(config.security)
        self._httpd: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self) -> "HttpFrontEnd":
        front = self

        class Handler(_Handler):
            front_end = front

        httpd = ThreadingHTTPServer((self.host, self.config.serving.http_port), Handler)
        httpd.daemon_threads = True
        if self.tls is not None:
            httpd.socket = self.tls.wrap_socket(httpd.socket, server_side=True)
        elif self.auth and self.host not in LOOPBACK_HOSTS:
            log.warning("HTTP on %s without TLS: API keys cross the network in plaintext", self.host)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http-api",
                         daemon=True).start()
        log.info("OpenAI-compatible HTTP API (%s) on port %d", "TLS" if self.tls else "plaintext", self.port)
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()

    def route(self, method: str, path: str) -> HttpRoute:
        route = self.routes.get((method, path))
        if route is None:
            if any(p == path for _, p in self.routes):
                raise HttpError(405, f"{method} is not allowed on {path}", code="method_not_allowed")
            raise HttpError(404, f"no route {method} {path}", type="not_found_error", code="unknown_url")
        return route

    def admit(self, route: HttpRoute, headers) -> Caller | None:
        """The caller, or an HttpError: 401 without a valid key, 403 below the route's role, 429 over its rate."""
        if route.role is None or not self.auth:
            return None
        authorization = headers.get("Authorization") or ""
        key = authorization[7:].strip() if authorization[:7].lower() == "bearer " else ""
        if not key:
            self.metrics.auth_failures.labels("missing_key").inc()
            raise HttpError(401, "this server needs an API key: send the header 'Authorization: Bearer <key>'",
                            type="authentication_error", code="missing_api_key")
        caller = self.keys.authenticate(key)
        if caller is None:
            self.metrics.auth_failures.labels("invalid_key").inc()
            raise HttpError(401, "the API key is not valid (unknown or revoked)", type="authentication_error",
                            code="invalid_api_key")
        if route.role == ROLE_ADMIN and not caller.is_admin:
            self.metrics.auth_failures.labels("forbidden").inc()
            log.warning("auth: key %r (role %s) refused on HTTP %s", caller.name, caller.role, route.path)
            raise HttpError(403, f"{route.path} needs an admin key; this key's role is {caller.role}",
                            type="permission_error", code="insufficient_permissions")
        if self.limiter is not None:
            wait = self.limiter.check(caller)
            if wait is not None:
                self.metrics.rate_limited.labels(caller.role).inc()
                ms = retry_after_ms(wait)
                raise HttpError(429, f"rate limit of key {caller.name!r} ({self.limiter.rate(caller).describe()}) "
                                     f"exceeded; retry in {ms} ms", type="rate_limit_error", code="rate_limit_exceeded",
                                headers=[("Retry-After", str(math.ceil(ms / 1000))), ("retry-after-ms", str(ms))])
        return caller


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: every response has a length or is chunked
    server_version = "flywheel"
    timeout = IDLE_CONNECTION_SECONDS
    front_end: HttpFrontEnd

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def log_message(self, format: str, *args) -> None:
        log.debug("http %s: " + format, self.address_string(), *args)

    def _handle(self, method: str) -> None:
        """Serves one request and counts it in flywheel_requests_total / _duration_seconds as
        service "http", method "POST /v1/chat/completions" (unknown paths: "unmatched"), code the
        HTTP status; /health aside, as gRPC health is."""
        started, self._status, self._route_path = time.monotonic(), 0, ""
        try:
            self._serve(method)
        finally:
            if self._route_path != "/health":
                where = f"{method} {self._route_path}" if self._route_path else "unmatched"
                code = str(self._status or 500)
                self.front_end.metrics.requests.labels("http", where, code).inc()
                self.front_end.metrics.request_duration.labels("http", where, code).observe(time.monotonic() - started)

    def _serve(self, method: str) -> None:
        front = self.front_end
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True
            self._send_error(HttpError(413, f"the request body must be at most {MAX_BODY_BYTES} bytes"))
            return
        body = self.rfile.read(length) if length else b""
        if not front.slots.acquire(blocking=False):
            self._send_error(HttpError(503, "the server is at its limit of concurrent HTTP requests; retry shortly",
                                       type="service_unavailable_error", headers=[("Retry-After", "1")]))
            return
        try:
            url = urlsplit(self.path)
            route = front.route(method, url.path.rstrip("/") or "/")
            self._route_path = route.path
            caller = front.admit(route, self.headers)
            request = HttpRequest(method, url.path, parse_qs(url.query), self.headers, body, caller)
            response = caller_context(caller).run(route.handler, request) if caller else route.handler(request)
            self._send(response)
        except HttpError as error:
            self._send_error(error)
        except Exception:
            log.exception("HTTP %s %s failed", method, self.path)
            self._send_error(HttpError(500, "the server failed on this request; see its log", type="server_error"))
        finally:
            front.slots.release()

    def _send(self, response) -> None:
        if isinstance(response, EventStream):
            self._send_events(response)
        elif isinstance(response, StaticResponse):
            self._send_bytes(200, response.content, response.content_type)
        else:
            self._send_json(response.status, response.body, response.headers)

    def _send_error(self, error: HttpError) -> None:
        self._send_json(error.status, error.body(), error.headers)

    def _send_json(self, status: int, body, headers: Iterable[tuple[str, str]] = ()) -> None:
        self._send_bytes(status, json.dumps(body).encode(), "application/json", headers)

    def _send_bytes(self, status: int, content: bytes, content_type: str,
                    headers: Iterable[tuple[str, str]] = ()) -> None:
        self._status = status
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(content)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(content)

    def _send_events(self, stream: EventStream) -> None:
        """Chunked server-sent events; the first event is produced before the headers go out, so a
        refusal raised by the generator still becomes a plain error response."""
        events = iter(stream.events)
        try:
            try:
                first = next(events)
            except StopIteration:
                first = None
            self._status = 200
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            pending = [] if first is None else [first]
            while True:
                for item in pending:
                    line = item if isinstance(item, str) else json.dumps(item)
                    self._chunk(f"data: {line}\n\n".encode())
                try:
                    pending = [next(events)]
                except StopIteration:
                    break
                except HttpError as error:  # headers are out: the error travels as an event
                    pending = [error.body()]
                    for item in pending:
                        self._chunk(f"data: {json.dumps(item)}\n\n".encode())
                    break
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError) as exc:
            log.info("HTTP stream client went away (%s)", exc)
            self.close_connection = True
        finally:
            stream.on_close()
            close = getattr(events, "close", None)
            if close is not None:
                close()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()
