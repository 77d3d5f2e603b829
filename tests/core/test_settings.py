"""The typed config: precedence (defaults < environment < flags), reading and checking values with
errors that name the variable, flags derived from the sections a command declares, and the names
and defaults operators rely on (snapshotted: a rename or a changed default fails here)."""

import argparse
import dataclasses
from pathlib import Path

import pytest

from flywheel.app.cli import build_parser
from flywheel.config import (ClientConfig, FlywheelConfig, PolicyRunConfig, ServingConfig, add_config_flags,
                             config_from_args, setting_fields)

# Every variable as `flywheel/settings.py` had it (name: default), before the config was split into
# sections. Renaming one breaks every deployment that sets it.
SETTINGS_BEFORE_SECTIONS = {
    "FLYWHEEL_DATA_DIR": ".flywheel", "FLYWHEEL_MODEL": "", "FLYWHEEL_DTYPE": "auto",
    "FLYWHEEL_TORCH_THREADS": "0", "FLYWHEEL_GRPC_ADDRESS": "127.0.0.1:50051", "FLYWHEEL_METRICS_PORT": "9400",
    "FLYWHEEL_MAX_BATCH_SEQUENCES": "64", "FLYWHEEL_MAX_QUEUED_REQUESTS": "256",
    "FLYWHEEL_MAX_NEW_TOKENS_LIMIT": "1024", "FLYWHEEL_DEFAULT_MAX_NEW_TOKENS": "128",
    "FLYWHEEL_MAX_SAMPLES": "16", "FLYWHEEL_GRPC_WORKERS": "64", "FLYWHEEL_POLICY_POLL_SECONDS": "5.0",
    "FLYWHEEL_MAX_PROMPT_TOKENS": "4096", "FLYWHEEL_GRPC_MAX_RECEIVE_MESSAGE_BYTES": "8388608",
    "FLYWHEEL_GRPC_MAX_SEND_MESSAGE_BYTES": "33554432", "FLYWHEEL_AUTH": "on", "FLYWHEEL_API_KEYS": "",
    "FLYWHEEL_API_KEYS_FILE": "", "FLYWHEEL_API_KEY": "", "FLYWHEEL_TLS_CERT": "", "FLYWHEEL_TLS_KEY": "",
    "FLYWHEEL_TLS_CLIENT_CA": "", "FLYWHEEL_TLS_CA": "", "FLYWHEEL_TLS_CLIENT_CERT": "",
    "FLYWHEEL_TLS_CLIENT_KEY": "", "FLYWHEEL_CLIENT_REQUESTS_PER_SECOND": "20.0",
    "FLYWHEEL_CLIENT_REQUEST_BURST": "40", "FLYWHEEL_ADMIN_REQUESTS_PER_SECOND": "5.0",
    "FLYWHEEL_ADMIN_REQUEST_BURST": "20", "FLYWHEEL_REDIS_URL": "", "FLYWHEEL_STORE_GROUPS": "True",
    "FLYWHEEL_GROUP_TTL_SECONDS": "604800", "FLYWHEEL_RANKINGS_CLAIM_IDLE_SECONDS": "300.0",
    "FLYWHEEL_JUDGE_MODEL": "", "FLYWHEEL_JUDGE_CONSTITUTION": "", "FLYWHEEL_JUDGE_MAX_TEXT_TOKENS": "384",
    "FLYWHEEL_JUDGE_BATCH_SIZE": "8", "FLYWHEEL_JUDGE_COMBINE_ORDERS": "log_odds",
    "FLYWHEEL_LABELLING_DELAY_SECONDS": "3600.0", "FLYWHEEL_LABELLING_FRACTION": "0.05",
    "FLYWHEEL_LABELLING_MIN_CONFIDENCE": "0.1", "FLYWHEEL_LABELLING_SCHEDULE_SECONDS": "60.0",
    "FLYWHEEL_LABELLING_METRICS_PORT": "9401", "FLYWHEEL_TASK_VISIBILITY_TIMEOUT_SECONDS": "21600.0",
    "FLYWHEEL_TASK_RESTORE_INTERVAL_SECONDS": "60.0", "FLYWHEEL_TRAINING_METRICS_PORT": "9402",
    "FLYWHEEL_REWARD_MODEL_BACKBONE": "", "FLYWHEEL_REWARD_MODEL_TRIGGER_RANKINGS": "64",
    "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "30.0", "FLYWHEEL_REWARD_MODEL_MAX_RANKINGS": "4096",
    "FLYWHEEL_REWARD_MODEL_HELDOUT_FRACTION": "0.1", "FLYWHEEL_REWARD_MODEL_MAX_HELDOUT": "2000",
    "FLYWHEEL_REWARD_MODEL_ACCURACY_MARGIN": "0.02", "FLYWHEEL_REWARD_MODEL_REPLAY_RATIO": "1.0",
    "FLYWHEEL_REWARD_MODEL_AI_WEIGHT": "0.5", "FLYWHEEL_REWARD_MODEL_LEARNING_RATE": "1e-05",
    "FLYWHEEL_REWARD_MODEL_BATCH_RANKINGS": "8", "FLYWHEEL_REWARD_MODEL_EPOCHS": "1",
    "FLYWHEEL_REWARD_MODEL_MAX_LENGTH": "512", "FLYWHEEL_REWARD_MODEL_TRAINABLE_LAYERS": "4",
    "FLYWHEEL_REWARD_MODEL_AUTOCAST": "auto", "FLYWHEEL_REWARD_MODEL_LOCK_SECONDS": "60.0",
    "FLYWHEEL_POLICY_TRAIN_AFTER_REWARD_MODEL": "True", "FLYWHEEL_POLICY_FINETUNE": "lora",
    "FLYWHEEL_POLICY_LORA_RANK": "16", "FLYWHEEL_POLICY_LORA_ALPHA": "32", "FLYWHEEL_POLICY_LORA_LAYERS": "8",
    "FLYWHEEL_POLICY_AUTOCAST": "auto", "FLYWHEEL_POLICY_ITERATIONS": "4", "FLYWHEEL_POLICY_BATCH_SIZE": "64",
    "FLYWHEEL_POLICY_MINI_BATCH_SIZE": "8", "FLYWHEEL_POLICY_PPO_EPOCHS": "4",
    "FLYWHEEL_POLICY_RESPONSE_LENGTH": "64", "FLYWHEEL_POLICY_TEMPERATURE": "1.0",
    "FLYWHEEL_POLICY_LEARNING_RATE": "0.0005", "FLYWHEEL_POLICY_KL_COEF": "0.05",
    "FLYWHEEL_POLICY_KL_TARGET": "0.0", "FLYWHEEL_POLICY_PTX_COEF": "0.0", "FLYWHEEL_POLICY_PTX_CORPUS": "",
    "FLYWHEEL_POLICY_HELDOUT_CORPUS": "", "FLYWHEEL_POLICY_PROMPTS_FILE": "",
    "FLYWHEEL_POLICY_MAX_PROMPTS": "4096", "FLYWHEEL_POLICY_MIN_PROMPTS": "8",
    "FLYWHEEL_POLICY_HELDOUT_FRACTION": "0.1", "FLYWHEEL_POLICY_MAX_HELDOUT": "64",
    "FLYWHEEL_POLICY_MIN_REWARD_GAIN": "0.0", "FLYWHEEL_POLICY_KL_BUDGET": "10.0",
    "FLYWHEEL_POLICY_PERPLEXITY_MARGIN": "0.05", "FLYWHEEL_POLICY_LOCK_SECONDS": "60.0",
}
# settings added since (name: default)
SETTINGS_ADDED = {"FLYWHEEL_POLICY_SEED": "", "FLYWHEEL_REWARD_MODEL_POOLING": "last+layer-means", "FLYWHEEL_HTTP_PORT": "0", "FLYWHEEL_HTTP_WORKERS": "64",
                  "FLYWHEEL_REWARD_MODEL_MIN_ACCURACY": "0.5", "FLYWHEEL_POLICY_KL_STOP": "6.0", "FLYWHEEL_POLICY_SERVED_GROUPS": "512",
                  "FLYWHEEL_POLICY_SERVED_RANKINGS": "True", "FLYWHEEL_POLICY_SERVED_EPOCHS": "1",
                  "FLYWHEEL_POLICY_GATE_RANKINGS": "256",
                  "FLYWHEEL_POLICY_ADVANTAGE_ESTIMATOR": "rloo", "FLYWHEEL_POLICY_SAMPLES_PER_PROMPT": "4",
                  "FLYWHEEL_POLICY_CRITIC_WARMUP_ITERATIONS": "0", "FLYWHEEL_POLICY_MISSING_EOS_PENALTY": "1.0",
                  "FLYWHEEL_POLICY_REWARD_LENGTH": "neutral",
                  "FLYWHEEL_POLICY_GATE_SAMPLES_PER_PROMPT": "4",
                  # issue 15: a judge on an OpenAI-compatible endpoint, AI weight by agreement
                  "FLYWHEEL_JUDGE_URL": "", "FLYWHEEL_JUDGE_API": "chat", "FLYWHEEL_JUDGE_API_KEY": "",
                  "FLYWHEEL_JUDGE_API_KEY_FILE": "", "FLYWHEEL_JUDGE_TOP_LOGPROBS": "20",
                  "FLYWHEEL_JUDGE_TIMEOUT_SECONDS": "60.0", "FLYWHEEL_LABELLING_RETRY_SECONDS": "60.0",
                  "FLYWHEEL_REWARD_MODEL_AI_MIN_OVERLAP_GROUPS": "20",
                  # issue 12 items 12-13: the worker's liveness file, the rerun of a killed run
                  "FLYWHEEL_WORKER_HEARTBEAT_FILE": "", "FLYWHEEL_WORKER_HEARTBEAT_SECONDS": "10.0",
                  "FLYWHEEL_WORKER_ALIVE_MAX_AGE_SECONDS": "120.0", "FLYWHEEL_TRAINING_RERUN_CHECK_SECONDS": "30.0",
                  "FLYWHEEL_TRAINING_MAX_RUN_ATTEMPTS": "3",
                  # issue 13: keyless calls bounded apart from keyed traffic
                  "FLYWHEEL_GRPC_OPEN_RPCS": "256",
                  # issue 12 items 7-9: the embedded Redis durable, bounded, groups kept under a share
                  "FLYWHEEL_REDIS_MAX_MEMORY_MB": "2048", "FLYWHEEL_REDIS_APPENDFSYNC": "always",
                  "FLYWHEEL_GROUP_MAX_MEMORY_FRACTION": "0.9",
                  # issue 13: admission by key/value cache memory, quantized decoding of small batches
                  "FLYWHEEL_MAX_CACHE_MIB": "2048", "FLYWHEEL_QUANTIZE": "none",
                  # issue 11: the reward head fitted by a cross-validated linear probe first
                  "FLYWHEEL_REWARD_MODEL_LINEAR_PROBE": "True",
                  # issue 13: long prompts prefilled in chunks between decode steps
                  "FLYWHEEL_PREFILL_CHUNK_TOKENS": "512",
                  # issue 13: the device the server and the trainers compute on
                  "FLYWHEEL_DEVICE": "auto"}

