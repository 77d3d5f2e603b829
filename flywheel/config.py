"""Typed configuration of every Flywheel process: one dataclass per component, composed into
``FlywheelConfig``, filled from defaults, ``FLYWHEEL_*`` environment variables and command-line
flags, in that order of precedence (flags win).

A section declares its ``prefix``; its field ``x`` is the setting ``{prefix}x``, read from
``FLYWHEEL_{PREFIX}X`` and set with ``--{prefix}x`` (``PolicyRunConfig.kl_coef`` is
``FLYWHEEL_POLICY_KL_COEF`` / ``--policy-kl-coef``). A command offers the flags of the sections
it uses (``add_config_flags(parser, FlywheelConfig, ServingConfig)``); every process reads the
whole environment, so a setting without a flag on that command still applies. Secrets have no
flag at all (flags show in ``ps``).

Values are read and checked when a section is made (``__post_init__``): a string is converted to
the field's type, an enum must be one of its ``Literal`` values, a number must lie in its range,
and the error names the variable and the flag to fix. A process with a bad setting stops at
start instead of failing later in the middle of a request or a run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Mapping

ENV_PREFIX = "FLYWHEEL_"

# the spellings flywheel.models.resolve_dtype reads
Dtype = Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
# compute dtypes of the policy (training.policy_model) and of the reward model (training.reward_model)
PolicyAutocast = Literal["auto", "bfloat16", "bf16", "float32", "fp32"]
RewardModelPooling = Literal["last", "last+mean", "last+layer-means"]
RewardLength = Literal["neutral", "learned"]  # training.policy_reward: whether PPO is paid for length
RewardModelAutocast = Literal["auto", "bfloat16", "bf16", "float16", "float32", "fp32"]
AuthMode = Literal["on", "off"]
Quantize = Literal["none", "int8", "int4"]  # serving.quantize
JudgeCombineOrders = Literal["log_odds", "probability"]
JudgeApi = Literal["chat", "completions"]
Finetune = Literal["lora", "full"]
AdvantageEstimator = Literal["gae", "rloo"]
RedisAppendFsync = Literal["always", "everysec"]

MAX_PORT = 65535


def setting(default: Any, help: str, *, minimum: float | None = None, above: float | None = None,
            maximum: float | None = None, flag: bool = True) -> Any:
    """A field that is a setting: its help text, its range (``minimum``/``maximum`` inclusive,
    ``above`` exclusive) and whether a command line may set it (``flag=False``: secrets, read from
    the environment only)."""
    return field(default=default, metadata={"help": help, "minimum": minimum, "above": above, "maximum": maximum,
                                            "flag": flag})


def port(default: int, help: str) -> Any:
    return setting(default, help, minimum=0, maximum=MAX_PORT)


class ConfigSection:
    """Base of every section: converts and checks its fields when made. A subclass adds its checks
    across fields in its own ``__post_init__`` after calling this one."""

    prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _type_hints(type(self))
        for f in setting_fields(type(self)):
            name = self.prefix + f.name
            where = "set by " + describe_setting(name, f.metadata["flag"])
            value = _coerce(getattr(self, f.name), hints[f.name], name, where)
            _check_range(value, f, name, where)
            setattr(self, f.name, value)

    @classmethod
    def describe(cls, name: str) -> str:
        """How an operator sets the field ``name``: its variable, and its flag where it has one."""
        return describe_setting(cls.prefix + name, _field(cls, name).metadata["flag"])


@dataclass
class ServingConfig(ConfigSection):
    """The gRPC server and its engine: what one serving process accepts and how much it batches."""

    metrics_port: int = port(9400, "HTTP port of /metrics; 0 = disabled")
    max_batch_sequences: int = setting(64, "most sequences decoded together in one engine step", minimum=1)
    max_queued_requests: int = setting(
        256, "requests waiting for a batch slot before RESOURCE_EXHAUSTED", minimum=0)
    max_new_tokens_limit: int = setting(1024, "largest max_new_tokens a request may ask", minimum=1)
    default_max_new_tokens: int = setting(
        128, "max_new_tokens of a request that does not set it (a request's explicit 0 is refused)", minimum=1)
    max_samples: int = setting(16, "largest n a request may ask", minimum=1)
    grpc_workers: int = setting(
        64, "threads running the Feedback and Admin handlers (Inference requests wait without a thread, up to "
            "max_queued_requests)", minimum=1)
    grpc_open_rpcs: int = setting(
        256, "most keyless health/reflection calls (Watch streams included) open at once; RESOURCE_EXHAUSTED "
             "beyond (they never take what keyed calls need)", minimum=1)
    policy_poll_seconds: float = setting(
        5.0, "how often a server re-checks the policy pointer besides pub/sub", above=0)
    max_prompt_tokens: int = setting(4096, "longest prompt (in tokens) a request may send", minimum=1)
    prefill_chunk_tokens: int = setting(
        512, "a longer prompt is prefilled in chunks of about this many tokens, one per engine step, the running "
             "streams decoding between them (0 = whole prompts, or at least 32)", minimum=0)
    quantize: Quantize = setting(
        "none", "weights the engine decodes small batches (up to 8 rows) from: none, int8 (per output channel) or "
                "int4 (groups of 32, as llama.cpp's Q4_1); prefills and larger batches keep the model's own weights "
                "(CPU only)")
    max_cache_mib: int = setting(
        2048, "memory the running batches' key/value caches may take (MiB; a left-padded batch takes rows x its "
              "widest prompt + max_new_tokens): a request waits for it as for a batch slot; 0 = no bound", minimum=0)
    # -1 is gRPC's "no limit"
    grpc_max_receive_message_bytes: int = setting(
        8 * 1024 * 1024, "largest gRPC message the server accepts (RESOURCE_EXHAUSTED above)", minimum=-1)
    grpc_max_send_message_bytes: int = setting(
        32 * 1024 * 1024, "largest gRPC message the server sends", minimum=-1)
    # off by default: a new port is a new surface an operator opens on purpose, and replicas or
    # test servers on one host would all collide on a fixed default
    http_port: int = port(
        0, "port of the OpenAI-compatible HTTP API and the ranking page (same host as gRPC); 0 = off")
    http_workers: int = setting(64, "HTTP requests handled at once (503 beyond)", minimum=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if 0 < self.prefill_chunk_tokens < 32:  # serving.engine.PREFILL_CHUNK_MIN: a chunk carries a cache block on
            raise ValueError(f"prefill_chunk_tokens ({self.describe('prefill_chunk_tokens')}) must be 0 or at least "
                             f"32, got {self.prefill_chunk_tokens}")
        if self.max_batch_sequences < self.max_samples:
            # the engine decodes a request's n samples in one batch: a batch smaller than the largest
            # n could never admit such a request (the server used to raise the batch silently)
            raise ValueError(
                f"max_batch_sequences ({self.describe('max_batch_sequences')}) is {self.max_batch_sequences}, "
                f"below max_samples ({self.describe('max_samples')}) {self.max_samples}: a request's n samples "
                f"are decoded in one batch, so raise max_batch_sequences or lower max_samples")


@dataclass
class SecurityConfig(ConfigSection):
    """What the server accepts: API keys, its TLS certificate, the per-key rate limits (see README
    "Security")."""

    auth: AuthMode = setting(
        "on", "on: every RPC but health/reflection needs an API key; off: no keys (warned)")
    api_keys: str = setting(
        "", "keys the server accepts: name:role:KEY or name:role:sha256:HEX, comma-separated "
            "(set it in the environment, not as a flag: flags show in ps)", flag=False)
    api_keys_file: str = setting(
        "", "JSON file of hashed API keys (flywheel keys ...); empty = "
            "DATA_DIR/secrets/api_keys.json, created with a client and an admin key")
    tls_cert: str = setting("", "server: PEM certificate chain; set with tls_key to serve TLS")
    tls_key: str = setting("", "server: PEM private key of tls_cert")
    tls_client_ca: str = setting(
        "", "server: PEM CA bundle; when set, clients must present a certificate it signed")
    client_requests_per_second: float = setting(
        20.0, "per client key: sustained requests per second (kept in Redis); 0 = no limit", minimum=0)
    client_request_burst: int = setting(
        40, "per client key: requests allowed at once above the sustained rate", minimum=0)
    admin_requests_per_second: float = setting(
        5.0, "per admin key: sustained requests per second; 0 = no limit", minimum=0)
    admin_request_burst: int = setting(
        20, "per admin key: requests allowed at once above the sustained rate", minimum=0)


@dataclass
class ClientConfig(ConfigSection):
    """How a CLI client reaches the server: its API key and the TLS it expects."""

    api_key: str = setting(
        "", "the key CLI clients send; empty = DATA_DIR/secrets/client.key or admin.key", flag=False)
    tls_ca: str = setting("", "clients: PEM CA bundle that signed the server's certificate; set = use TLS")
    tls_client_cert: str = setting("", "clients: PEM certificate to present (mutual TLS)")
    tls_client_key: str = setting("", "clients: PEM private key of tls_client_cert")


@dataclass
class FeedbackConfig(ConfigSection):
    """Served groups and the rankings stream."""

    store_groups: bool = setting(
        True, "store served groups in Redis and serve the Feedback API on the same port")
    group_ttl_seconds: int = setting(7 * 24 * 3600, "how long served groups stay rankable", minimum=1)
    group_max_memory_fraction: float = setting(
        0.9, "a served group is not stored while Redis uses more than this fraction of its maxmemory (the rest "
             "is kept for rankings, registries, run locks and the Celery broker)", above=0, maximum=1)
    rankings_claim_idle_seconds: float = setting(
        300.0, "a ranking pending this long with a consumer is reclaimed by a reader without a run lock "
               "(a run under its fenced lock reclaims a dead run's at once)", minimum=0)


@dataclass
class JudgeModelConfig(ConfigSection):
    """The AI labeler's judge: which model, which principles, how its prompts are cut and batched."""

    prefix: ClassVar[str] = "judge_"

    model: str = setting(
        "", "AI labeler's judge: a Hugging Face causal-LM folder (empty = embedded default); with judge_url, "
            "the endpoint's model name (empty = the first one it lists)")
    url: str = setting(
        "", "OpenAI-compatible endpoint of the judge, its base URL as the openai SDK takes it "
            "(http://host:8000/v1: vLLM, TGI, llama.cpp's server, another Flywheel's --http-port); it must return "
            "log-probabilities; empty = the judge model runs in the labelling worker")
    api: JudgeApi = setting(
        "chat", "with judge_url: ask /chat/completions (the endpoint applies its chat template) or /completions")
    api_key: str = setting("", "with judge_url: the endpoint's API key (environment only, never logged)", flag=False)
    api_key_file: str = setting(
        "", "with judge_url: a file holding the endpoint's API key (instead of FLYWHEEL_JUDGE_API_KEY)")
    top_logprobs: int = setting(
        20, "with judge_url: most likely first tokens asked for; a verdict letter outside them gets their floor",
        minimum=1, maximum=20)
    timeout_seconds: float = setting(60.0, "with judge_url: seconds one judge request may take", above=0)
    constitution: str = setting(
        "", "the judge's principles (a text file); empty = the shipped constitution.md")
    max_text_tokens: int = setting(
        384, "prompt and each answer are cut to this many tokens in a judge prompt", minimum=1)
    batch_size: int = setting(8, "judge prompts scored in one forward pass", minimum=1)
    combine_orders: JudgeCombineOrders = setting(
        "log_odds", "average both orders' verdicts in log_odds or probability (Lee et al.)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.url and not self.url.lower().startswith(("http://", "https://")):
            raise ValueError(f"judge_url must be an http(s):// base URL such as http://host:8000/v1; got "
                             f"{self.url!r} (set by {self.describe('url')})")
        if self.api_key and self.api_key_file:
            raise ValueError(f"set the judge's key once: {self.describe('api_key')} or "
                             f"{self.describe('api_key_file')}, not both")

    def endpoint_key(self) -> str:
        """The judge endpoint's API key: the variable, else the file's first line ('' = none)."""
        if self.api_key or not self.api_key_file:
            return self.api_key
        try:
            return Path(self.api_key_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"cannot read the judge's API key file {self.api_key_file} "
                             f"(set by {self.describe('api_key_file')}): {exc.strerror}") from None


@dataclass
class LabellingWorkerConfig(ConfigSection):
    """When groups are AI-ranked, and the labelling worker's own /metrics."""

    prefix: ClassVar[str] = "labelling_"

    delay_seconds: float = setting(
        3600.0, "a group still without a human ranking after this long is AI-ranked", minimum=0)
    fraction: float = setting(
        0.05, "fraction of all groups AI-ranked even when people ranked them (agreement)", minimum=0, maximum=1)
    # 0.1: the pairs in the chosen order average P >= 0.55. The embedded 135M judge is near chance
    # (4 of 6 clear-cut pairs right, confidence ~0.02), so with it nearly every group is skipped,
    # not guessed; configure a stronger judge_model to get AI rankings
    min_confidence: float = setting(
        0.1, "AI rankings below this confidence (0..1) are skipped, not guessed", minimum=0, maximum=1)
    schedule_seconds: float = setting(60.0, "how often celery beat looks for groups to label", above=0)
    retry_seconds: float = setting(
        60.0, "a group the judge could not rank (its endpoint failed) is tried again after this", above=0)
    metrics_port: int = port(9401, "HTTP port of a labelling worker's /metrics; 0 = disabled")


@dataclass
class CeleryConfig(ConfigSection):
    """Redelivery of the labelling and training tasks by the broker."""

    prefix: ClassVar[str] = "task_"

    visibility_timeout_seconds: float = setting(
        6 * 3600.0, "a task whose worker died unacknowledged is delivered again after this (a backstop: a "
                    "killed run is queued again once its lock expires; also how long a queued run's marker lives)",
        above=0)
    restore_interval_seconds: float = setting(
        60.0, "how often a worker looks for such tasks to deliver again", above=0)


@dataclass
class WorkerHealthConfig(ConfigSection):
    """The liveness file every Celery worker keeps fresh, idle or mid-task, and the limit its probe
    (``flywheel worker-alive``) holds it to (``flywheel.worker_heartbeat``)."""

    prefix: ClassVar[str] = "worker_"

    heartbeat_file: str = setting(
        "", "file a Celery worker rewrites every worker_heartbeat_seconds, also while a task runs (on the "
            "container's own disk); empty = none")
    heartbeat_seconds: float = setting(10.0, "how often a worker rewrites its heartbeat file", above=0)
    alive_max_age_seconds: float = setting(
        120.0, "flywheel worker-alive fails once the heartbeat is older than this", above=0)


@dataclass
class TrainingWorkerConfig(ConfigSection):
    """What a training worker serves and watches besides its tasks."""

    prefix: ClassVar[str] = "training_"

    metrics_port: int = port(9402, "HTTP port of a training worker's /metrics; 0 = disabled")
    rerun_check_seconds: float = setting(
        30.0, "how often a training worker looks for a run whose worker died (its lock expired, the run "
              "unfinished) and queues it again; 0 = never", minimum=0)
    max_run_attempts: int = setting(
        3, "a run whose worker died this many times is abandoned (logged), not queued again", minimum=1)


@dataclass
class RewardModelRunConfig(ConfigSection):
    """When a reward-model run starts, what it reads, how it trains and the gate it must pass."""

    prefix: ClassVar[str] = "reward_model_"

    backbone: str = setting(
        "", "HF causal-LM folder of the reward model's backbone; empty = the served model")
    trigger_rankings: int = setting(64, "new rankings that start a reward-model run", minimum=0)
    check_seconds: float = setting(
        30.0, "how often a training worker checks whether enough rankings arrived", minimum=0)
    max_rankings: int = setting(4096, "most new rankings one reward-model run reads from the stream", minimum=1)
    heldout_fraction: float = setting(
        0.1, "share of groups (by a hash of the group id) held out for evaluation", minimum=0, maximum=1)
    max_heldout: int = setting(2000, "most held-out rankings (the newest) evaluated per run", minimum=0)
    accuracy_margin: float = setting(
        0.02, "a new version is promoted unless its held-out accuracy is this much below the current's")
    min_accuracy: float = setting(
        0.5, "gate: the 95% lower bound of each member's held-out accuracy must exceed this (0.5 = chance; "
             "-1 = no check, for tests of the plumbing)", minimum=-1, maximum=1)
    replay_ratio: float = setting(1.0, "replayed older rankings per new ranking in a run", minimum=0)
    ai_weight: float = setting(
        0.5, "largest weight of an AI-labelled ranking relative to a human one; the weight used is this x "
             "clip(2 x AI-human agreement - 1, 0, 1), 0 until reward_model_ai_min_overlap_groups", minimum=0)
    ai_min_overlap_groups: int = setting(
        20, "groups ranked by both a person and the AI labeler before the agreement is trusted (AI weight 0 "
            "before)", minimum=0)
    learning_rate: float = setting(1e-5, "reward-model AdamW learning rate", above=0)
    batch_rankings: int = setting(8, "rankings per reward-model optimizer step", minimum=1)
    epochs: int = setting(1, "passes over a run's rankings", minimum=0)
    linear_probe: bool = setting(
        True, "fit the reward head first by L2 logistic regression on the frozen features, its strength chosen by "
              "cross-validation, then fine-tune for reward_model_epochs from there")
    max_length: int = setting(512, "longest prompt + completion in tokens", minimum=1)
    trainable_layers: int = setting(
        4, "top decoder layers trained with the head; -1 = all parameters", minimum=-1)
    pooling: RewardModelPooling = setting(
        "last+layer-means", "what the reward head reads: last (the last token), last+mean (and the last layer's mean "
                            "over the completion) or last+layer-means (and the completion's means at 7 depths)")
    autocast: RewardModelAutocast = setting(
        "auto", "reward-model compute dtype: bfloat16, float32 or auto (bf16 where native)")
    lock_seconds: float = setting(
        60.0, "TTL of the reward-model run lock (a dead worker frees it after this)", above=0)


@dataclass
class PolicyRunConfig(ConfigSection):
    """A PPO run: the adapters it trains, the PPO hyperparameters, its prompts and its gate."""

    prefix: ClassVar[str] = "policy_"

    train_after_reward_model: bool = setting(True, "enqueue a PPO run whenever a new reward model is promoted")
    finetune: Finetune = setting("lora", "lora (adapters on the frozen base model) or full (every weight)")
    lora_rank: int = setting(16, "LoRA rank of the policy adapters", minimum=1)
    lora_alpha: int = setting(32, "LoRA alpha of the policy adapters", minimum=1)
    lora_layers: int = setting(8, "top decoder layers that get LoRA adapters; -1 = every layer", minimum=-1)
    autocast: PolicyAutocast = setting(
        "auto", "PPO compute dtype: bfloat16, float32 or auto (bf16 where native)")
    iterations: int = setting(4, "PPO iterations (rollout + update) per run", minimum=0)
    batch_size: int = setting(64, "episodes (prompts) per PPO iteration", minimum=1)
    mini_batch_size: int = setting(8, "episodes per PPO optimizer step", minimum=1)
    ppo_epochs: int = setting(4, "passes over an iteration's episodes", minimum=1)
    response_length: int = setting(64, "most tokens of a PPO response", minimum=1)
    temperature: float = setting(1.0, "sampling temperature of PPO rollouts", above=0)
    advantage_estimator: AdvantageEstimator = setting(
        "rloo", "rloo (leave-one-out baselines over samples_per_prompt samples of each prompt, no critic) or gae "
                "(a critic and GAE, as InstructGPT)")
    samples_per_prompt: int = setting(
        4, "responses sampled per prompt in a PPO batch (rloo needs at least 2; batch_size must be a multiple)",
        minimum=1)
    critic_warmup_iterations: int = setting(
        0, "first PPO iterations that train only the value head (gae)", minimum=0)
    reward_length: RewardLength = setting(
        "neutral", "how PPO's reward and the gate treat answer length: neutral (the reward model's length "
        "dependence taken out: paid only for what an answer says) or learned (kept, for a preference about length)")
    missing_eos_penalty: float = setting(
        1.0, "taken off the calibrated reward of a response cut at policy_response_length without an end", minimum=0)
    learning_rate: float = setting(
        5e-4, "PPO AdamW learning rate (of the LoRA adapters: at 1e-4 an update moved the demo's policy by an "
        "approx. KL of 0.001, at 5e-4 by 0.015-0.05, PPO's usual range)", above=0)
    kl_coef: float = setting(0.05, "β: per-token KL penalty to the initial policy", minimum=0)
    kl_target: float = setting(0.0, "adapt β towards this KL per response (nats); 0 = fixed β", minimum=0)
    kl_stop: float = setting(
        6.0, "stop a PPO run at the first rollout whose KL to the initial policy per response exceeds this (nats) "
             "and keep the last iterate within it (the gate refuses candidates past kl_budget); 0 = never", minimum=0)
    ptx_coef: float = setting(
        0.0, "γ of PPO-ptx (language-model loss on the pretraining corpus); 0 = off", minimum=0)
    ptx_corpus: str = setting(
        "", "JSONL {\"text\": ...} pretraining corpus for PPO-ptx; empty = the shipped one")
    heldout_corpus: str = setting("", "JSONL held-out text for the gate's perplexity; empty = the shipped one")
    prompts_file: str = setting("", "JSONL prompts added to the served ones ({\"prompt\": ...} per line)")
    max_prompts: int = setting(4096, "most served prompts (newest) a PPO run reads", minimum=0)
    served_groups: int = setting(
        512, "most served groups (newest) of the version a PPO run starts from whose samples it learns from before "
             "its own rollouts: episodes it need not generate; 0 = none", minimum=0)
    served_rankings: bool = setting(
        True, "reward a served group's samples by the users' own ranking of them where they ranked it, not by the "
              "reward model's estimate of it (the groups the judge member trains on are never PPO episodes)")
    served_epochs: int = setting(1, "PPO passes over the served groups' samples", minimum=1)
    min_prompts: int = setting(8, "skip a PPO run with fewer training prompts", minimum=0)
    heldout_fraction: float = setting(
        0.1, "share of prompts (by a hash of the prompt) held out for the gate", minimum=0, maximum=1)
    max_heldout: int = setting(64, "most held-out prompts the gate evaluates", minimum=0)
    min_reward_gain: float = setting(
        0.0, "gate: the 95% lower bound of the judge member's held-out gain over the current policy must exceed "
             "this (calibrated reward units)")
    gate_samples_per_prompt: int = setting(
        4, "gate: responses per held-out prompt from each policy, paired by seed", minimum=2)
    gate_rankings: int = setting(
        256, "gate: most rankings (the newest human ones of the groups the judge member trains on, which PPO never "
             "learns from) of the users' held-out verdict; 0 = the judge's gain alone decides", minimum=0)
    kl_budget: float = setting(10.0, "gate: most KL to the initial policy per response (nats)", minimum=0)
    perplexity_margin: float = setting(
        0.05, "gate: held-out perplexity may exceed the initial policy's by this fraction")
    lock_seconds: float = setting(60.0, "TTL of the PPO run lock (a dead worker frees it after this)", above=0)
    seed: int | None = setting(
        None, "seed of PPO's sampling and minibatch order; empty = a fresh random seed per run (in the "
              "version's manifest, ppo.seed)", minimum=0)


def section(cls: type[ConfigSection]) -> Any:
    return field(default_factory=cls, metadata={"section": True})


@dataclass
class FlywheelConfig(ConfigSection):
    """Everything an operator may set: what every process shares (the data directory, the model,
    the addresses of the server and of Redis), and one section per component."""

    data_dir: Path = setting(Path(".flywheel"), "where converted models, Redis data and artifacts live")
    model: str = setting("", "a Hugging Face causal-LM folder; empty = embedded SmolLM2-135M-Instruct")
    dtype: Dtype = setting("auto", "float32, bfloat16 or auto (bfloat16 where the device computes it natively)")
    device: str = setting(
        "auto", "where the server and the trainers compute: cpu, cuda, cuda:N or auto (the first GPU where CUDA "
                "sees one, else the CPU)")
    torch_threads: int = setting(0, "torch intra-op threads; 0 = all cores", minimum=0)
    # the server binds it, the CLI clients call it
    grpc_address: str = setting(
        "127.0.0.1:50051", "host:port of the gRPC server: where serve listens and the client commands connect")
    # the feedback stream, group records, registries and the Celery broker
    redis_url: str = setting("", "redis://... of a Redis 6.2+; empty = start an embedded redis-server")
    # the embedded redis-server only (an external Redis is configured where it runs; README "Redis")
    redis_max_memory_mb: int = setting(
        2048, "embedded redis-server: maxmemory in MiB, with noeviction (writes are refused above it, nothing "
              "is evicted); 0 = unbounded", minimum=0)
    redis_appendfsync: RedisAppendFsync = setting(
        "always", "embedded redis-server: always = the AOF is fsynced before a write is acknowledged; everysec = "
                  "a host crash may lose the last second of acknowledged rankings and registry changes")

    serving: ServingConfig = section(ServingConfig)
    security: SecurityConfig = section(SecurityConfig)
    client: ClientConfig = section(ClientConfig)
    feedback: FeedbackConfig = section(FeedbackConfig)
    judge: JudgeModelConfig = section(JudgeModelConfig)
    labelling: LabellingWorkerConfig = section(LabellingWorkerConfig)
    celery: CeleryConfig = section(CeleryConfig)
    worker: WorkerHealthConfig = section(WorkerHealthConfig)
    training: TrainingWorkerConfig = section(TrainingWorkerConfig)
    reward_model: RewardModelRunConfig = section(RewardModelRunConfig)
    policy: PolicyRunConfig = section(PolicyRunConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        device = self.device.strip().lower()
        if not (device in ("auto", "cpu") or device == "cuda" or device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r} "
                             f"(set by {self.describe('device')})")
        self.device = device
        if device.startswith("cuda") and self.serving.quantize != "none":
            raise ValueError(f"quantize {self.serving.quantize!r} runs on the CPU only; the device is "
                             f"{device!r} (set by {ServingConfig.describe('quantize')} and {self.describe('device')})")

    @classmethod
    def sections(cls) -> list[type[ConfigSection]]:
        """The root's own settings first (as a section), then every component's section."""
        return [cls, *(_type_hints(cls)[f.name] for f in dataclasses.fields(cls) if f.metadata.get("section"))]

    @classmethod
    def setting_names(cls) -> list[str]:
        """Every setting: ``FLYWHEEL_`` + the name in upper case is its variable."""
        return [s.prefix + f.name for s in cls.sections() for f in setting_fields(s)]

    @classmethod
    def load(cls, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None) -> "FlywheelConfig":
        """Defaults, then the environment, then ``overrides`` by setting name (values that are None
        are ignored: a flag left unset)."""
        environ = os.environ if environ is None else environ
        overrides = {name: value for name, value in (overrides or {}).items() if value is not None}
        unknown = set(overrides) - set(cls.setting_names())
        if unknown:
            raise ValueError(f"no such setting: {', '.join(sorted(unknown))}")

        def values(section_cls: type[ConfigSection]) -> dict[str, Any]:
            found = {}
            for f in setting_fields(section_cls):
                name = section_cls.prefix + f.name
                if name in overrides:
                    found[f.name] = overrides[name]
                elif (raw := environ.get(env_name(name))) is not None:
                    found[f.name] = raw
            return found

        nested = {f.name: _type_hints(cls)[f.name](**values(_type_hints(cls)[f.name]))
                  for f in dataclasses.fields(cls) if f.metadata.get("section")}
        return cls(**values(cls), **nested)

    def environment(self) -> dict[str, str]:
        """Every setting as the ``FLYWHEEL_*`` variable that gives a child process the same config."""
        env = {}
        for f in dataclasses.fields(self):
            part = getattr(self, f.name)
            if f.metadata.get("section"):
                env.update({env_name(part.prefix + g.name): _env_text(getattr(part, g.name))
                            for g in setting_fields(type(part))})
            else:
                env[env_name(f.name)] = _env_text(part)
        return env


# ---- flags ----

def add_config_flags(parser: argparse.ArgumentParser, *sections: type[ConfigSection]) -> None:
    """Add a ``--x`` flag for every setting of ``sections`` (``FlywheelConfig``: the root's own
    settings, not its sections) but the secrets; their help names the environment variable."""
    for section_cls in sections:
        for f in setting_fields(section_cls):
            if not f.metadata["flag"]:
                continue
            name = section_cls.prefix + f.name
            text = f"{f.metadata['help']} (env {env_name(name)}, default {f.default})"
            # argparse formats help with %: a literal one ("95% lower bound") must be doubled
            parser.add_argument(flag_name(name), dest=name, default=None, help=text.replace("%", "%%"))


def config_from_args(args: argparse.Namespace) -> FlywheelConfig:
    """The config of a command: its flags over the environment over the defaults."""
    return FlywheelConfig.load({name: getattr(args, name, None) for name in FlywheelConfig.setting_names()})


# ---- names ----

def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def describe_setting(name: str, has_flag: bool = True) -> str:
    return f"{env_name(name)} or {flag_name(name)}" if has_flag else env_name(name)


def setting_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of ``cls`` that are settings (not the root's sections)."""
    return [f for f in dataclasses.fields(cls) if "help" in f.metadata]


def _field(cls: type, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(cls) if f.name == name)


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


# ---- reading and checking one value ----

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _coerce(value: Any, kind: Any, name: str, where: str) -> Any:
    """``value`` (a string from the environment or a flag, or already typed) as ``kind``."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):  # X | None: empty means None
        if value is None or value == "":
            return None
        (kind,) = [k for k in typing.get_args(kind) if k is not type(None)]
        origin = typing.get_origin(kind)
    if origin is Literal:
        choices = typing.get_args(kind)
        # matched regardless of case (resolve_dtype has always lower-cased the dtype)
        for choice in choices:
            if str(value).lower() == choice.lower():
                return choice
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r} ({where})")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"{name}: cannot read {value!r} as a yes/no ({where})")
        return text in TRUE_WORDS
    if isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: cannot read {value!r} as {kind.__name__} ({where})") from exc


def _check_range(value: Any, f: dataclasses.Field, name: str, where: str) -> None:
    if value is None or isinstance(value, (bool, str, Path)):
        return
    if value != value:
        raise ValueError(f"{name} must be a number; got {value!r} ({where})")
    low, above, high = f.metadata["minimum"], f.metadata["above"], f.metadata["maximum"]
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {low}; got {value!r} ({where})")
    if above is not None and value <= above:
        raise ValueError(f"{name} must be above {above}; got {value!r} ({where})")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {high}; got {value!r} ({where})")


def _env_text(value: Any) -> str:
    return "" if value is None else str(value)
