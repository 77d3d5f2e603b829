"""The AI judge's verdict letters scored by any OpenAI-compatible endpoint that returns
log-probabilities: vLLM, TGI, llama.cpp's server, or another Flywheel server's HTTP API.

The method is ``feedback.pairwise.PairwiseJudge``'s, unchanged; only the log-odds of "A" against
"B" come from elsewhere. Each judge prompt is one request with ``max_tokens=1``,
``temperature=0`` and the ``top_logprobs`` most likely first tokens (at most 5 on
``/v1/completions``, the legacy API's limit): ``/v1/chat/completions``
(the judge's conversation as messages; the endpoint applies its model's chat template, as the
local judge does) or ``/v1/completions`` (the conversation as one plain text). Every listed
spelling of a letter ("A", " A") counts, as the local judge sums its single-token spellings.
A letter outside the top k gets the smallest listed log-probability: an upper bound on its own,
so the log-odds are never overstated; with neither letter listed the verdict is 0 (no evidence),
which lowers the ranking's confidence instead of inventing a preference.

Requests go out ``batch_size`` at a time (threads). A refused or failed request is retried twice
(429 and 5xx after the server's Retry-After, connection errors after a short backoff); then
``JudgeUnavailableError`` names the URL, the status and the server's message (never the key),
and for ``cooldown_seconds`` the judge fails at once instead of waiting on a dead endpoint again.
The standard library's HTTP client is used, not the ``openai`` SDK, which is only a development
dependency: a labelling worker needs nothing more than Flywheel's own dependencies.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from feedback.pairwise import ANSWER_TOKENS, JudgeConfig, JudgeUnavailableError, PairwiseJudge, readable_prompt

log = logging.getLogger(__name__)

CHAT, COMPLETIONS = "chat", "completions"
RETRYABLE_STATUS = (429, 500, 502, 503, 504)
CHARS_PER_TOKEN = 4  # no tokenizer here: texts are cut to max_text_tokens × this many characters
_VERDICTS = {verdict: {s.strip() for s in spellings} for verdict, spellings in ANSWER_TOKENS.items()}


@dataclass(frozen=True)
class JudgeEndpoint:
    """Where the judge is and how it is called."""

    url: str  # the API's base, as the openai SDK's base_url: http://host:8000/v1
    api_key: str = field(default="", repr=False)  # never printed, never logged
    model: str = ""  # empty: the first model the endpoint lists (GET /models)
    api: str = CHAT  # chat (/chat/completions) or completions (/completions)
    top_logprobs: int = 20  # OpenAI's largest
    timeout_seconds: float = 60.0
    retries: int = 2
    cooldown_seconds: float = 30.0

    def __post_init__(self) -> None:
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the judge URL must be http(s)://host[:port]/v1, got {self.url!r}")
        if self.api not in (CHAT, COMPLETIONS):
            raise ValueError(f"the judge API must be {CHAT} or {COMPLETIONS}, got {self.api!r}")

    @property
    def where(self) -> str:
        return self.url.rstrip("/")


def verdict_log_odds(candidates: list[tuple[str, float]]) -> float:
    """log P("A") − log P("B") from the listed first tokens (token, log-probability); see the
    module docstring for a letter that is not listed."""
    listed: dict[str, float] = {}
    for token, logprob in candidates:
        if logprob is not None and math.isfinite(logprob):
            listed[token] = max(logprob, listed.get(token, -math.inf))
    scores = {}
    for verdict, spellings in _VERDICTS.items():
        found = [lp for token, lp in listed.items() if token.strip() in spellings]
        scores[verdict] = _logsumexp(found) if found else None
    if scores["A"] is None and scores["B"] is None:
        return 0.0
    floor = min(listed.values())
    return (scores["A"] if scores["A"] is not None else floor) - (scores["B"] if scores["B"] is not None else floor)


class RemoteJudge(PairwiseJudge):
    """The pairwise judge on an OpenAI-compatible endpoint; one per process is enough (thread-safe)."""

    def __init__(self, endpoint: JudgeEndpoint, constitution: str, config: JudgeConfig | None = None,
                 judge_id: str = "") -> None:
        self.endpoint = endpoint
        self._model = endpoint.model
        self._lock = threading.Lock()
        self._failed_until = 0.0
        self._last_failure: JudgeUnavailableError | None = None
        # named without a request (the endpoint may be down now): by its model, else by its address
        name = endpoint.model or urlsplit(endpoint.url).netloc
        super().__init__(constitution, judge_id or self.make_id(name, constitution), config)

    def __repr__(self) -> str:
        return f"RemoteJudge({self.endpoint.where}, model={self._model!r}, api={self.endpoint.api})"

    @staticmethod
    def make_id(model: str, constitution: str) -> str:
        return PairwiseJudge.make_id(model.replace("/", "_"), constitution)

    def model_name(self) -> str:
        """The model the requests name: the configured one, else the first the endpoint lists."""
        if not self._model:
            listed = self._request("GET", "/models")
            try:
                self._model = str(listed["data"][0]["id"])
            except (KeyError, IndexError, TypeError) as exc:
                raise JudgeUnavailableError(
                    f"the judge endpoint {self.endpoint.where}/models lists no model ({str(listed)[:200]}); "
                    f"set FLYWHEEL_JUDGE_MODEL to the model's name", "bad_response") from exc
        return self._model

    # ---- prompts ----

    def readable(self, prompt: str) -> str:
        return readable_prompt(prompt, [])

    def _clip(self, text: str, keep_end: bool = False) -> str:
        limit = self.config.max_text_tokens * CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        return text[-limit:] if keep_end else text[:limit]

    def render(self, prompt: str, answer_a: str, answer_b: str) -> list[dict]:
        """The judge's conversation (messages); the completions API sends it as one plain text."""
        return self.messages(prompt, answer_a, answer_b)

    # ---- scoring ----

    def log_odds_a(self, rendered: list[list[dict]]) -> list[float]:
        if not rendered:
            return []
        self._fail_fast()
        try:
            with ThreadPoolExecutor(max_workers=min(self.config.batch_size, len(rendered)),
                                    thread_name_prefix="judge") as pool:
                return list(pool.map(self._score, rendered))
        except JudgeUnavailableError as error:
            with self._lock:
                self._failed_until = time.monotonic() + self.endpoint.cooldown_seconds
                self._last_failure = error
            raise

    def _fail_fast(self) -> None:
        with self._lock:
            failure, until = self._last_failure, self._failed_until
        if failure is not None and time.monotonic() < until:
            raise JudgeUnavailableError(
                f"{failure} (not asked again for {until - time.monotonic():.0f} s)", failure.reason)

    def _score(self, messages: list[dict]) -> float:
        endpoint = self.endpoint
        body = {"model": self.model_name(), "max_tokens": 1, "temperature": 0, "n": 1}
        if endpoint.api == CHAT:
            body |= {"messages": messages, "logprobs": True, "top_logprobs": endpoint.top_logprobs}
            answer = self._request("POST", "/chat/completions", body)
            candidates = _chat_candidates(answer)
        else:
            # the legacy completions API lists at most 5 alternatives (OpenAI, vLLM, Flywheel)
            body |= {"prompt": self.plain_text(messages), "logprobs": min(endpoint.top_logprobs, 5)}
            answer = self._request("POST", "/completions", body)
            candidates = _completion_candidates(answer)
        if candidates is None:
            raise JudgeUnavailableError(
                f"the judge endpoint {endpoint.where} returned no log-probabilities for the first token "
                f"(does it support logprobs and top_logprobs on /{'chat/completions' if endpoint.api == CHAT else 'completions'}?): "
                f"{json.dumps(answer)[:300]}", "bad_response")
        return verdict_log_odds(candidates)

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One call with retries; its JSON answer, or JudgeUnavailableError."""
        endpoint = self.endpoint
        url = endpoint.where + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if endpoint.api_key:
            headers["Authorization"] = f"Bearer {endpoint.api_key}"
        for attempt in range(endpoint.retries + 1):
            last = attempt == endpoint.retries
            request = urllib.request.Request(url, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=endpoint.timeout_seconds) as response:
                    raw = response.read()
            except urllib.error.HTTPError as error:
                message = _error_message(error)
                if error.code in RETRYABLE_STATUS and not last:
                    time.sleep(_retry_after(error, attempt))
                    continue
                raise JudgeUnavailableError(f"the judge endpoint {url} answered HTTP {error.code}: {message}",
                                            _status_reason(error.code)) from None
            except (urllib.error.URLError, OSError) as error:
                reason = getattr(error, "reason", error)
                timed_out = isinstance(reason, (socket.timeout, TimeoutError))
                if not last:
                    time.sleep(0.5 * 2 ** attempt)
                    continue
                what = f"no answer within {endpoint.timeout_seconds:g} s" if timed_out else f"cannot reach it ({reason})"
                raise JudgeUnavailableError(
                    f"the judge endpoint {url}: {what}; is FLYWHEEL_JUDGE_URL right and the server up?",
                    "timeout" if timed_out else "connection") from None
            try:
                return json.loads(raw)
            except ValueError:
                raise JudgeUnavailableError(f"the judge endpoint {url} answered with no JSON: {raw[:200]!r}",
                                            "bad_response") from None
        raise AssertionError("unreachable")


def _chat_candidates(answer: dict) -> list[tuple[str, float]] | None:
    try:
        first = answer["choices"][0]["logprobs"]["content"][0]
        listed = [(t["token"], float(t["logprob"])) for t in first.get("top_logprobs") or []]
        return listed + [(first["token"], float(first["logprob"]))]
    except (KeyError, IndexError, TypeError, ValueError):
        return None


def _completion_candidates(answer: dict) -> list[tuple[str, float]] | None:
    try:
        logprobs = answer["choices"][0]["logprobs"]
        listed = [(token, float(lp)) for token, lp in (logprobs["top_logprobs"][0] or {}).items()]
        return listed + [(logprobs["tokens"][0], float(logprobs["token_logprobs"][0]))]
    except (KeyError, IndexError, TypeError, ValueError, AttributeError):
        return None


def _error_message(error: urllib.error.HTTPError) -> str:
    """The server's own words: OpenAI's {"error": {"message"}} shape, else the start of the body."""
    try:
        raw = error.read()
    except OSError:
        return error.reason or ""
    try:
        body = json.loads(raw)
        detail = body.get("error", body)
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode("utf-8", "replace") or str(error.reason)


def _retry_after(error: urllib.error.HTTPError, attempt: int) -> float:
    try:
        return min(max(float(error.headers.get("Retry-After", "")), 0.0), 30.0)
    except (TypeError, ValueError):
        return 0.5 * 2 ** attempt


def _status_reason(status: int) -> str:
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "rate_limited"
    return "server_error" if status >= 500 else "bad_request"


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