# The flags each command had when every command kept its own list of setting names; a command may
# offer more now (all of its sections'), never fewer.
_CLIENT = ["data_dir", "tls_ca", "tls_client_cert", "tls_client_key"]
_REGISTRY = ["data_dir", "redis_url"]
FLAGS_BEFORE_SECTIONS = {
    ("serve",): ["data_dir", "model", "dtype", "torch_threads", "grpc_address", "metrics_port", "max_batch_sequences",
                 "max_queued_requests", "max_new_tokens_limit", "default_max_new_tokens", "max_samples",
                 "max_prompt_tokens", "grpc_max_receive_message_bytes", "grpc_max_send_message_bytes",
                 "grpc_workers", "redis_url", "group_ttl_seconds", "store_groups", "policy_poll_seconds", "auth",
                 "api_keys_file", "tls_cert", "tls_key", "tls_client_ca", "client_requests_per_second",
                 "client_request_burst", "admin_requests_per_second", "admin_request_burst"],
    ("complete",): _CLIENT,
    ("rank",): ["grpc_address", *_CLIENT],
    ("feedback", "stats"): ["grpc_address", *_CLIENT],
    ("feedback", "schedule"): ["redis_url", "data_dir", "labelling_delay_seconds", "labelling_fraction"],
    ("feedback", "trim"): _REGISTRY,
    ("train", "reward-model"): ["data_dir", "model", "redis_url", "reward_model_backbone", "reward_model_max_rankings",
                                "reward_model_heldout_fraction", "reward_model_accuracy_margin",
                                "reward_model_replay_ratio", "reward_model_ai_weight", "reward_model_learning_rate",
                                "reward_model_batch_rankings", "reward_model_epochs", "reward_model_max_length",
                                "reward_model_trainable_layers", "reward_model_autocast"],
    ("reward-models",): _REGISTRY,
    ("train", "policy"): ["data_dir", "model", "redis_url", "policy_finetune", "policy_iterations",
                          "policy_batch_size", "policy_mini_batch_size", "policy_ppo_epochs", "policy_response_length",
                          "policy_learning_rate", "policy_kl_coef", "policy_kl_target", "policy_ptx_coef",
                          "policy_prompts_file", "policy_heldout_fraction", "policy_min_reward_gain",
                          "policy_kl_budget", "policy_perplexity_margin", "policy_autocast"],
    ("policies",): _REGISTRY,
    ("promote",): _REGISTRY,
    ("rollback",): _REGISTRY,
    ("keys", "create"): ["data_dir", "api_keys_file"],
    ("keys", "list"): ["data_dir", "api_keys_file"],
    ("keys", "revoke"): ["data_dir", "api_keys_file"],
    ("status",): ["grpc_address", "redis_url", *_CLIENT],
    ("up",): ["data_dir", "model", "dtype", "grpc_address", "metrics_port", "redis_url", "labelling_metrics_port",
              "training_metrics_port", "auth", "api_keys_file", "tls_cert", "tls_key", "tls_client_ca"],
}


