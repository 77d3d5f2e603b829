"""The application's entry points: the ``flywheel`` script, ``python -m flywheel.app.cli``, and the
Celery worker entry (``flywheel.app.worker``) against the bare app (``flywheel.celery_app``)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TASK_NAMES = {"feedback.label_group", "feedback.schedule_labelling", "training.train_reward_model",
              "training.train_policy"}


def test_the_flywheel_script_names_the_app_cli():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["flywheel"].partition(":")
    assert (module, function) == ("flywheel.app.cli", "main")
    assert callable(getattr(importlib.import_module(module), function))


def test_python_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "flywheel.app.cli", "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    for command in ("serve", "complete", "rank", "feedback", "train", "reward-models", "policies", "promote",
                    "rollback", "status", "up", "keys"):
        assert f"    {command} " in done.stdout or f"    {command}\n" in done.stdout, command


def _in_a_fresh_process(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_the_bare_app_loads_no_part_but_routes_every_task_by_name():
    """A process that only sends tasks (the CLI) imports the app alone; sending by name still
    reaches the right queue."""
    seen = _in_a_fresh_process(
        "import json, sys\n"
        "from flywheel.celery_app import app\n"
        "router = app.amqp.router\n"
        "print(json.dumps({'parts': sorted(m for m in sys.modules if m.split('.')[0] in "
        "('serving', 'feedback', 'training')),\n"
        "                  'tasks': sorted(n for n in app.tasks if not n.startswith('celery.')),\n"
        f"                  'queues': {{n: router.route({{}}, n)['queue'].name for n in {sorted(TASK_NAMES)!r}}},\n"
        "                  'beat': sorted(app.conf.beat_schedule or {})}))\n")
    assert seen["parts"] == [] and seen["tasks"] == [] and seen["beat"] == []
    assert seen["queues"] == {"feedback.label_group": "labelling", "feedback.schedule_labelling": "labelling",
                              "training.train_reward_model": "training", "training.train_policy": "training"}


def test_the_worker_entry_knows_every_task_and_the_labelling_schedule():
    seen = _in_a_fresh_process(
        "import json\n"
        "from flywheel.app.worker import app\n"
        "print(json.dumps({'tasks': sorted(n for n in app.tasks if not n.startswith('celery.')),\n"
        "                  'beat': {k: v['task'] for k, v in app.conf.beat_schedule.items()}}))\n")
    assert set(seen["tasks"]) == TASK_NAMES
    assert seen["beat"] == {"feedback.schedule_labelling": "feedback.schedule_labelling"}
