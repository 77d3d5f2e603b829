"""Every Redis key, key prefix, stream, channel and consumer-group name of Flywheel.

Servers, feedback, the labeler, the trainers and the operator commands share one Redis, so each
name is written here once and imported everywhere else. These strings are the wire format:
changing one strands the data stored under the old name.
"""

from __future__ import annotations

from flywheel.contracts.artifacts import POLICY_KIND, REWARD_MODEL_KIND

# ---- served groups (flywheel.group_store) ----
GROUP_KEY_PREFIX = "flywheel:group:"  # + group id: the group record's JSON, with the group TTL
GROUP_KEY_PATTERN = GROUP_KEY_PREFIX + "*"  # SCAN match of every stored group
# group ids by creation time (score = unix seconds) that the labelling scheduler has not decided yet
LABELLING_CANDIDATES_KEY = "flywheel:labelling:candidates"

# ---- the rankings stream (flywheel.rankings_stream) ----
RANKINGS_STREAM = "flywheel:rankings"
DEAD_LETTER_STREAM = "flywheel:rankings:dead"  # entries a consumer could not use, with why (never a silent XACK)
IDEMPOTENCY_KEY_PREFIX = "flywheel:rankings:idempotency:"  # + source + ":" + the caller's key
RANKINGS_STATS_KEY = "flywheel:rankings:stats"  # hash of counters: rankings:{source}, agreement:pairs, agreement:agreed
GROUP_RANKINGS_KEY_PREFIX = "flywheel:group-rankings:"  # + group id: hash source -> latest ranking (JSON ids)
GROUP_ANNOTATORS_KEY_PREFIX = "flywheel:group-annotators:"  # + group id: set of people who ranked it
REWARD_MODEL_CONSUMER_GROUP = "reward-model"  # the reward-model trainer's consumer group

# ---- training ----
RUN_LOCK_KEY_PREFIX = "flywheel:lock:"  # + kind: one run of that kind at a time (flywheel.run_lock)
# the run ledger (flywheel.run_ledger): what is queued, what runs, what finished
RUN_QUEUED_KEY_PREFIX = "flywheel:queued:"  # + kind: the task id of the run of that kind waiting in the queue
RUN_DONE_KEY_PREFIX = "flywheel:run-done:"  # + task id: that run finished (a later delivery of it is a no-op)

# ---- the version registries (flywheel.registry) ----
REGISTRY_KEY_PREFIX = "flywheel:registry:"  # + kind: the pub/sub channel; + kind + ":versions" etc.

# ---- serving ----
RATE_LIMIT_KEY_PREFIX = "flywheel:ratelimit:"  # + API key name: the key's GCRA arrival time


def group_key(group_id: str) -> str:
    return GROUP_KEY_PREFIX + group_id


def group_rankings_key(group_id: str) -> str:
    return GROUP_RANKINGS_KEY_PREFIX + group_id


def group_annotators_key(group_id: str) -> str:
    return GROUP_ANNOTATORS_KEY_PREFIX + group_id


def idempotency_key(source: str, key: str) -> str:
    """Keys live per source, so no client key can collide with (or pre-empt) the labeler's."""
    return f"{IDEMPOTENCY_KEY_PREFIX}{source}:{key}"


def rate_limit_key(key_name: str) -> str:
    return RATE_LIMIT_KEY_PREFIX + key_name


def run_lock_key(kind: str) -> str:
    return RUN_LOCK_KEY_PREFIX + kind


POLICY_RUN_LOCK_KEY = run_lock_key(POLICY_KIND)
REWARD_MODEL_RUN_LOCK_KEY = run_lock_key(REWARD_MODEL_KIND)


def registry_channel(kind: str) -> str:
    """The pub/sub channel on which every change of ``kind``'s registry is announced."""
    return REGISTRY_KEY_PREFIX + kind


def registry_versions_key(kind: str) -> str:
    """Hash: version number -> manifest JSON."""
    return f"{REGISTRY_KEY_PREFIX}{kind}:versions"


def registry_current_key(kind: str) -> str:
    """``kind``'s current version number (absent = none)."""
    return f"{REGISTRY_KEY_PREFIX}{kind}:current"


def registry_next_key(kind: str) -> str:
    """The version allocator (INCR)."""
    return f"{REGISTRY_KEY_PREFIX}{kind}:next"


def registry_audit_key(kind: str) -> str:
    """Stream of every change: action, who, when, from, to, why."""
    return f"{REGISTRY_KEY_PREFIX}{kind}:audit"


def registry_frozen_key(kind: str) -> str:
    """Set by a rollback (JSON: who, why, at, version): automatic promotion of ``kind`` is paused."""
    return f"{REGISTRY_KEY_PREFIX}{kind}:frozen"


def run_queued_key(kind: str) -> str:
    """The task id of the ``kind`` run waiting in the queue (set with NX when it is queued, with a
    TTL; cleared when it starts): a trigger never queues a second one."""
    return RUN_QUEUED_KEY_PREFIX + kind


def run_done_key(task_id: str) -> str:
    """Set (with a TTL) when the run of ``task_id`` finished: a later delivery of that task does nothing."""
    return RUN_DONE_KEY_PREFIX + task_id


def run_record_key(lock_key: str) -> str:
    """Hash: the run that took ``lock_key`` (task id, task, kwargs, token, worker, attempt), kept
    until it finishes: a record whose lock expired is a run whose worker died."""
    return lock_key + ":run"


def run_lock_fence_key(lock_key: str) -> str:
    """The fencing-token counter of a run lock (INCR): each holder's token is larger than the last."""
    return lock_key + ":fence"