def command_parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = subparsers.choices[name]
    return parser


def config_flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    names = set(FlywheelConfig.setting_names())
    return {a.dest: a for a in parser._actions if a.dest in names}


# ---- names and defaults ----

def test_every_variable_keeps_its_name_and_default():
    assert FlywheelConfig().environment() == SETTINGS_BEFORE_SECTIONS | SETTINGS_ADDED


def test_every_setting_has_help_a_unique_name_and_its_sections_prefix():
    names = FlywheelConfig.setting_names()
    assert len(names) == len(set(names))
    for section in FlywheelConfig.sections():
        for f in setting_fields(section):
            assert len(f.metadata["help"]) > 10, f"{section.__name__}.{f.name} has no help"
    assert PolicyRunConfig.prefix == "policy_" and "policy_kl_coef" in names
    assert FlywheelConfig().policy.kl_coef == 0.05


def test_every_command_keeps_its_flags_and_their_defaults():
    defaults = FlywheelConfig().environment()
    for path, names in FLAGS_BEFORE_SECTIONS.items():
        flags = config_flags(command_parser(path))
        missing = set(names) - set(flags)
        assert not missing, f"flywheel {' '.join(path)} lost {sorted(missing)}"
        for name in names:
            action = flags[name]
            env = "FLYWHEEL_" + name.upper()
            assert action.option_strings == ["--" + name.replace("_", "-")] and action.default is None
            assert action.help.endswith(f"(env {env}, default {defaults[env]})"), action.help


