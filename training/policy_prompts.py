"""Where PPO's prompts and texts come from.

- Served traffic: every served group is stored under ``flywheel:group:{group_id}`` with the rendered
  prompt and its token ids (``flywheel.group_store``); a SCAN finds them all (the labelling set only
  lists groups the labeler has not decided yet). Each distinct prompt counts once.
- A JSONL prompt file adds more: ``{"prompt": "user message"}`` (rendered with the chat template,
  as the server renders it: ``flywheel.contracts.prompts``) or
  ``{"prompt_token_ids": [...], "prompt": "rendered text"}``.
- The served groups' samples are PPO episodes too (``served_groups``): those of the version a run
  starts from, sampled as PPO would sample them (no stop strings or forced length), at their own τ.
- The held-out slice is fixed by a hash of the prompt text (``flywheel.contracts.heldout``), so a
  prompt is always either trained on or evaluated on, whichever run sees it.
- Text corpora (JSONL ``{"text": ...}``): the pretraining mix of PPO-ptx and the held-out text the
  gate measures perplexity on. Small defaults ship in ``training/data/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import redis as redis_lib

from flywheel.contracts.groups import FINISH_LENGTH, FINISH_STOP, CompletionGroup
from flywheel.contracts.heldout import prompt_is_held_out
from flywheel.contracts.prompts import render_prompt
from flywheel.group_store import GroupStore
from training.policy_model import Prompt
from training.ppo import ServedGroup

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PTX_CORPUS = DATA_DIR / "ptx_corpus.jsonl"
DEFAULT_HELDOUT_CORPUS = DATA_DIR / "heldout_corpus.jsonl"


def served_prompts(client: redis_lib.Redis, tokenizer, max_prompts: int = 4096) -> list[Prompt]:
    """Distinct prompts of the served groups in Redis, newest first, at most ``max_prompts``. A
    record without token ids (written by something other than the server) has its text tokenized;
    one that does not parse as a group record is skipped."""
    found: dict[str, tuple[float, Prompt]] = {}
    for raw in GroupStore(client).all_records():
        try:
            group = CompletionGroup.from_json(raw)
            text, token_ids = str(group.prompt), tuple(int(t) for t in group.prompt_token_ids or ())
            created = float(group.created_at)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping an unreadable group record: %s", exc)
            continue
        if not token_ids and text:
            token_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if token_ids and (text not in found or found[text][0] < created):
            found[text] = (created, Prompt(text, token_ids))
    newest_first = sorted(found.values(), key=lambda item: -item[0])
    return [prompt for _, prompt in newest_first[:max_prompts]]


def served_groups(client: redis_lib.Redis, version: int, eos_id: int, response_length: int,
                  heldout_fraction: float, max_groups: int = 1024) -> list[ServedGroup]:
    """The newest served groups of policy ``version`` (at most ``max_groups``) whose samples are
    on-policy episodes for PPO, training prompts only (never the held-out slice).

    A group qualifies when its request sampled as a rollout does: τ > 0, no stop strings and no
    ``min_new_tokens`` (both change what was sampled), at most ``response_length`` new tokens; and
    it keeps the samples that ended with ``eos_id`` or at their length limit (2 at least: RLOO's
    baseline is over a prompt's other samples). A nucleus (``top_p`` < 1) is accepted: its samples
    lack the tail it cut, and PPO takes their log-probs under the untruncated softmax(z/τ), as
    rollouts sampled through a serving stack with top-p usually are."""
    found: list[tuple[float, ServedGroup]] = []
    for raw in GroupStore(client).all_records():
        try:
            group = CompletionGroup.from_json(raw)
            params = group.params
            temperature = float(params.get("temperature", 1.0))
            as_a_rollout = (int(group.policy_version) == version and temperature > 0 and not params.get("stop")
                            and int(params.get("min_new_tokens") or 0) == 0
                            and 0 < int(params.get("max_new_tokens") or 0) <= response_length)
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping an unreadable group record: %s", exc)
            continue
        prompt = Prompt(str(group.prompt), tuple(int(t) for t in group.prompt_token_ids or ()))
        if not as_a_rollout or not prompt.token_ids or prompt_is_held_out(prompt, heldout_fraction):
            continue
        responses = [list(c.token_ids) for c in group.completions if c.token_ids and (
            c.finish_reason == FINISH_LENGTH or (c.finish_reason == FINISH_STOP and c.token_ids[-1] == eos_id))]
        if len(responses) >= 2:
            found.append((float(group.created_at), ServedGroup(prompt, responses, temperature)))
    found.sort(key=lambda item: -item[0])
    return [group for _, group in found[:max_groups]]


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
            prompts.append(Prompt(*render_prompt(tokenizer, str(record["prompt"]))))
        else:
            raise ValueError(f"{path}:{number}: a line needs \"prompt\" or \"prompt_token_ids\"")
    return prompts


def load_texts(path: Path, limit: int | None = None) -> list[str]:
    """The ``text`` of every line of a JSONL corpus."""
    texts = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            texts.append(str(json.loads(line)["text"]))
            if limit is not None and len(texts) >= limit:
                break
    return texts
