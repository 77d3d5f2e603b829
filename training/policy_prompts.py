"""Where PPO's prompts and texts come from.

- Served traffic: every served group is stored under ``flywheel:group:{group_id}`` with the rendered
  prompt and its token ids (``flywheel.group_store``); a SCAN finds them all (the labelling set only
  lists groups the labeler has not decided yet). Each distinct prompt counts once.
- A JSONL prompt file adds more: ``{"prompt": "user message"}`` (rendered with the chat template,
  as the server renders it: ``flywheel.contracts.prompts``) or
  ``{"prompt_token_ids": [...], "prompt": "rendered text"}``.
- The served groups' samples are PPO episodes too (``served_groups``): those of the version a run
  starts from, sampled as PPO would sample them (no stop strings or forced length), at their own τ.
  Where the users ranked a group, their ranking is its samples' reward (``rank_rewards``).
- The held-out slice is fixed by a hash of the prompt text (``flywheel.contracts.heldout``), so a
  prompt is always either trained on or evaluated on, whichever run sees it.
- Text corpora (JSONL ``{"text": ...}``): the pretraining mix of PPO-ptx and the held-out text the
  gate measures perplexity on. Small defaults ship in ``training/data/``.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping, Sequence

import redis as redis_lib

from flywheel.contracts.groups import FINISH_LENGTH, FINISH_STOP, CompletionGroup, StoredCompletion
from flywheel.contracts.heldout import judge_trains_on, prompt_is_held_out
from flywheel.contracts.rankings import SOURCE_AI
from flywheel.contracts.prompts import render_prompt
from flywheel.group_store import GroupStore
from training.policy_gate import RankedAnswers
from training.policy_model import Prompt
from training.ppo import ServedGroup
from training.rankings import Ranking

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
DEFAULT_PTX_CORPUS = DATA_DIR / "ptx_corpus.jsonl"
DEFAULT_HELDOUT_CORPUS = DATA_DIR / "heldout_corpus.jsonl"


def stored_groups(client: redis_lib.Redis) -> list[CompletionGroup]:
    """Every served group in Redis (one SCAN for a run's prompts and its served episodes); a record
    that does not parse as a group is skipped with a warning."""
    groups = []
    for raw in GroupStore(client).all_records():
        try:
            groups.append(CompletionGroup.from_json(raw))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("skipping an unreadable group record: %s", exc)
    return groups


def served_prompts(groups: Sequence[CompletionGroup], tokenizer, max_prompts: int = 4096) -> list[Prompt]:
    """Distinct prompts of the served groups, newest first, at most ``max_prompts``. A record
    without token ids (written by something other than the server) has its text tokenized."""
    found: dict[str, tuple[float, Prompt]] = {}
    for group in groups:
        try:
            text, token_ids = str(group.prompt), tuple(int(t) for t in group.prompt_token_ids or ())
            created = float(group.created_at)
        except (ValueError, TypeError) as exc:
            log.warning("skipping an unreadable group record: %s", exc)
            continue
        if not token_ids and text:
            token_ids = tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
        if token_ids and (text not in found or found[text][0] < created):
            found[text] = (created, Prompt(text, token_ids))
    newest_first = sorted(found.values(), key=lambda item: -item[0])
    return [prompt for _, prompt in newest_first[:max_prompts]]


def rank_rewards(kept: Sequence[StoredCompletion], rankings: Sequence[Ranking]) -> list[float] | None:
    """The users' own verdict on a group's kept samples as PPO rewards: each ranking that orders
    all of them gives the i-th best of m the standardized Borda score (m − 1 − 2i) / √((m² − 1)/3)
    (mean 0, std 1 over the group, the scale of a calibrated reward), averaged over such rankings.
    Only human rankings count (AI ones are a stand-in for them). None when no ranking covers them
    all: the reward model scores that group instead."""
    m = len(kept)
    if m < 2:
        return None
    spread = math.sqrt((m * m - 1) / 3)
    totals, counted = [0.0] * m, 0
    for ranking in rankings:
        if ranking.source == SOURCE_AI:
            continue
        if ranking.completion_ids:
            keys, ranked = [c.completion_id for c in kept], ranking.completion_ids
        else:  # stored before rankings kept their ids: joined by text
            keys, ranked = [c.text for c in kept], ranking.completions
        wanted = set(keys)
        place = {key: i for i, key in enumerate(key for key in ranked if key in wanted)}
        if len(wanted) < m or len(place) < m or wanted - place.keys():
            continue  # a sample it did not rank (or texts it cannot tell apart)
        for j, key in enumerate(keys):
            totals[j] += (m - 1 - 2 * place[key]) / spread
        counted += 1
    return [total / counted for total in totals] if counted else None


def served_groups(groups: Sequence[CompletionGroup], version: int, eos_id: int, response_length: int,
                  heldout_fraction: float, max_groups: int = 1024,
                  rankings: Mapping[str, Sequence[Ranking]] | None = None,
                  ranking_heldout_fraction: float | None = None) -> list[ServedGroup]:
    """The newest served groups of policy ``version`` (at most ``max_groups``) whose samples are
    on-policy episodes for PPO, training prompts only (never the held-out slice).

    A group qualifies when its request sampled as a rollout does: τ > 0, no stop strings and no
    ``min_new_tokens`` (both change what was sampled), at most ``response_length`` new tokens; and
    it keeps the samples that ended with ``eos_id`` or at their length limit (2 at least: RLOO's
    baseline is over a prompt's other samples). A nucleus (``top_p`` < 1) is accepted: its samples
    lack the tail it cut, and PPO takes their log-probs under the untruncated softmax(z/τ), as
    rollouts sampled through a serving stack with top-p usually are.

    ``rankings`` (by group id): a group the users ranked carries their ranking as its samples'
    rewards (``rank_rewards``). With ``ranking_heldout_fraction`` (the reward model's held-out
    share), the groups the judge member trains on are left out altogether: they are the gate's
    evidence (its judge and its users' held-out verdict), never PPO's episodes."""
    found: list[tuple[float, ServedGroup]] = []
    for group in groups:
        try:
            params = group.params
            temperature = float(params.get("temperature", 1.0))
            as_a_rollout = (int(group.policy_version) == version and temperature > 0 and not params.get("stop")
                            and int(params.get("min_new_tokens") or 0) == 0
                            and 0 < int(params.get("max_new_tokens") or 0) <= response_length)
            prompt = Prompt(str(group.prompt), tuple(int(t) for t in group.prompt_token_ids or ()))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("skipping an unreadable group record: %s", exc)
            continue
        if not as_a_rollout or not prompt.token_ids or prompt_is_held_out(prompt, heldout_fraction):
            continue
        if ranking_heldout_fraction is not None and judge_trains_on(group.group_id, ranking_heldout_fraction):
            continue
        kept = [c for c in group.completions if c.token_ids and (
            c.finish_reason == FINISH_LENGTH or (c.finish_reason == FINISH_STOP and c.token_ids[-1] == eos_id))]
        if len(kept) < 2:
            continue
        scores = rank_rewards(kept, rankings[group.group_id]) if rankings and group.group_id in rankings else None
        found.append((float(group.created_at),
                      ServedGroup(prompt, [list(c.token_ids) for c in kept], temperature, scores)))
    found.sort(key=lambda item: -item[0])
    return [group for _, group in found[:max_groups]]


def gate_rankings(rankings: Mapping[str, Sequence[Ranking]], tokenizer, heldout_fraction: float,
                  max_rankings: int) -> list[RankedAnswers]:
    """The users' held-out verdict's rankings: the newest ``max_rankings`` human rankings of the
    groups the judge member trains on (``heldout_fraction``: the reward model's), which no PPO run
    learns from, tokenized from their own texts (their groups may have expired)."""
    chosen = [ranking for group_id, group in rankings.items() if judge_trains_on(group_id, heldout_fraction)
              for ranking in group if ranking.source != SOURCE_AI and ranking.k >= 2]
    chosen.sort(key=lambda ranking: _seconds(ranking.created_at), reverse=True)

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [RankedAnswers(ids(r.prompt), tuple(ids(text) for text in r.completions)) for r in chosen[:max_rankings]]


def _seconds(created_at: str) -> float:
    try:
        return float(created_at)
    except ValueError:
        return 0.0


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
