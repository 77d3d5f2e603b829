"""Simulated users for the demo, the whole-loop test and ``bench/loop.py``: they call the public
gRPC API as an application's users would, and rank what they got by one stated preference
(``flywheel.app.preferences``: a style that is not about length by default, ``concise``, or the
random-ranking control).

The prompts are short questions (facts, arithmetic, definitions, advice). ``evaluation_split``
sets a fixed slice of them aside that the users never ask: the before/after comparison runs on
questions no user sent, so neither the reward model nor PPO has seen them (PPO's own gate holds
out a slice of what the users did ask, by its own hash).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import grpc

from flywheel.app.preferences import Preference
from flywheel.grpc_client import bearer, retry_after_seconds
from flywheel.v1 import feedback_pb2, feedback_pb2_grpc
from flywheel.v1 import inference_pb2 as pb
from flywheel.v1 import inference_pb2_grpc as rpc

_COUNTRIES = ["France", "Italy", "Spain", "Germany", "Japan", "Canada", "Brazil", "Egypt", "Kenya", "Peru",
              "Norway", "Greece", "India", "Mexico", "Chile", "Poland", "Turkey", "Vietnam", "Ireland", "Portugal"]
_THINGS = ["the sky", "grass", "snow", "a banana", "a ripe tomato", "coal", "an orange", "milk", "a lemon", "blood"]
_ANIMALS = ["a spider", "a dog", "a bird", "an ant", "a horse", "a snake", "a cat", "an octopus", "a cow", "a fish"]
_SHAPES = ["a triangle", "a square", "a pentagon", "a hexagon", "an octagon", "a circle"]
_WORDS = ["hello", "cat", "water", "bread", "house", "thank you", "good night", "book", "sun", "friend"]
_CONCEPTS = ["gravity", "a noun", "photosynthesis", "an atom", "a verb", "democracy", "inflation", "a virus",
             "a planet", "an ecosystem", "a budget", "a metaphor", "electricity", "a vaccine", "a volcano",
             "an algorithm", "a prime number", "evaporation", "a mammal", "friction"]
_ADJECTIVES = ["hot", "tall", "fast", "happy", "heavy", "early", "loud", "empty", "strong", "bright", "wet",
               "old", "rich", "soft", "open", "near", "thick", "clean", "easy", "true"]
_NOUNS = ["mouse", "child", "tooth", "box", "city", "leaf", "person", "goose", "knife", "potato", "man", "foot",
          "woman", "bus", "wolf"]
_MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
           "November", "December"]
_PAIRS = [("an elephant", "a mouse"), ("the Sun", "the Moon"), ("a lake", "an ocean"), ("a car", "a bicycle"),
          ("a city", "a village"), ("a minute", "an hour"), ("a kilometre", "a metre"), ("a whale", "a shark"),
          ("Jupiter", "Earth"), ("a tree", "a flower")]
_TASKS = ["sleeping better", "saving money", "writing a clear email", "learning a language", "staying focused",
          "cooking rice", "running a meeting", "reading more", "keeping plants alive", "drinking more water"]


def question_pool() -> list[str]:
    """The questions the simulated users ask (about 350, fixed)."""
    questions = [f"What is the capital of {c}?" for c in _COUNTRIES]
    questions += [f"What color is {t}?" for t in _THINGS]
    questions += [f"How many legs does {a} have?" for a in _ANIMALS]
    questions += [f"How many sides does {s} have?" for s in _SHAPES]
    questions += [f"How do you say '{w}' in French?" for w in _WORDS]
    questions += [f"What is {a} plus {b}?" for a, b in itertools.product((3, 7, 12, 25), (4, 9, 16, 30))]
    questions += [f"What is {c}?" for c in _CONCEPTS]
    questions += [f"Define {c} in your own words." for c in _CONCEPTS]
    questions += [f"Give me one tip for {t}." for t in _TASKS]
    questions += [f"Why is {t} a good habit?" for t in _TASKS]
    questions += [f"Is {a} a mammal?" for a in _ANIMALS]
    questions += [f"Which continent is {c} in?" for c in _COUNTRIES]
    questions += [f"What language is spoken in {c}?" for c in _COUNTRIES]
    questions += [f"What is the currency of {c}?" for c in _COUNTRIES]
    questions += [f"What is the opposite of '{a}'?" for a in _ADJECTIVES]
    questions += [f"What is the plural of '{n}'?" for n in _NOUNS]
    questions += [f"What is {a} times {b}?" for a, b in itertools.product((2, 6, 9, 11), (3, 5, 8, 12))]
    questions += [f"How many days are in {m}?" for m in _MONTHS]
    questions += [f"Which is bigger, {a} or {b}?" for a, b in _PAIRS]
    questions += [f"What sound does {a} make?" for a in _ANIMALS]
    return questions


EVALUATION_QUESTIONS = 64  # at least the 40 the issue asks for, after the ones a pool may lack


def evaluation_split(questions: Sequence[str], count: int = EVALUATION_QUESTIONS) -> tuple[list[str], list[str]]:
    """(questions the users ask, ``count`` questions they never ask), chosen by a fixed hash of the
    question so that every run, and every preference, is evaluated on the same questions."""
    ranked = sorted(questions, key=lambda q: hashlib.sha256(f"evaluation:{q}".encode()).hexdigest())
    held = set(ranked[:count])
    return [q for q in questions if q not in held], [q for q in questions if q in held]


@dataclass
class SamplingPlan:
    """What every simulated request asks for."""
    n: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    timeout_seconds: float = 600.0


@dataclass
class UserTally:
    rankings: int = 0
    left_to_ai: int = 0  # groups the users did not rank (``ai_fraction``): the AI labeler's share
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def left_to_ai(group_id: str, ai_fraction: float) -> bool:
    """Whether the users leave this group to the AI labeler: a stable ``ai_fraction`` of group ids."""
    digest = hashlib.blake2b(f"left-to-ai:{group_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < ai_fraction


def sample(stub: rpc.InferenceStub, question: str, plan: SamplingPlan, seed: int,
           metadata: Sequence[tuple[str, str]] = (), retries: int = 20, store: bool = True) -> pb.CompleteResponse:
    """One request, retried as a polite client does when the server says RESOURCE_EXHAUSTED (a
    full queue or the key's rate limit): after the ``retry-after-ms`` it names. ``store=False``:
    the server keeps no group of it (nothing can rank or train on it)."""
    request = pb.CompleteRequest(
        messages=[pb.ChatMessage(role="user", content=question)], n=plan.n, max_new_tokens=plan.max_new_tokens,
        temperature=plan.temperature, top_p=plan.top_p, seed=seed, store=store)
    for attempt in range(retries + 1):
        try:
            return stub.Complete(request, timeout=plan.timeout_seconds, metadata=metadata)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == retries:
                raise
            time.sleep(retry_after_seconds(exc, default=1.0))
    raise AssertionError("unreachable")


@dataclass
class SimulatedUser:
    """One annotator: its name and, when the server checks keys, its own client API key (a client
    key ranks as its own name, so each user needs one)."""
    name: str
    key: str | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (bearer(self.key),) if self.key else ()


def rank_rounds(channel: grpc.Channel, questions: Sequence[str], rankings: int, simulated: Sequence[SimulatedUser], *,
                preference: Preference, plan: SamplingPlan | None = None, seed: int = 0,
                tally: UserTally | None = None, ai_fraction: float = 0.0) -> UserTally:
    """Every simulated user (a thread each) asks questions and ranks the answers by ``preference``
    until ``rankings`` groups were ranked (acknowledged by the server) or left to the AI labeler:
    with ``ai_fraction`` F, a group whose id falls in a stable share F (``left_to_ai``) is not
    ranked, so the labeler ranks it once it is due (RLAIF). A refused call is counted and retried
    after a pause. ``tally`` (counted as the users go, so a progress printer can read it) is
    returned."""
    plan = plan or SamplingPlan()
    inference, feedback = rpc.InferenceStub(channel), feedback_pb2_grpc.FeedbackStub(channel)
    tally = tally if tally is not None else UserTally()
    tickets = itertools.count()

    def run(number: int, user: SimulatedUser) -> None:
        rng = random.Random(seed * 1000 + number)
        ticket = next(tickets)
        while ticket < rankings:
            try:
                response = sample(inference, rng.choice(questions), plan, seed=rng.randrange(2**31),
                                  metadata=user.metadata)
                if left_to_ai(response.group_id, ai_fraction):
                    with tally.lock:
                        tally.left_to_ai += 1
                    ticket = next(tickets)
                    continue
                order = preference.rank([c.text for c in response.completions], rng)
                feedback.SubmitRanking(feedback_pb2.SubmitRankingRequest(
                    group_id=response.group_id, completion_ids=[response.completions[i].completion_id for i in order],
                    annotator_id=user.name, idempotency_key=f"{response.group_id}:{user.name}"),
                    timeout=60, metadata=user.metadata)
            except grpc.RpcError as exc:
                with tally.lock:
                    tally.errors.append(f"{exc.code().name}: {exc.details()}")
                time.sleep(1.0)
                continue
            with tally.lock:
                tally.rankings += 1
            ticket = next(tickets)

    threads = [threading.Thread(target=run, args=(i, u), name=u.name, daemon=True) for i, u in enumerate(simulated)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def sample_answers(channel: grpc.Channel, questions: Sequence[str], plan: SamplingPlan, *, seed: int = 12345,
                   parallel: int = 16, metadata: Sequence[tuple[str, str]] = ()
                   ) -> tuple[dict[str, list[str]], set[int]]:
    """Answers to every question (seeded, so two policies face the same draws), and the policy
    versions that produced them. ``parallel`` requests at a time, so the server batches them.
    Evaluation traffic: the server stores none of it, so neither the reward model nor PPO (whose
    prompts are the stored groups' prompts) ever trains on these questions."""
    from concurrent.futures import ThreadPoolExecutor

    inference = rpc.InferenceStub(channel)
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="sample") as pool:
        responses = list(pool.map(lambda item: sample(inference, item[1], plan, seed + item[0], metadata,
                                                        store=False),
                                  enumerate(questions)))
    answers = {q: [c.text for c in r.completions] for q, r in zip(questions, responses)}
    return answers, {r.policy_version for r in responses}
