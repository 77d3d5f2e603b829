"""The ``flywheel`` command as a person at a terminal meets it: help on every command and flag, one
name for the server's address, errors that say what was tried and how to fix it, read-only
commands that refuse to invent state, and ``complete --stream`` showing samples as they grow."""

from __future__ import annotations

import argparse
import re

import pytest

from flywheel.app.cli import build_parser, main
from flywheel.app.state import redacted
from flywheel.config import FlywheelConfig
from flywheel.redis_server import free_port

from support.auth import API_KEYS, CLIENT_KEY


def subcommands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(path, parser) of every command and subcommand, depth first."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), child
                yield from subcommands(child, (*path, name))


COMMANDS = list(subcommands(build_parser()))


@pytest.fixture(autouse=True)
def no_ambient_platform(monkeypatch):
    """The tests say which server, Redis and key they use; the machine's environment does not."""
    for name in ("REDIS_URL", "FLYWHEEL_REDIS_URL", "FLYWHEEL_API_KEY", "FLYWHEEL_GRPC_ADDRESS", "FLYWHEEL_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


# ---- help ----

def test_every_command_is_walked():
    names = {" ".join(path) for path, _ in COMMANDS}
    assert {"serve", "complete", "rank", "feedback stats", "train policy", "reward-models", "policies", "promote",
            "rollback", "status", "up", "keys create"} <= names


def assert_described(parser: argparse.ArgumentParser, command: str) -> None:
    """A description, and help text on every flag and argument."""
    assert parser.description and len(parser.description) > 20, f"{command} has no description"
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.help == argparse.SUPPRESS:
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and len(action.help) > 8, f"{command} {name} has no help"


@pytest.mark.parametrize("path", [path for path, _ in COMMANDS], ids=" ".join)
def test_help_describes_the_command_and_every_flag(path, capsys):
    assert_described(dict(COMMANDS)[path], "flywheel " + " ".join(path))
    with pytest.raises(SystemExit) as exit_:
        main([*path, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith("usage: flywheel " + " ".join(path))
    assert "`" not in out, "raw reST/Markdown backticks in --help"


@pytest.mark.parametrize("module", ["demo", "alert_log"])
def test_the_other_entry_points_describe_every_flag(module, capsys):
    """The ``python -m flywheel.app.<module>`` programs beside ``flywheel`` (``make demo``, the
    alert log) meet the same bar."""
    import importlib

    entry = importlib.import_module(f"flywheel.app.{module}")
    assert_described(entry.build_parser(), f"python -m flywheel.app.{module}")
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and out.startswith(f"usage: python -m flywheel.app.{module}")
    assert "`" not in out, "raw reST/Markdown backticks in --help"


def test_serve_help_names_every_service_on_the_port(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "Inference" in out and "Feedback" in out and "Admin" in out
    # the server refuses an explicit max_new_tokens of 0: the help no longer promises it
    assert "a request's explicit 0 is refused" in out


def test_every_client_command_takes_the_address_as_grpc_address():
    for path, parser in COMMANDS:
        if path in [("complete",), ("rank",), ("feedback", "stats"), ("status",)]:
            options = {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}
            assert "--grpc-address" in options and "--address" not in options, path


def test_the_old_complete_address_flag_still_works_and_says_it_is_deprecated(capsys):
    args = build_parser().parse_args(["complete", "hi", "--address", "10.0.0.1:1"])
    assert args.grpc_address == "10.0.0.1:1"
    assert "--address is deprecated; use --grpc-address" in capsys.readouterr().err


# ---- read-only commands refuse to invent state ----

@pytest.mark.parametrize("command", [["policies"], ["reward-models"], ["promote", "0"], ["rollback"],
                                     ["feedback", "trim"], ["status", "--timeout", "1"]], ids=" ".join)
def test_commands_on_existing_state_refuse_a_folder_without_one(command, tmp_path, capsys):
    empty = tmp_path / "not-the-data-dir"
    code = main([*command, "--data-dir", str(empty), "--grpc-address", f"127.0.0.1:{free_port()}"]
                if command[0] == "status" else [*command, "--data-dir", str(empty)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"no Flywheel state in {empty.resolve()}" in err and str(empty.resolve() / "redis") in err
    assert "--data-dir" in err and "--redis-url" in err
    assert not (empty / "redis").exists(), "a throwaway Redis was started"


def test_a_listing_says_which_redis_and_data_dir_it_read(tmp_path, redis_server, capsys):
    assert main(["policies", "--data-dir", str(tmp_path), "--redis-url", redis_server.url]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].startswith("v0 *")  # the base model, current
    assert f"policy registry: Redis {redis_server.url}, data dir {tmp_path.resolve()}" in captured.err


def test_an_unreachable_redis_is_named(tmp_path, capsys):
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    assert main(["reward-models", "--data-dir", str(tmp_path), "--redis-url", url]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach Redis redis://:***@127.0.0.1:{url.rsplit(':', 1)[1]}" in err and "secret" not in err


def test_a_promotion_error_says_where_it_looked(tmp_path, redis_server, capsys):
    assert main(["promote", "3", "--data-dir", str(tmp_path), "--redis-url", redis_server.url]) == 2
    err = capsys.readouterr().err
    assert "policy v3 does not exist" in err and str(tmp_path.resolve()) in err


def test_redacted_hides_only_the_password():
    assert redacted("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redacted("rediss://user:pw@host/1?ssl_ca_certs=/ca.pem") == "rediss://user:***@host/1?ssl_ca_certs=/ca.pem"
    assert redacted("redis://host:6379/0") == "redis://host:6379/0"


# ---- a client against a real server ----

@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from serving.server import InferenceServer

    settings = FlywheelConfig.load({"model": str(tiny_model_dir), "grpc_address": "127.0.0.1:0", "metrics_port": 0,
                                    "dtype": "float32", "api_keys": API_KEYS}, environ={})
    server = InferenceServer(settings).start(wait_until_ready=True)
    yield server
    server.stop(grace=1)


def test_connection_refused_names_the_address_and_how_to_start_a_server(tmp_path, capsys):
    address = f"127.0.0.1:{free_port()}"
    assert main(["complete", "hi", "--grpc-address", address, "--data-dir", str(tmp_path), "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert f"no Flywheel server answers at {address}" in err
    assert "flywheel serve" in err and "--grpc-address" in err


def test_a_missing_key_names_the_files_looked_for_and_how_to_pass_one(server, tmp_path, capsys):
    address = f"127.0.0.1:{server.port}"
    assert main(["complete", "hi", "--grpc-address", address, "--data-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"the server at {address} needs an API key and none was found" in err
    assert str(tmp_path.resolve() / "secrets" / "client.key") in err and "FLYWHEEL_API_KEY" in err
    assert "send the metadata" not in err  # the server's words for programs, not for a CLI user


def test_a_refused_key_names_where_it_came_from(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_API_KEY", "fwk_not-a-key-of-this-server")
    assert main(["complete", "hi", "--grpc-address", f"127.0.0.1:{server.port}", "--data-dir", str(tmp_path)]) == 1
    assert "refused the API key from FLYWHEEL_API_KEY" in capsys.readouterr().err


def test_a_service_the_server_does_not_offer_is_explained(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_API_KEY", CLIENT_KEY)  # this server serves Inference only
    assert main(["rank", "g", "a", "b", "--grpc-address", f"127.0.0.1:{server.port}", "--data-dir",
                 str(tmp_path)]) == 1
    assert "does not offer this service" in capsys.readouterr().err


def test_stream_shows_sample_zero_as_it_grows_and_the_rest_at_the_end(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_API_KEY", CLIENT_KEY)
    request = ["complete", "Tell me a story", "-n", "2", "--max-new-tokens", "12", "--seed", "3",
               "--grpc-address", f"127.0.0.1:{server.port}", "--data-dir", str(tmp_path)]
    assert main(request) == 0
    plain = capsys.readouterr().out
    assert main([*request, "--stream"]) == 0
    streamed = capsys.readouterr().out
    texts = dict(re.findall(r"--- #(\d) \S+  \d+ tokens  \w+  logprob \S+\n(.*?)(?=\n\n--- #|\n\Z)", plain, re.S))
    live = re.match(r"--- #0 \(streaming\)\n(.*)\ngroup ", streamed, re.S)
    assert live, streamed
    assert live.group(1) == texts["0"]  # sample 0, printed piece by piece, is its final text
    assert "(text above)" in streamed and texts["1"] in streamed
    assert "[0] '" not in streamed  # no line per delta any more
