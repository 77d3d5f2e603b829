"""One typed settings object for every process, filled from defaults, ``FLYWHEEL_*`` environment
variables and command-line flags, in that order of precedence (flags win)."""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path

ENV_PREFIX = "FLYWHEEL_"


@dataclass
class Settings:
    """Everything an operator may set. Each field ``x`` is read from ``FLYWHEEL_X``."""

    data_dir: Path = field(
        default=Path(".flywheel"),
        metadata={"help": "where converted models, Redis data and artifacts live"},
    )
    model: str = field(
        default="",
        metadata={"help": "a Hugging Face causal-LM folder; empty = embedded SmolLM2-135M-Instruct"},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "float32, bfloat16 or auto (bfloat16 where the CPU computes it natively)"},
    )
    torch_threads: int = field(default=0, metadata={"help": "torch intra-op threads; 0 = all cores"})
    grpc_address: str = field(default="127.0.0.1:50051", metadata={"help": "host:port the gRPC server binds"})
    metrics_port: int = field(default=9400, metadata={"help": "HTTP port of /metrics; 0 = disabled"})
    max_batch_sequences: int = field(
        default=64, metadata={"help": "most sequences decoded together in one engine step"}
    )
    max_queued_requests: int = field(
        default=256, metadata={"help": "requests waiting for a batch slot before RESOURCE_EXHAUSTED"}
    )
    max_new_tokens_limit: int = field(default=1024, metadata={"help": "largest max_new_tokens a request may ask"})
    default_max_new_tokens: int = field(default=128, metadata={"help": "max_new_tokens when a request leaves it 0"})
    max_samples: int = field(default=16, metadata={"help": "largest n a request may ask"})
    grpc_workers: int = field(default=64, metadata={"help": "gRPC handler threads (concurrent RPCs)"})
    policy_poll_seconds: float = field(
        default=5.0, metadata={"help": "how often a server re-checks the policy pointer besides pub/sub"}
    )
    max_prompt_tokens: int = field(default=4096, metadata={"help": "longest prompt (in tokens) a request may send"})
    grpc_max_receive_message_bytes: int = field(
        default=8 * 1024 * 1024, metadata={"help": "largest gRPC message the server accepts (RESOURCE_EXHAUSTED above)"})
    grpc_max_send_message_bytes: int = field(
        default=32 * 1024 * 1024, metadata={"help": "largest gRPC message the server sends"})

    # ---- security: API keys, TLS, rate limits (see README "Security") ----
    auth: str = field(
        default="on", metadata={"help": "on: every RPC but health/reflection needs an API key; off: no keys (warned)"})
    api_keys: str = field(
        default="", metadata={"help": "keys the server accepts: name:role:KEY or name:role:sha256:HEX, comma-separated "
                                      "(set it in the environment, not as a flag: flags show in ps)"})
    api_keys_file: str = field(
        default="", metadata={"help": "JSON file of hashed API keys (flywheel keys ...); empty = "
                                      "DATA_DIR/secrets/api_keys.json, created with a client and an admin key"})
    api_key: str = field(
        default="", metadata={"help": "the key CLI clients send; empty = DATA_DIR/secrets/client.key or admin.key"})
    tls_cert: str = field(default="", metadata={"help": "server: PEM certificate chain; set with tls_key to serve TLS"})
    tls_key: str = field(default="", metadata={"help": "server: PEM private key of tls_cert"})
    tls_client_ca: str = field(
        default="", metadata={"help": "server: PEM CA bundle; when set, clients must present a certificate it signed"})
    tls_ca: str = field(
        default="", metadata={"help": "clients: PEM CA bundle that signed the server's certificate; set = use TLS"})
    tls_client_cert: str = field(default="", metadata={"help": "clients: PEM certificate to present (mutual TLS)"})
    tls_client_key: str = field(default="", metadata={"help": "clients: PEM private key of tls_client_cert"})
    client_requests_per_second: float = field(
        default=20.0, metadata={"help": "per client key: sustained requests per second (kept in Redis); 0 = no limit"})
    client_request_burst: int = field(
        default=40, metadata={"help": "per client key: requests allowed at once above the sustained rate"})
    admin_requests_per_second: float = field(
        default=5.0, metadata={"help": "per admin key: sustained requests per second; 0 = no limit"})
    admin_request_burst: int = field(
        default=20, metadata={"help": "per admin key: requests allowed at once above the sustained rate"})

    # ---- Redis (feedback stream, group records, registries, Celery broker) ----
    redis_url: str = field(
        default="", metadata={"help": "redis://... of a Redis 6.2+; empty = start an embedded redis-server"}
    )

    # ---- feedback ----
    store_groups: bool = field(
        default=True, metadata={"help": "store served groups in Redis and serve the Feedback API on the same port"}
    )
    group_ttl_seconds: int = field(default=7 * 24 * 3600, metadata={"help": "how long served groups stay rankable"})
    rankings_claim_idle_seconds: float = field(
        default=300.0, metadata={"help": "a ranking pending this long with a consumer is reclaimed by another"})
    judge_model: str = field(
        default="", metadata={"help": "AI labeler's judge: a Hugging Face causal-LM folder; empty = embedded default"})
    judge_constitution: str = field(
        default="", metadata={"help": "the judge's principles (a text file); empty = the shipped constitution.md"})
    judge_max_text_tokens: int = field(
        default=384, metadata={"help": "prompt and each answer are cut to this many tokens in a judge prompt"})
    judge_batch_size: int = field(default=8, metadata={"help": "judge prompts scored in one forward pass"})
    judge_combine_orders: str = field(
        default="log_odds", metadata={"help": "average both orders' verdicts in log_odds or probability (Lee et al.)"})
    labelling_delay_seconds: float = field(
        default=3600.0, metadata={"help": "a group still without a human ranking after this long is AI-ranked"})
    labelling_fraction: float = field(
        default=0.05, metadata={"help": "fraction of all groups AI-ranked even when people ranked them (agreement)"})
    # 0.1: the pairs in the chosen order average P >= 0.55. The embedded 135M judge is near chance
    # (4 of 6 clear-cut pairs right, confidence ~0.02), so with it nearly every group is skipped,
    # not guessed; configure a stronger judge_model to get AI rankings
    labelling_min_confidence: float = field(
        default=0.1, metadata={"help": "AI rankings below this confidence (0..1) are skipped, not guessed"})
    labelling_schedule_seconds: float = field(
        default=60.0, metadata={"help": "how often celery beat looks for groups to label"})
    labelling_metrics_port: int = field(
        default=9401, metadata={"help": "HTTP port of a labelling worker's /metrics; 0 = disabled"})

    # ---- Celery (labelling and training tasks) ----
    task_visibility_timeout_seconds: float = field(
        default=6 * 3600.0,
        metadata={"help": "a task whose worker died unacknowledged is delivered again after this (longer than any run)"})
    task_restore_interval_seconds: float = field(
        default=60.0, metadata={"help": "how often a worker looks for such tasks to deliver again"})

    # ---- training ----
    training_metrics_port: int = field(
        default=9402, metadata={"help": "HTTP port of a training worker's /metrics; 0 = disabled"})
    reward_model_backbone: str = field(
        default="", metadata={"help": "HF causal-LM folder of the reward model's backbone; empty = the served model"})
    reward_model_trigger_rankings: int = field(
        default=64, metadata={"help": "new rankings that start a reward-model run"})
    reward_model_check_seconds: float = field(
        default=30.0, metadata={"help": "how often a training worker checks whether enough rankings arrived"})
    reward_model_max_rankings: int = field(
        default=4096, metadata={"help": "most new rankings one reward-model run reads from the stream"})
    reward_model_heldout_fraction: float = field(
        default=0.1, metadata={"help": "share of groups (by a hash of the group id) held out for evaluation"})
    reward_model_max_heldout: int = field(
        default=2000, metadata={"help": "most held-out rankings (the newest) evaluated per run"})
    reward_model_accuracy_margin: float = field(
        default=0.02, metadata={"help": "a new version is promoted unless its held-out accuracy is this much below the current's"})
    reward_model_replay_ratio: float = field(
        default=1.0, metadata={"help": "replayed older rankings per new ranking in a run"})
    reward_model_ai_weight: float = field(
        default=0.5, metadata={"help": "weight of an AI-labelled ranking relative to a human one"})
    reward_model_learning_rate: float = field(default=1e-5, metadata={"help": "reward-model AdamW learning rate"})
    reward_model_batch_rankings: int = field(default=8, metadata={"help": "rankings per reward-model optimizer step"})
    reward_model_epochs: int = field(default=1, metadata={"help": "passes over a run's rankings"})
    reward_model_max_length: int = field(default=512, metadata={"help": "longest prompt + completion in tokens"})
    reward_model_trainable_layers: int = field(
        default=4, metadata={"help": "top decoder layers trained with the head; -1 = all parameters"})
    reward_model_autocast: str = field(
        default="auto", metadata={"help": "reward-model compute dtype: bfloat16, float32 or auto (bf16 where native)"})
    reward_model_lock_seconds: float = field(
        default=60.0, metadata={"help": "TTL of the reward-model run lock (a dead worker frees it after this)"})
    # PPO
    policy_train_after_reward_model: bool = field(
        default=True, metadata={"help": "enqueue a PPO run whenever a new reward model is promoted"})
    policy_finetune: str = field(
        default="lora", metadata={"help": "lora (adapters on the frozen base model) or full (every weight)"})
    policy_lora_rank: int = field(default=16, metadata={"help": "LoRA rank of the policy adapters"})
    policy_lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha of the policy adapters"})
    policy_lora_layers: int = field(
        default=8, metadata={"help": "top decoder layers that get LoRA adapters; -1 = every layer"})
    policy_autocast: str = field(
        default="auto", metadata={"help": "PPO compute dtype: bfloat16, float32 or auto (bf16 where native)"})
    policy_iterations: int = field(default=4, metadata={"help": "PPO iterations (rollout + update) per run"})
    policy_batch_size: int = field(default=64, metadata={"help": "episodes (prompts) per PPO iteration"})
    policy_mini_batch_size: int = field(default=8, metadata={"help": "episodes per PPO optimizer step"})
    policy_ppo_epochs: int = field(default=4, metadata={"help": "passes over an iteration's episodes"})
    policy_response_length: int = field(default=64, metadata={"help": "most tokens of a PPO response"})
    policy_temperature: float = field(default=1.0, metadata={"help": "sampling temperature of PPO rollouts"})
    policy_learning_rate: float = field(default=1e-4, metadata={"help": "PPO AdamW learning rate"})
    policy_kl_coef: float = field(default=0.05, metadata={"help": "β: per-token KL penalty to the initial policy"})
    policy_kl_target: float = field(
        default=0.0, metadata={"help": "adapt β towards this KL per response (nats); 0 = fixed β"})
    policy_ptx_coef: float = field(
        default=0.0, metadata={"help": "γ of PPO-ptx (language-model loss on the pretraining corpus); 0 = off"})
    policy_ptx_corpus: str = field(
        default="", metadata={"help": "JSONL {\"text\": ...} pretraining corpus for PPO-ptx; empty = the shipped one"})
    policy_heldout_corpus: str = field(
        default="", metadata={"help": "JSONL held-out text for the gate's perplexity; empty = the shipped one"})
    policy_prompts_file: str = field(
        default="", metadata={"help": "JSONL prompts added to the served ones ({\"prompt\": ...} per line)"})
    policy_max_prompts: int = field(default=4096, metadata={"help": "most served prompts (newest) a PPO run reads"})
    policy_min_prompts: int = field(default=8, metadata={"help": "skip a PPO run with fewer training prompts"})
    policy_heldout_fraction: float = field(
        default=0.1, metadata={"help": "share of prompts (by a hash of the prompt) held out for the gate"})
    policy_max_heldout: int = field(default=64, metadata={"help": "most held-out prompts the gate evaluates"})
    policy_min_reward_gain: float = field(
        default=0.0, metadata={"help": "gate: least held-out reward-model score gain over the current policy"})
    policy_kl_budget: float = field(
        default=10.0, metadata={"help": "gate: most KL to the initial policy per response (nats)"})
    policy_perplexity_margin: float = field(
        default=0.05, metadata={"help": "gate: held-out perplexity may exceed the initial policy's by this fraction"})
    policy_lock_seconds: float = field(
        default=60.0, metadata={"help": "TTL of the PPO run lock (a dead worker frees it after this)"})

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def load(cls, overrides: dict[str, typing.Any] | None = None, environ: typing.Mapping[str, str] | None = None) -> "Settings":
        """Defaults, then the environment, then ``overrides`` (values that are None are ignored)."""
        environ = os.environ if environ is None else environ
        hints = typing.get_type_hints(cls)
        values: dict[str, typing.Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _coerce(raw, hints[f.name], ENV_PREFIX + f.name.upper())
        for name, value in (overrides or {}).items():
            if value is not None and name in hints:
                values[name] = _coerce(value, hints[name], "--" + name.replace("_", "-"))
        return cls(**values)


def _coerce(value: typing.Any, kind: typing.Any, source: str) -> typing.Any:
    if isinstance(value, kind if isinstance(kind, type) else ()):
        return value
    try:
        if kind is bool:
            text = str(value).strip().lower()
            if text not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(value)
            return text in ("1", "true", "yes", "on")
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{source}: cannot read {value!r} as {getattr(kind, '__name__', kind)}") from exc
