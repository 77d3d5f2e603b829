"""Where PPO's prompts and texts come from.

- Served traffic: every served group is stored under ``flywheel:group:{group_id}`` with the rendered
  prompt and its token ids (``feedback/groups.py``); a SCAN finds them all (the labelling set only
  lists groups the labeler has not decided yet). Each distinct prompt counts once.
- A JSONL prompt file adds more: ``{"prompt": "user message"}`` (rendered with the chat template)
  or ``{"prompt_token_ids": [...], "prompt": "rendered text"}``.
- The held-out slice is fixed by a hash of the prompt text, so a prompt is always either trained on
  or evaluated on, whichever run sees it.
- Text corpora (JSONL ``{"text": ...}``): the pretraining mix of PPO-ptx and the held-out text the
  gate measures perplexity on. Small defaults ship in ``training/data/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import redis as redis_lib

from training.policy_model import Prompt
from training.rankings import is_held_out

log = logging.getLogger(__name__)

GROUP_KEY_PATTERN = "flywheel:group:*"
DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PTX_CORPUS = DATA_DIR / "ptx_corpus.jsonl"
DEFAULT_HELDOUT_CORPUS = DATA_DIR / "heldout_corpus.jsonl"


def served_prompts(client: redis_lib.Redis, tokenizer, max_prompts: int = 4096) -> list[Prompt]:
    """Distinct prompts of the served groups in Redis, newest first, at most ``max_prompts``. A
    record without token ids (written by something other than the server) has its text tokenized."""
    found: dict[str, tuple[float, Prompt]] = {}
    keys = list(client.scan_iter(match=GROUP_KEY_PATTERN, count=1000))
    for start in range(0, len(keys), 500):
        for raw in client.mget(keys[start:start + 500]):
            if raw is None:  # expired between SCAN and MGET
                continue
            try:
                group = json.loads(raw)
                text, token_ids = str(group["prompt"]), tuple(int(t) for t in group.get("prompt_token_ids") or ())
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("skipping an unreadable group record: %s", exc)
                continue
            if not token_ids and text:
                token_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
            created = float(group.get("created_at", 0.0))
            if token_ids and (text not in found or found[text][0] < created):
                found[text] = (created, Prompt(text, token_ids))
    newest_first = sorted(found.values(), key=lambda item: -item[0])
    return [prompt for _, prompt in newest_first[:max_prompts]]


def file_prompts(path: Path, tokenizer) -> list[Prompt]:
    """Prompts of a JSONL file (see the module docstring)."""
    prompts = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if "prompt_token_ids" in record:
            prompts.append(Prompt(str(record.get("prompt", "")), tuple(int(t) for t in record["prompt_token_ids"])))
        elif "prompt" in record:
            prompts.append(render_prompt(tokenizer, str(record["prompt"])))
        else:
            raise ValueError(f"{path}:{number}: a line needs \"prompt\" or \"prompt_token_ids\"")
    return prompts


def render_prompt(tokenizer, user_message: str) -> Prompt:
    """A user message as the server renders it: the chat template with the generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": user_message}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = user_message
    return Prompt(text, tuple(tokenizer(text, add_special_tokens=False)["input_ids"]))


def split_prompts(prompts: list[Prompt], fraction: float) -> tuple[list[Prompt], list[Prompt]]:
    """(training prompts, held-out prompts), each prompt once, by a hash of its text."""
    seen: set[str] = set()
    train, held_out = [], []
    for prompt in prompts:
        key = prompt.text or " ".join(map(str, prompt.token_ids))
        if key in seen:
            continue
        seen.add(key)
        (held_out if is_held_out(key, fraction) else train).append(prompt)
    return train, held_out


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    """The ``text`` of every line of a JSONL corpus."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(str(json.loads(line)["text"]))
            if limit is not None and len(texts) >= limit:
                break
    return texts