def test_secrets_have_no_flag():
    for path in FLAGS_BEFORE_SECTIONS:
        flags = config_flags(command_parser(path))
        assert "api_keys" not in flags and "api_key" not in flags and "judge_api_key" not in flags, path


def test_a_command_gets_the_flags_of_the_sections_it_declares():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ServingConfig, ClientConfig)
    assert set(config_flags(parser)) == ({"metrics_port", "max_batch_sequences", "max_queued_requests",
                                          "max_new_tokens_limit", "default_max_new_tokens", "max_samples",
                                          "grpc_workers", "grpc_open_rpcs", "policy_poll_seconds",
                                          "max_prompt_tokens", "prefill_chunk_tokens", "quantize", "max_cache_mib",
                                          "grpc_max_receive_message_bytes", "grpc_max_send_message_bytes",
                                          "http_port", "http_workers", "tls_ca", "tls_client_cert", "tls_client_key"})


# ---- precedence ----

def test_defaults_then_environment_then_flags():
    env = {"FLYWHEEL_MAX_SAMPLES": "8", "FLYWHEEL_DATA_DIR": "/tmp/fw", "FLYWHEEL_DTYPE": "float32",
           "FLYWHEEL_POLICY_KL_COEF": "0.2"}
    config = FlywheelConfig.load({"max_samples": "4", "model": None, "policy_kl_coef": 0.1}, environ=env)
    assert config.serving.max_samples == 4  # the flag wins over the environment
    assert config.policy.kl_coef == 0.1
    assert config.data_dir == Path("/tmp/fw")
    assert config.dtype == "float32"
    assert config.model == ""  # a flag left unset does not override
    assert config.serving.max_batch_sequences == 64  # neither: the default


