"""Turn a ``CompleteRequest`` into prompt tokens and ``SamplingParams``, or say exactly which field
is wrong. Every check here maps to ``INVALID_ARGUMENT`` with the field's name in the message."""

from __future__ import annotations

import math
from dataclasses import dataclass

from flywheel.contracts.prompts import render_messages
from flywheel.quoting import quote
from flywheel.v1 import inference_pb2
from serving.sampling import SamplingParams

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_CHARS_PER_TOKEN = 32
MAX_TOP_LOGPROBS = 20  # as OpenAI's API: alternatives per position a request may ask for


class InvalidRequest(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    max_samples: int = 16
    max_new_tokens_limit: int = 1024
    default_max_new_tokens: int = 128
    context_window: int = 2048
    max_prompt_tokens: int = 4096
    max_cache_tokens: int = 0  # the engine's key/value cache budget in tokens (0 = no bound)

    @property
    def max_prompt_chars(self) -> int:
        """Refuse before tokenizing: no real prompt averages more than this many characters a token."""
        return self.max_prompt_tokens * MAX_CHARS_PER_TOKEN


@dataclass
class ValidatedRequest:
    prompt: str
    prompt_token_ids: list[int]
    params: SamplingParams
    logprobs: bool = False  # report each generated token with its log-probability
    top_logprobs: int = 0  # and this many alternatives at each position
    store: bool = True  # keep the group (ranking, training); False for evaluation traffic


def request_prompt(request: inference_pb2.CompleteRequest, tokenizer) -> tuple[str, list[int]]:
    """The prompt text as the model sees it, and its token ids: the messages rendered as every part
    renders them (``flywheel.contracts.prompts``), or the plain prompt as it is."""
    if request.prompt and request.messages:
        raise InvalidRequest("prompt", "set either prompt or messages, not both")
    if request.messages:
        messages = []
        for i, message in enumerate(request.messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(f"messages[{i}].role", f"must be one of {', '.join(CHAT_ROLES)}; got {quote(message.role)}")
            messages.append({"role": message.role, "content": message.content})
        if not any(m["content"].strip() for m in messages):
            raise InvalidRequest("messages", "every message is empty")
        if getattr(tokenizer, "chat_template", None) is None:
            raise InvalidRequest("messages", "this model has no chat template; send a plain prompt")
        text, token_ids = render_messages(tokenizer, messages)
        return text, list(token_ids)
    if not request.prompt.strip():
        raise InvalidRequest("prompt", "is empty (set prompt or messages)")
    return request.prompt, tokenizer(request.prompt).input_ids


def validate_request(request: inference_pb2.CompleteRequest, tokenizer, limits: RequestLimits) -> ValidatedRequest:
    n = request.n if request.HasField("n") else 1
    if not 1 <= n <= limits.max_samples:
        raise InvalidRequest("n", f"must be between 1 and {limits.max_samples}; got {n}")

    max_new_tokens = request.max_new_tokens if request.HasField("max_new_tokens") else limits.default_max_new_tokens
    if max_new_tokens < 1:
        raise InvalidRequest("max_new_tokens", f"must be at least 1; got {max_new_tokens}")
    if max_new_tokens > limits.max_new_tokens_limit:
        raise InvalidRequest("max_new_tokens", f"must be at most {limits.max_new_tokens_limit}; got {max_new_tokens}")

    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidRequest("temperature", f"must be a finite number >= 0 (0 = greedy); got {temperature}")

    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not math.isfinite(top_p) or not 0 < top_p <= 1:
        raise InvalidRequest("top_p", f"must be in (0, 1]; got {top_p}")

    if len(request.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings; got {len(request.stop)}")
    for i, stop in enumerate(request.stop):
        if not stop or len(stop) > MAX_STOP_LENGTH:
            raise InvalidRequest(f"stop[{i}]", f"must be 1 to {MAX_STOP_LENGTH} characters long")

    min_new_tokens = request.min_new_tokens if request.HasField("min_new_tokens") else 0
    if min_new_tokens > max_new_tokens:
        raise InvalidRequest("min_new_tokens", f"must not exceed max_new_tokens ({max_new_tokens}); got {min_new_tokens}")

    if request.top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidRequest("top_logprobs", f"must be between 0 and {MAX_TOP_LOGPROBS}; got {request.top_logprobs}")

    total_chars = len(request.prompt) + sum(len(m.content) for m in request.messages)
    if total_chars > limits.max_prompt_chars:
        raise InvalidRequest("prompt", f"is {total_chars} characters; the limit is {limits.max_prompt_chars} "
                                       f"({limits.max_prompt_tokens} tokens)")
    prompt, ids = request_prompt(request, tokenizer)
    if not ids:
        raise InvalidRequest("prompt", "encodes to no tokens")
    if len(ids) > limits.max_prompt_tokens:
        raise InvalidRequest("prompt", f"has {len(ids)} tokens; the limit is {limits.max_prompt_tokens}")
    if len(ids) + max_new_tokens > limits.context_window:
        raise InvalidRequest(
            "prompt",
            f"the model's context window is {limits.context_window} tokens; the prompt has {len(ids)} and "
            f"max_new_tokens asks for {max_new_tokens} more ({len(ids) + max_new_tokens} in all)",
        )
    if limits.max_cache_tokens and n * (len(ids) + max_new_tokens) > limits.max_cache_tokens:
        # it could never be admitted: its own rows would pass the engine's whole cache budget
        raise InvalidRequest(
            "max_new_tokens",
            f"n={n} samples of the prompt's {len(ids)} tokens + max_new_tokens {max_new_tokens} need "
            f"{n * (len(ids) + max_new_tokens)} tokens of key/value cache; this server's budget is "
            f"{limits.max_cache_tokens} (ask for fewer samples or tokens)",
        )
    params = SamplingParams(n=n, max_new_tokens=max_new_tokens, temperature=float(temperature), top_p=float(top_p),
                            seed=request.seed if request.HasField("seed") else None, stop=tuple(request.stop),
                            min_new_tokens=min_new_tokens)
    return ValidatedRequest(prompt, ids, params, logprobs=request.logprobs or request.top_logprobs > 0,
                            top_logprobs=request.top_logprobs,
                            store=request.store if request.HasField("store") else True)
