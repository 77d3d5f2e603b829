from pathlib import Path

import pytest

from flywheel.app.cli import build_parser, settings_from_args
from flywheel.settings import Settings


def test_defaults_then_environment_then_flags():
    env = {"FLYWHEEL_MAX_SAMPLES": "8", "FLYWHEEL_DATA_DIR": "/tmp/fw", "FLYWHEEL_DTYPE": "float32"}
    settings = Settings.load({"max_samples": "4", "model": None}, environ=env)
    assert settings.max_samples == 4  # the flag wins over the environment
    assert settings.data_dir == Path("/tmp/fw")
    assert settings.dtype == "float32"
    assert settings.model == ""  # a flag left unset does not override


def test_bad_environment_value_names_the_variable():
    with pytest.raises(ValueError, match="FLYWHEEL_METRICS_PORT"):
        Settings.load(environ={"FLYWHEEL_METRICS_PORT": "lots"})


def test_cli_flags_reach_the_settings(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_GRPC_ADDRESS", "127.0.0.1:7000")
    args = build_parser().parse_args(["serve", "--max-batch-sequences", "12", "--dtype", "bfloat16"])
    settings = settings_from_args(args)
    assert (settings.max_batch_sequences, settings.dtype, settings.grpc_address) == (12, "bfloat16", "127.0.0.1:7000")


def test_help_explains_each_subcommand(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    assert "serve" in out and "complete" in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    assert "FLYWHEEL_MAX_BATCH_SEQUENCES" in capsys.readouterr().out


def test_celery_takes_its_url_and_redelivery_timings_from_settings(monkeypatch):
    from flywheel.celery_app import make_celery

    monkeypatch.delenv("FLYWHEEL_REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_URL", "redis://from-the-environment:6379/0")
    settings = Settings.load(environ={"FLYWHEEL_REDIS_URL": "redis://:pw@from-settings:6380/1",
                                      "FLYWHEEL_TASK_VISIBILITY_TIMEOUT_SECONDS": "4",
                                      "FLYWHEEL_TASK_RESTORE_INTERVAL_SECONDS": "0.5"})
    app = make_celery(settings=settings)  # builds without connecting
    assert app.conf.broker_url == "redis://:pw@from-settings:6380/1"
    assert app.conf.broker_transport_options["visibility_timeout"] == 4
    assert app.conf.broker_transport_options["unacked_restore_interval"] == 0.5
    assert make_celery("redis://explicit:6379/2", settings).conf.broker_url == "redis://explicit:6379/2"
    assert make_celery(settings=Settings.load(environ={})).conf.broker_url == "redis://from-the-environment:6379/0"