def test_cli_flags_reach_the_config(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_GRPC_ADDRESS", "127.0.0.1:7000")
    monkeypatch.setenv("FLYWHEEL_POLICY_KL_COEF", "0.5")  # no flag on serve: the environment still applies
    args = build_parser().parse_args(["serve", "--max-batch-sequences", "20", "--dtype", "bfloat16"])
    config = config_from_args(args)
    assert (config.serving.max_batch_sequences, config.dtype, config.grpc_address) == (20, "bfloat16",
                                                                                      "127.0.0.1:7000")
    assert config.policy.kl_coef == 0.5
    args = build_parser().parse_args(["train", "policy", "--policy-kl-coef", "0.25", "--policy-seed", "7"])
    config = config_from_args(args)
    assert (config.policy.kl_coef, config.policy.seed) == (0.25, 7)


def test_environment_gives_a_child_process_the_same_config():
    config = FlywheelConfig.load({"policy_kl_coef": "0.3", "store_groups": "false", "data_dir": "/d"}, environ={})
    assert FlywheelConfig.load(environ=config.environment()) == config
    assert FlywheelConfig.load(environ=FlywheelConfig().environment()).policy.seed is None


def test_values_are_read_as_their_types():
    config = FlywheelConfig.load(environ={"FLYWHEEL_STORE_GROUPS": "off", "FLYWHEEL_POLICY_SEED": "12",
                                          "FLYWHEEL_AUTH": "OFF", "FLYWHEEL_REWARD_MODEL_LEARNING_RATE": "3e-5"})
    assert config.feedback.store_groups is False and config.policy.seed == 12
    assert config.security.auth == "off" and config.reward_model.learning_rate == 3e-5
    assert PolicyRunConfig(kl_coef="0.5").kl_coef == 0.5  # made directly: read the same way


# ---- errors name what to fix ----

@pytest.mark.parametrize("variable, value, problem", [
    ("FLYWHEEL_METRICS_PORT", "lots", "cannot read 'lots' as int"),
    ("FLYWHEEL_STORE_GROUPS", "maybe", "cannot read 'maybe' as a yes/no"),
    ("FLYWHEEL_POLICY_KL_COEF", "much", "cannot read 'much' as float"),
])
def test_a_value_of_the_wrong_type_names_the_variable(variable, value, problem):
    with pytest.raises(ValueError, match=problem) as error:
        FlywheelConfig.load(environ={variable: value})
    assert variable in str(error.value)


@pytest.mark.parametrize("variable, value, problem", [
    ("FLYWHEEL_METRICS_PORT", "70000", "at most 65535"),
    ("FLYWHEEL_GRPC_WORKERS", "0", "at least 1"),
    ("FLYWHEEL_LABELLING_FRACTION", "1.5", "at most 1"),
    ("FLYWHEEL_POLICY_LEARNING_RATE", "0", "above 0"),
    ("FLYWHEEL_REWARD_MODEL_HELDOUT_FRACTION", "nan", "a number"),
    ("FLYWHEEL_DTYPE", "float64", "one of auto, float32"),
    ("FLYWHEEL_AUTH", "no", "auth must be one of on, off"),
    ("FLYWHEEL_POLICY_FINETUNE", "qlora", "one of lora, full"),
    ("FLYWHEEL_JUDGE_COMBINE_ORDERS", "max", "one of log_odds, probability"),
    ("FLYWHEEL_REWARD_MODEL_AUTOCAST", "int8", "one of auto"),
])
def test_a_value_out_of_range_names_the_variable_and_the_flag(variable, value, problem):
    with pytest.raises(ValueError, match=problem) as error:
        FlywheelConfig.load(environ={variable: value})
    flag = "--" + variable.removeprefix("FLYWHEEL_").lower().replace("_", "-")
    assert f"{variable} or {flag}" in str(error.value)


def test_a_secret_is_named_by_its_variable_only():
    assert ClientConfig.describe("api_key") == "FLYWHEEL_API_KEY"
    assert ClientConfig.describe("tls_ca") == "FLYWHEEL_TLS_CA or --tls-ca"


def test_a_batch_smaller_than_the_largest_n_is_refused_at_load():
    # the server used to raise max_batch_sequences to max_samples silently
    with pytest.raises(ValueError, match="FLYWHEEL_MAX_BATCH_SEQUENCES or --max-batch-sequences") as error:
        FlywheelConfig.load({"max_batch_sequences": "8"}, environ={})
    assert "FLYWHEEL_MAX_SAMPLES" in str(error.value)
    assert FlywheelConfig.load({"max_batch_sequences": "4", "max_samples": "4"}, environ={}).serving.max_samples == 4


def test_an_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="no such setting: polcy_kl_coef"):
        FlywheelConfig.load({"polcy_kl_coef": "0.1"}, environ={})


def test_help_explains_each_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "complete" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "FLYWHEEL_MAX_BATCH_SEQUENCES" in capsys.readouterr().out


def test_celery_takes_its_url_and_redelivery_timings_from_the_config(monkeypatch):
    from flywheel.celery_app import make_celery

    monkeypatch.delenv("FLYWHEEL_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-the-environment:6379/0")
    config = FlywheelConfig.load(environ={"FLYWHEEL_REDIS_URL": "redis://:pw@from-settings:6380/1",
                                          "FLYWHEEL_TASK_VISIBILITY_TIMEOUT_SECONDS": "4",
                                          "FLYWHEEL_TASK_RESTORE_INTERVAL_SECONDS": "0.5"})
    app = make_celery(settings=config)  # builds without connecting
    assert app.conf.broker_url == "redis://:pw@from-settings:6380/1"
    assert app.conf.broker_transport_options["visibility_timeout"] == 4
    assert app.conf.broker_transport_options["unacked_restore_interval"] == 0.5
    assert make_celery("redis://explicit:6379/2", config).conf.broker_url == "redis://explicit:6379/2"
    from_environment = make_celery(settings=FlywheelConfig.load(environ={}))
    assert from_environment.conf.broker_url == "redis://from-the-environment:6379/0"


def test_sections_are_plain_dataclasses():
    config = FlywheelConfig()
    assert dataclasses.replace(config, data_dir=Path("/x")).data_dir == Path("/x")
    assert dataclasses.asdict(config)["policy"]["kl_coef"] == 0.05


def test_the_judge_endpoint_key_comes_from_the_environment_or_a_file_and_bad_values_are_named(tmp_path):
    from flywheel.config import JudgeModelConfig

    assert JudgeModelConfig.describe("api_key") == "FLYWHEEL_JUDGE_API_KEY"  # no flag: flags show in ps
    key_file = tmp_path / "judge.key"
    key_file.write_text("sk-judge\n")
    assert FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_API_KEY_FILE": str(key_file)}).judge.endpoint_key() == "sk-judge"
    assert FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_API_KEY": "sk-env"}).judge.endpoint_key() == "sk-env"
    with pytest.raises(ValueError, match="FLYWHEEL_JUDGE_API_KEY_FILE"):
        FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_API_KEY_FILE": str(tmp_path / "missing")}).judge.endpoint_key()
    with pytest.raises(ValueError, match="not both"):
        FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_API_KEY": "a", "FLYWHEEL_JUDGE_API_KEY_FILE": str(key_file)})
    with pytest.raises(ValueError, match="FLYWHEEL_JUDGE_URL"):
        FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_URL": "localhost:8000/v1"})
    with pytest.raises(ValueError, match="FLYWHEEL_JUDGE_TOP_LOGPROBS"):
        FlywheelConfig.load(environ={"FLYWHEEL_JUDGE_TOP_LOGPROBS": "21"})
