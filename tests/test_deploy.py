"""Offline validation of ``deploy/``: there is no Docker engine or cluster here, so every file
is checked by the real tool that would read it, short of running it.

- ``deploy/compose``: ``docker compose config`` (or the ``docker-compose`` 1.29 package),
  which validates against the Compose specification schema and resolves interpolation;
  the resolved stack is then checked for what the drill relies on.
- ``deploy/k8s``: every overlay built with kustomize (``kustomize build`` or
  ``kubectl kustomize``), each object validated strictly against the Kubernetes JSON schemas
  bundled in ``kubernetes-validate``, then cross-checked (selectors, probes, secrets).
- Prometheus config through ``promtool check config``; the Grafana dashboard's queries,
  with its metric-name constants expanded, through ``promtool check rules``; the dashboard
  names no datasource uid (it takes its datasource from a variable). The alert rules and
  the real ``/metrics`` are checked in test_deploy_alerts.py.
- The Prometheus Operator's kinds (ServiceMonitor, PrometheusRule) are not in the
  Kubernetes schemas: they are checked for what the stack relies on instead.
- Redis flags: a real ``redis-server`` is started with exactly the flags both stacks ship.

A missing tool skips its tests with the reason, except under ``CI=true``, where it fails:
``bash .ci/install-deploy-tools`` installs them all.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from urllib.parse import urlsplit

import pytest

from flashsale.service.probes import READY_TIMEOUT_S

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_DIR = DEPLOY / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
COMPOSE_ENV_EXAMPLE = COMPOSE_DIR / ".env.example"
PROMETHEUS_CONFIG = COMPOSE_DIR / "prometheus" / "prometheus.yml"
GRAFANA_DIR = COMPOSE_DIR / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "flashsale.json"
K8S = DEPLOY / "k8s"
OVERLAYS = ("drill", "external")

INSTALL_HINT = "run `bash .ci/install-deploy-tools`"

#: What the dashboard shows of the order service's /metrics (flashsale/metrics.py; that each
#: is really served is checked against a running service in test_deploy_alerts.py).
SERVICE_METRICS = frozenset(
    {
        "flashsale_orders_total",
        "flashsale_request_seconds_bucket",
        "flashsale_responses_total",
        "flashsale_stock_units",
        "flashsale_holds_pending",
        "flashsale_stream_backlog",
        "flashsale_writer_rows_total",
        "flashsale_writer_last_commit_timestamp_seconds",
        "flashsale_dead_letters_total",
        "flashsale_dead_letters_waiting",
        "flashsale_sale_fenced",
    }
)
#: Deployment-wide gauges: every replica reads the same value from Redis.
READ_FROM_REDIS = (
    "flashsale_stock_units",
    "flashsale_holds_pending",
    "flashsale_stream_backlog",
    "flashsale_dead_letters_waiting",
    "flashsale_sale_fenced",
    "flashsale_writer_last_commit_timestamp_seconds",
)
#: Kinds that come with the Prometheus Operator's CRDs, not with Kubernetes.
OPERATOR_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
RULES_FILE = DEPLOY / "prometheus" / "flashsale.rules.yml"

#: Interpolated into the compose file; removed from the tool's environment so that only the
#: env file the test names decides the result.
COMPOSE_VARIABLES = re.compile(r"^(FLASHSALE_|POSTGRES_|GRAFANA_|REDIS_|LOCUST_|COMPOSE_)")
COMPOSE_SECRETS = (
    "FLASHSALE_TOKEN_SECRET",
    "FLASHSALE_ADMIN_TOKEN",
    "POSTGRES_PASSWORD",
    "GRAFANA_ADMIN_PASSWORD",
)
K8S_SECRET_KEYS = (
    "FLASHSALE_TOKEN_SECRET",
    "FLASHSALE_ADMIN_TOKEN",
    "FLASHSALE_DATABASE_URL",
    "POSTGRES_PASSWORD",
)
#: Oldest Kubernetes the manifests promise to fit (autoscaling/v2, policy/v1 …), and the
#: newest whose schemas kubernetes-validate bundles.
K8S_VERSIONS = ("1.29.0", "latest")


# ---------------------------------------------------------------- tools: skip here, fail in CI


def _missing(what: str, hint: str = INSTALL_HINT) -> NoReturn:
    message = f"{what} is not installed: {hint}"
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message} (CI=true: deploy validation must not be skipped)", pytrace=False)
    pytest.skip(message)


def _module(name: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ImportError:
        _missing(
            f"the Python package {package}",
            f"pip install {package} (flashsale's test extra), or run "
            f"`PYTHON={sys.executable} bash .ci/install-deploy-tools`",
        )


def _yaml() -> ModuleType:
    return _module("yaml", "PyYAML")


def _run(
    argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, cwd=cwd, check=False)


@pytest.fixture(scope="module")
def compose_tool() -> list[str]:
    """``docker compose`` (v2 plugin) where the Docker CLI has it, else ``docker-compose``."""
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    _missing("docker compose / docker-compose (Debian package docker-compose)")


@pytest.fixture(scope="module")
def kustomize_tool() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl") and _run(["kubectl", "kustomize", "--help"]).returncode == 0:
        return ["kubectl", "kustomize"]
    _missing("kustomize (standalone, or built into kubectl)")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        _missing("promtool (Debian package prometheus)")
    return path


# ---------------------------------------------------------------- compose


def _compose_config(
    tool: list[str], env_file: Path, compose_file: Path = COMPOSE_FILE
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not COMPOSE_VARIABLES.match(k)}
    return _run(
        [*tool, "--env-file", str(env_file), "-f", str(compose_file), "config"],
        env=env,
        cwd=compose_file.parent,
    )


@pytest.fixture(scope="module")
def compose(compose_tool: list[str]) -> dict[str, Any]:
    """The compose stack as the tool resolves it with .env.example's values."""
    result = _compose_config(compose_tool, COMPOSE_ENV_EXAMPLE)
    assert result.returncode == 0, (
        f"{' '.join(compose_tool)} config rejected {COMPOSE_FILE}:\n{result.stderr}"
    )
    resolved: dict[str, Any] = _yaml().safe_load(result.stdout)
    return resolved


@pytest.fixture(scope="module")
def env_example() -> dict[str, str]:
    values = {}
    for line in COMPOSE_ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def _argv(command: Any) -> list[str]:
    return command.split() if isinstance(command, str) else [str(part) for part in command]


def _flag(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_compose_stack_validates_against_the_compose_schema(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {
        "redis",
        "postgres",
        "migrate",
        "service",
        "worker",
        "locust-master",
        "locust-worker",
        "prometheus",
        "grafana",
    }


def test_compose_validation_rejects_an_unknown_key(compose_tool: list[str], tmp_path: Path) -> None:
    # The check above means something only if the tool really validates: a misspelt key must fail.
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("    healthcheck:\n", "    healthchek:\n", 1))
    result = _compose_config(compose_tool, COMPOSE_ENV_EXAMPLE, broken)
    assert result.returncode != 0
    assert "healthchek" in result.stderr


def test_compose_refuses_to_start_without_secrets(compose_tool: list[str], tmp_path: Path) -> None:
    empty_env = tmp_path / "empty.env"
    empty_env.write_text("")
    result = _compose_config(compose_tool, empty_env)
    assert result.returncode != 0, "the stack resolved with no secrets set: some secret has a default"
    assert ".env.example" in result.stderr  # the error says what to do
    text = COMPOSE_FILE.read_text()
    for secret in COMPOSE_SECRETS:
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses, f"{secret} is not used"
        assert all(use.startswith(":?") for use in uses), (
            f"{secret} must be required (${{{secret}:?…}}), found {uses}"
        )


def test_env_example_secrets_are_marked_placeholders(env_example: dict[str, str]) -> None:
    for secret in COMPOSE_SECRETS:
        assert "CHANGE-ME" in env_example[secret]


def test_compose_service_runs_replicas_with_a_health_check(
    compose: dict[str, Any], env_example: dict[str, str]
) -> None:
    service = compose["services"]["service"]
    argv = _argv(service["command"])
    assert argv[:2] == ["flashsale", "serve"]
    assert (
        _flag(argv, "--workers")
        == env_example["FLASHSALE_WORKERS"]
        == service["environment"]["FLASHSALE_WORKERS"]
    )
    assert int(service["deploy"]["replicas"]) == int(env_example["FLASHSALE_SERVICE_REPLICAS"]) >= 2
    probe = " ".join(service["healthcheck"]["test"])
    assert f"127.0.0.1:{service['environment']['FLASHSALE_PORT']}/healthz" in probe
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert service["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert service["environment"]["FLASHSALE_HOST"] == "0.0.0.0"


def test_compose_roles_run_their_commands(compose: dict[str, Any], env_example: dict[str, str]) -> None:
    services = compose["services"]
    assert _argv(services["migrate"]["command"]) == ["flashsale", "migrate"]
    assert _argv(services["worker"]["command"]) == ["flashsale", "worker"]
    assert services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    master = _argv(services["locust-master"]["command"])
    worker = _argv(services["locust-worker"]["command"])
    assert master[:3] == worker[:3] == ["locust", "-f", "loadtests/surge.py"]
    assert "--master" in master and "--worker" in worker
    assert _flag(worker, "--master-host") == "locust-master"
    target = urlsplit(_flag(master, "--host"))
    assert (target.hostname, target.port) == (
        "service",
        int(services["service"]["environment"]["FLASHSALE_PORT"]),
    )
    assert int(services["locust-worker"]["deploy"]["replicas"]) == int(env_example["LOCUST_WORKERS"])


def test_compose_flashsale_roles_share_image_and_settings(compose: dict[str, Any]) -> None:
    services = compose["services"]
    roles = ("migrate", "service", "worker")
    assert len({services[name]["image"] for name in (*roles, "locust-master", "locust-worker")}) == 1
    for name in roles:
        env = services[name]["environment"]
        redis_url, database_url = (
            urlsplit(env["FLASHSALE_REDIS_URL"]),
            urlsplit(env["FLASHSALE_DATABASE_URL"]),
        )
        assert redis_url.hostname == "redis" and redis_url.port == 6379
        assert database_url.hostname == "postgres" and database_url.port == 5432
        # The URL's password is the one PostgreSQL was initialised with.
        assert database_url.password == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
        assert database_url.username == services["postgres"]["environment"]["POSTGRES_USER"]
        assert env["FLASHSALE_KEY_PREFIX"] == "fs"
        for secret in ("FLASHSALE_TOKEN_SECRET", "FLASHSALE_ADMIN_TOKEN"):
            assert env[secret], f"{name} lacks {secret}"


def _published_host_ips(ports: list[Any]) -> Iterator[str]:
    for port in ports:
        if isinstance(port, dict):  # docker compose v2's long syntax
            yield str(port.get("host_ip", ""))
        else:
            parts = str(port).split("/")[0].split(":")
            yield parts[0] if len(parts) == 3 else ""


def test_compose_publishes_ports_on_loopback_only(compose: dict[str, Any]) -> None:
    published = {
        name: list(_published_host_ips(svc.get("ports", []))) for name, svc in compose["services"].items()
    }
    assert published["service"] and published["locust-master"] and published["grafana"]
    for name, host_ips in published.items():
        assert all(ip == "127.0.0.1" for ip in host_ips), f"{name} publishes on {host_ips}"


# ---------------------------------------------------------------- Redis: persistence and noeviction


def _redis_flags(argv: list[str]) -> dict[str, str]:
    assert argv[0] == "redis-server", argv
    flags = argv[1:]
    assert len(flags) % 2 == 0 and all(f.startswith("--") for f in flags[::2]), flags
    return {name[2:]: value for name, value in zip(flags[::2], flags[1::2], strict=True)}


def _k8s_redis_argv(objects: list[dict[str, Any]]) -> list[str]:
    statefulset = _one(objects, "StatefulSet", "flashsale-redis")
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    return [*container["command"], *container.get("args", [])]


@pytest.fixture(scope="module", params=["compose", "k8s"])
def redis_argv(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "compose":
        return _argv(request.getfixturevalue("compose")["services"]["redis"]["command"])
    return _k8s_redis_argv(request.getfixturevalue("k8s")["drill"])


def test_redis_keeps_an_aof_and_never_evicts(redis_argv: list[str]) -> None:
    flags = _redis_flags(redis_argv)
    assert flags["appendonly"] == "yes"
    assert flags["appendfsync"] in ("everysec", "always")
    assert flags["maxmemory-policy"] == "noeviction"  # an evicted stock key is an oversell
    assert "maxmemory" in flags


def test_redis_flags_are_accepted_by_a_real_redis_server(redis_argv: list[str]) -> None:
    # A misspelt directive or value passes every YAML check; redis-server itself refuses it.
    from redis import Redis

    from flashsale.runtime.embedded import RedisServer

    flags = _redis_flags(redis_argv)
    with RedisServer(extra_args=redis_argv[1:]) as server:
        client = Redis.from_url(server.url, decode_responses=True)
        try:
            running = {name: str(client.config_get(name)[name]) for name in flags}
        finally:
            client.close()
    assert running["appendonly"] == "yes"
    assert running["maxmemory-policy"] == "noeviction"
    assert running["appendfsync"] == flags["appendfsync"]
    assert int(running["maxmemory"]) > 0


# ---------------------------------------------------------------- Prometheus


@pytest.fixture(scope="module")
def prometheus_config() -> dict[str, Any]:
    loaded: dict[str, Any] = _yaml().safe_load(PROMETHEUS_CONFIG.read_text())
    return loaded


def test_prometheus_config_passes_promtool(promtool: str) -> None:
    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_service_replica(
    prometheus_config: dict[str, Any], compose: dict[str, Any]
) -> None:
    jobs = {job["job_name"]: job for job in prometheus_config["scrape_configs"]}
    job = jobs["flashsale-service"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # DNS discovery of the compose service name: one target per replica, whatever the count.
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["service"] and sd["type"] == "A"
    assert sd["port"] == int(compose["services"]["service"]["environment"]["FLASHSALE_PORT"])
    prometheus = compose["services"]["prometheus"]
    config_path = next(
        a.split("=", 1)[1] for a in _argv(prometheus["command"]) if a.startswith("--config.file=")
    )
    assert _mount_source(prometheus, config_path) == PROMETHEUS_CONFIG


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Container path -> host path or volume name, for short and long volume syntax."""
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            mounts[volume.get("target", "")] = volume.get("source", "")
        else:
            source, target = (str(volume).split(":") + [""])[:2]
            mounts[target] = source
    return mounts


def _mount_source(service: dict[str, Any], target: str) -> Path | None:
    """The host path compose bind-mounts at ``target`` in ``service``."""
    source = _mounts(service).get(target)
    return Path(source).resolve() if source else None


# ---------------------------------------------------------------- Grafana


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # inside collapsed rows


def _metric_constants(dashboard: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "constant"}


def _expand(expr: str, constants: dict[str, str]) -> str:
    """The PromQL Grafana sends, with the metric-name constants substituted."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: constants.get(m.group(1) or m.group(2), m.group(0)), expr)


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_grafana_provisioning_points_at_the_compose_prometheus(
    compose: dict[str, Any], prometheus_config: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    yaml = _yaml()
    (datasource,) = yaml.safe_load((GRAFANA_DIR / "provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", 9090) and "prometheus" in compose["services"]
    # $__rate_interval is computed from this: it must be the real scrape interval.
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]
    # The dashboard's datasource variable picks the default datasource: this one.
    assert datasource["isDefault"] is True and datasource["type"] == "prometheus"
    refs = [p["datasource"] for p in _panels(dashboard)] + [
        t["datasource"] for p in _panels(dashboard) for t in p.get("targets", [])
    ]
    assert refs and all(ref == {"type": "prometheus", "uid": "${datasource}"} for ref in refs)

    (provider,) = yaml.safe_load((GRAFANA_DIR / "provisioning/dashboards/flashsale.yaml").read_text())[
        "providers"
    ]
    grafana = compose["services"]["grafana"]
    assert _mount_source(grafana, provider["options"]["path"]) == DASHBOARD.parent.resolve()
    assert _mount_source(grafana, "/etc/grafana/provisioning") == (GRAFANA_DIR / "provisioning").resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def _datasource_refs(node: Any, where: str = "") -> Iterator[tuple[str, Any]]:
    """Every ``datasource`` reference in the dashboard JSON, with where it is."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield where, value
            else:
                yield from _datasource_refs(value, f"{where}/{key}")
    elif isinstance(node, list):
        for n, value in enumerate(node):
            yield from _datasource_refs(value, f"{where}/{n}")


def test_dashboard_names_no_datasource_uid(dashboard: dict[str, Any]) -> None:
    """A hard-coded uid breaks import into an existing Grafana: every reference is the
    ``datasource`` variable (or Grafana's own built-in annotations source)."""
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "datasource"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    builtin = {"type": "grafana", "uid": "-- Grafana --"}
    refs = list(_datasource_refs(dashboard))
    assert refs
    for where, ref in refs:
        assert ref in ({"type": "prometheus", "uid": "${datasource}"}, builtin), f"{where}: {ref}"
    # Nor an import-only placeholder (``${DS_…}`` from __inputs), which file provisioning
    # would leave unfilled.
    assert "__inputs" not in dashboard and "${DS_" not in json.dumps(dashboard)


def test_dashboard_metric_names_live_in_one_place(dashboard: dict[str, Any]) -> None:
    constants = _metric_constants(dashboard)
    assert set(constants.values()) == SERVICE_METRICS  # each exposed metric named once, nothing else
    queries = list(_queries(dashboard))
    assert queries
    for title, expr in queries:
        assert "flashsale_" not in expr, (
            f"{title!r} names a metric directly; use a ${{metric_…}} constant: {expr}"
        )
        used = set(re.findall(r"\$\{(metric_\w+)\}", expr))
        assert used and used <= set(constants), f"{title!r}: unknown or no metric constant in {expr}"
        named = set(re.findall(r"\bflashsale_\w+", _expand(expr, constants)))
        assert named and named <= SERVICE_METRICS, f"{title!r} queries {named - SERVICE_METRICS}"
    used_everywhere = {
        m for _, expr in queries for m in re.findall(r"\bflashsale_\w+", _expand(expr, constants))
    }
    assert used_everywhere == SERVICE_METRICS, f"no panel shows {SERVICE_METRICS - used_everywhere}"


def test_dashboard_has_the_war_room_panels(dashboard: dict[str, Any]) -> None:
    constants = _metric_constants(dashboard)
    exprs = [re.sub(r"\s+", " ", _expand(expr, constants)) for _, expr in _queries(dashboard)]

    def shown(pattern: str) -> bool:
        return any(re.search(pattern, expr) for expr in exprs)

    assert shown(r"sum by \(outcome\) \(rate\(flashsale_orders_total\["), "orders/s by outcome"
    assert shown(r"histogram_quantile\(0\.5, .*flashsale_request_seconds_bucket"), "latency p50"
    assert shown(r"histogram_quantile\(0\.99, .*flashsale_request_seconds_bucket"), "latency p99"
    assert shown(r"by \(sale, sku\) \(flashsale_stock_units\{state=\"available\""), "stock left per SKU"
    assert shown(r"flashsale_holds_pending"), "holds pending"
    assert shown(r"flashsale_stream_backlog"), "stream backlog"
    assert shown(r"rate\(flashsale_writer_rows_total\["), "writer rate"
    assert shown(r"flashsale_dead_letters_total"), "dead letters"
    # Deployment-wide gauges are read from Redis by every replica: summing them would count
    # the same stock once per replica.
    for expr in exprs:
        for gauge in READ_FROM_REDIS:
            if gauge in expr:
                assert "max" in expr.split(gauge)[0], f"{gauge} must be max-ed across replicas: {expr}"
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


def test_dashboard_queries_are_valid_promql(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    constants = _metric_constants(dashboard)
    # Grafana's own variables, as Grafana would fill them in.
    grafana_vars = {"__rate_interval": "20s", "__interval": "5s", "sale": ".*"}
    queries = list(_queries(dashboard))
    rules = [
        {"record": f"dashboard:query_{n}", "expr": _expand(expr, {**constants, **grafana_vars})}
        for n, (_, expr) in enumerate(queries)
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":  # label_values() is Grafana's, not PromQL: check its metric
            assert re.fullmatch(r"label_values\(\$\{metric_\w+\}, \w+\)", variable["definition"])
    rules_file = tmp_path / "dashboard-rules.yml"
    rules_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _run([promtool, "check", "rules", str(rules_file)])
    legend = "\n".join(f"  dashboard:query_{n} is panel {title!r}" for n, (title, _) in enumerate(queries))
    assert result.returncode == 0, f"{result.stdout}{result.stderr}\n{legend}"


# ---------------------------------------------------------------- Kubernetes


def _build(kustomize_tool: list[str], path: Path) -> list[dict[str, Any]]:
    result = _run([*kustomize_tool, str(path)])
    assert result.returncode == 0, f"{' '.join(kustomize_tool)} {path} failed:\n{result.stderr}"
    return [doc for doc in _yaml().safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module")
def k8s(kustomize_tool: list[str]) -> dict[str, list[dict[str, Any]]]:
    """Every overlay (and the base) as kustomize builds it."""
    return {name: _build(kustomize_tool, K8S / "overlays" / name) for name in OVERLAYS} | {
        "base": _build(kustomize_tool, K8S / "base")
    }


def _one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def _generated(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    """A ConfigMap or Secret from a generator: its name carries a content-hash suffix."""
    found = [
        o
        for o in objects
        if o["kind"] == kind and re.fullmatch(name + r"-[a-z0-9]{10}", o["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one generated {kind} {name}-<hash>, found {len(found)}"
    return found[0]


def _pod_specs(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod template) for every Deployment, StatefulSet and Job."""
    for obj in objects:
        if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield obj, obj["spec"]["template"]


def _secret_values(secret: dict[str, Any]) -> dict[str, str]:
    values = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    values.update(secret.get("stringData", {}))
    return values


def test_kustomize_builds_every_overlay(k8s: dict[str, list[dict[str, Any]]]) -> None:
    kinds = {name: {(o["kind"], o["metadata"]["name"]) for o in objects} for name, objects in k8s.items()}
    workloads = {
        ("Deployment", "flashsale-service"),
        ("HorizontalPodAutoscaler", "flashsale-service"),
        ("PodDisruptionBudget", "flashsale-service"),
        ("Service", "flashsale-service"),
        ("Deployment", "flashsale-worker"),
        ("Job", "flashsale-migrate"),
        ("Deployment", "flashsale-locust-master"),
        ("Deployment", "flashsale-locust-worker"),
    }
    datastores = {("StatefulSet", "flashsale-redis"), ("StatefulSet", "flashsale-postgres")}
    monitoring = {("ServiceMonitor", "flashsale-service"), ("PrometheusRule", "flashsale")}
    assert workloads | datastores | monitoring <= kinds["drill"]
    assert workloads | monitoring <= kinds["external"] and not datastores & kinds["external"]
    assert {o["metadata"].get("namespace") for o in k8s["drill"] if o["kind"] != "Namespace"} == {
        "flashsale-drill"
    }


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_kubernetes_schemas(
    k8s: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    kv = _module("kubernetes_validate", "kubernetes-validate")
    version = kv.latest_version() if version == "latest" else version
    for obj in k8s[overlay]:
        if (obj["apiVersion"], obj["kind"]) in OPERATOR_KINDS:
            # Not Kubernetes' own: kubernetes-validate has no schema for them (it raises
            # SchemaNotFoundError). test_service_monitor_* and test_prometheus_rule_* check them.
            continue
        try:
            kv.validate(obj, version, strict=True)  # strict: unknown fields are errors
        except kv.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']} against {version}: {exc.message} at {list(exc.path)}"
            )


def test_schema_validation_catches_a_misspelled_field(k8s: dict[str, list[dict[str, Any]]]) -> None:
    kv = _module("kubernetes_validate", "kubernetes-validate")
    deployment = json.loads(json.dumps(_one(k8s["drill"], "Deployment", "flashsale-service")))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(deployment, K8S_VERSIONS[0], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_probes_autoscaling_and_disruption_budget(
    k8s: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = k8s[overlay]
    deployment = _one(objects, "Deployment", "flashsale-service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    ready = container["readinessProbe"]
    # /readyz answers within READY_TIMEOUT_S whatever Redis does: a kubelet timeout above it
    # sees the 503 (and its reasons in the pod's events), not a probe that timed out.
    assert ready["timeoutSeconds"] >= READY_TIMEOUT_S + 1, ready
    # A pod leaves the endpoints after a few seconds of failing, not on one slow answer,
    # and never for PostgreSQL (tests/test_service_probes.py: /readyz stays 200 without it).
    assert (
        2 <= ready.get("failureThreshold", 3)
        and ready["periodSeconds"] * ready.get("failureThreshold", 3) <= 30
    )
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] in port_names
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    config = _generated(objects, "ConfigMap", "flashsale-config")["data"]
    assert port_names[container["readinessProbe"]["httpGet"]["port"]] == int(config["FLASHSALE_PORT"])
    assert container["command"][:2] == ["flashsale", "serve"]
    # $(FLASHSALE_WORKERS) is expanded by Kubernetes from `env` (not envFrom): it must be there.
    assert _flag(container["command"], "--workers") == "$(FLASHSALE_WORKERS)" and env["FLASHSALE_WORKERS"]
    # One process per requested CPU: more would fight over the CPUs, fewer would leave them idle.
    assert int(env["FLASHSALE_WORKERS"]) == int(container["resources"]["requests"]["cpu"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    hpa = _one(objects, "HorizontalPodAutoscaler", "flashsale-service")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "flashsale-service",
    }
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pdb = _one(objects, "PodDisruptionBudget", "flashsale-service")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The budget must leave pods to serve: never all of the HPA's minimum at once.
    assert pdb["spec"].get("maxUnavailable", 0) < hpa["spec"]["minReplicas"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitor_scrapes_the_service_pods(k8s: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = k8s[overlay]
    monitor = _one(objects, "ServiceMonitor", "flashsale-service")
    service = _one(objects, "Service", "flashsale-service")
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # It must not select another Service too (each would be scraped).
    selected = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "Service"
        and monitor["spec"]["selector"]["matchLabels"].items() <= o["metadata"].get("labels", {}).items()
    ]
    assert selected == ["flashsale-service"], selected
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    # Only fields the operator's ServiceMonitor endpoint has (its CRD is not here to check).
    assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_rule_carries_the_rules_file(k8s: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    rule = _one(k8s[overlay], "PrometheusRule", "flashsale")
    assert (
        rule["metadata"]["namespace"]
        == _one(k8s[overlay], "Service", "flashsale-service")["metadata"]["namespace"]
    )
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == _yaml().safe_load(RULES_FILE.read_text())["groups"], (
        "deploy/k8s/components/monitoring/prometheusrule.yaml differs from deploy/prometheus/flashsale.rules.yml: "
        "carry the change over"
    )


def test_drill_overlay_is_prescaled_for_the_opening(k8s: dict[str, list[dict[str, Any]]]) -> None:
    base = _one(k8s["base"], "HorizontalPodAutoscaler", "flashsale-service")["spec"]["minReplicas"]
    drill = _one(k8s["drill"], "HorizontalPodAutoscaler", "flashsale-service")["spec"]["minReplicas"]
    assert drill > base


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(k8s: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for workload, template in _pod_specs(k8s[overlay]):
        for container in template["spec"]["containers"] + template["spec"].get("initContainers", []):
            resources = container.get("resources", {})
            where = f"{workload['kind']}/{workload['metadata']['name']}:{container['name']}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where} lacks {bound}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_target_their_ports(
    k8s: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = k8s[overlay]
    templates = [template for _, template in _pod_specs(objects)]
    for service in (o for o in objects if o["kind"] == "Service"):
        selector = service["spec"]["selector"]
        matching = [t for t in templates if selector.items() <= t["metadata"]["labels"].items()]
        assert matching, f"Service/{service['metadata']['name']} selects no pods"
        declared = {
            p.get("name") for t in matching for c in t["spec"]["containers"] for p in c.get("ports", [])
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in declared, (
                f"Service/{service['metadata']['name']} targets {port['targetPort']}"
            )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_reference_config_and_secrets_that_exist(
    k8s: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = k8s[overlay]
    present = {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in ("ConfigMap", "Secret")}
    for workload, template in _pod_specs(objects):
        for container in template["spec"]["containers"]:
            where = f"{overlay}: {workload['kind']}/{workload['metadata']['name']}"
            for source in container.get("envFrom", []):
                for key, kind in (("configMapRef", "ConfigMap"), ("secretRef", "Secret")):
                    if key in source:
                        assert (kind, source[key]["name"]) in present, (
                            f"{where} reads missing {kind} {source[key]['name']}"
                        )
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    secret = present.get(("Secret", ref["name"]))
                    assert secret is not None, f"{where} reads missing Secret {ref['name']}"
                    assert ref["key"] in _secret_values(secret), f"{where} reads missing key {ref['key']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_are_placeholders_and_stay_out_of_configmaps(
    k8s: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = k8s[overlay]
    secrets = _secret_values(_generated(objects, "Secret", "flashsale-secrets"))
    assert {"FLASHSALE_TOKEN_SECRET", "FLASHSALE_ADMIN_TOKEN", "FLASHSALE_DATABASE_URL"} <= set(secrets)
    for obj in objects:
        if obj["kind"] == "Secret":
            for key, value in _secret_values(obj).items():
                assert "CHANGE-ME" in value, f"{obj['metadata']['name']}.{key} is not a marked placeholder"
        if obj["kind"] == "ConfigMap":
            assert not set(obj["data"]) & set(K8S_SECRET_KEYS), (
                f"a secret sits in ConfigMap {obj['metadata']['name']}"
            )


def test_drill_pods_reach_redis_postgres_and_the_service(k8s: dict[str, list[dict[str, Any]]]) -> None:
    objects = k8s["drill"]

    def service_port(name: str, port: int) -> None:
        service = _one(objects, "Service", name)
        assert port in {p["port"] for p in service["spec"]["ports"]}, f"Service/{name} has no port {port}"

    config = _generated(objects, "ConfigMap", "flashsale-config")["data"]
    redis_url = urlsplit(config["FLASHSALE_REDIS_URL"])
    service_port(str(redis_url.hostname), redis_url.port or 6379)
    database_url = urlsplit(
        _secret_values(_generated(objects, "Secret", "flashsale-secrets"))["FLASHSALE_DATABASE_URL"]
    )
    service_port(str(database_url.hostname), database_url.port or 5432)
    # The URL's password is the one PostgreSQL is initialised with.
    assert (
        database_url.password
        == _secret_values(_generated(objects, "Secret", "flashsale-postgres"))["POSTGRES_PASSWORD"]
    )

    master = _one(objects, "Deployment", "flashsale-locust-master")["spec"]["template"]["spec"]["containers"][
        0
    ]
    target = urlsplit(_flag(master["command"], "--host"))
    service_port(str(target.hostname), int(target.port or 80))
    assert target.hostname == "flashsale-service"
    worker = _one(objects, "Deployment", "flashsale-locust-worker")["spec"]["template"]["spec"]["containers"][
        0
    ]
    service_port(_flag(worker["command"], "--master-host"), 5557)


# ---------------------------------------------------------------- the image and the CLI it runs


def test_image_installs_what_the_project_packages(k8s: dict[str, list[dict[str, Any]]]) -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    (extras,) = re.findall(r'pip install "\.\[([\w,]+)\]"', dockerfile)
    assert set(extras.split(",")) == {"service", "loadtest"}
    assert set(extras.split(",")) <= set(pyproject["project"]["optional-dependencies"])
    copied = set(re.findall(r"^COPY (\S+)", dockerfile, re.M))
    for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, f"the image does not COPY the package {pattern}"
    assert pyproject["project"]["readme"] in dockerfile
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)  # `locust -f loadtests/…` is relative to it
    # Kubernetes runs the image as the user it was built with (runAsNonRoot needs the uid).
    (uid,) = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    for workload, template in _pod_specs(k8s["drill"]):
        if any(c["image"].startswith("flashsale") for c in template["spec"]["containers"]):
            assert template["spec"]["securityContext"]["runAsUser"] == int(uid), workload["metadata"]["name"]
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert "**" in ignored and {
        f"!{p.rstrip('*')}/" for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    } <= set(ignored)


def test_drill_reports_have_a_writable_home(
    compose: dict[str, Any], k8s: dict[str, list[dict[str, Any]]]
) -> None:
    # The Locust master writes reports/drill-<run id> relative to the image's WORKDIR, as a
    # non-root user: the image must give it that folder, and both stacks a volume there.
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    (uid,) = re.findall(r"^USER (\d+)$", dockerfile, re.M)
    assert re.search(rf"mkdir /app/reports && chown {uid}\b", dockerfile)
    volume = _mounts(compose["services"]["locust-master"]).get("/app/reports")
    assert volume in compose["volumes"], "locust-master keeps its reports in a named volume"
    master = _one(k8s["drill"], "Deployment", "flashsale-locust-master")["spec"]["template"]["spec"]
    (container,) = master["containers"]
    mounted = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
    assert "/app/reports" in mounted and mounted["/app/reports"] in {v["name"] for v in master["volumes"]}


def test_deploy_runs_commands_the_project_has(
    compose: dict[str, Any], k8s: dict[str, list[dict[str, Any]]]
) -> None:
    """Every ``flashsale`` sub-command and flag the stacks run, and the locustfile they load,
    exist in this checkout: a rename elsewhere breaks the deployment, and this says so."""
    from flashsale.cli import build_parser

    commands = {
        name: sub
        for action in build_parser()._actions
        if isinstance(action, argparse._SubParsersAction)
        for name, sub in action.choices.items()
    }
    run = [("compose " + name, _argv(svc.get("command", []))) for name, svc in compose["services"].items()]
    run += [
        (f"k8s {workload['metadata']['name']}", [*c.get("command", []), *c.get("args", [])])
        for workload, template in _pod_specs(k8s["drill"])
        for c in template["spec"]["containers"]
    ]
    problems = []
    for where, argv in run:
        if argv[:1] == ["flashsale"]:
            if argv[1] not in commands:
                problems.append(f"{where} runs `flashsale {argv[1]}`, which is not a registered sub-command")
                continue
            options = {o for action in commands[argv[1]]._actions for o in action.option_strings}
            unknown = {a for a in argv[2:] if a.startswith("--")} - options
            if unknown:
                problems.append(f"{where}: `flashsale {argv[1]}` has no {sorted(unknown)}")
        if argv[:2] == ["locust", "-f"] and not (ROOT / argv[2]).is_file():
            problems.append(f"{where} runs {argv[2]}, which does not exist")
    assert not problems, "\n".join(sorted(set(problems)))


def _worker_stop_bound_s(environment: dict[str, str]) -> float:
    """How long a stopped worker may take: its stop grace, then closing its pools."""
    from flashsale.pipeline.runner import STOP_TEARDOWN_S
    from flashsale.pipeline.worker_settings import WorkerSettings

    return WorkerSettings.from_env(environment).stop_grace_s + STOP_TEARDOWN_S


def test_compose_lets_a_stopped_worker_finish_its_batch(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    grace = worker.get("stop_grace_period")
    assert grace is not None, "the worker takes compose's default 10 s, shorter than its own stop grace"
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    seconds = sum(float(n) * units[u] for n, u in re.findall(r"([0-9.]+)(h|ms|m|s)", str(grace)))
    assert seconds >= _worker_stop_bound_s(worker.get("environment") or {}), grace


def test_kubernetes_lets_a_stopped_worker_finish_its_batch(k8s: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objects in k8s.items():
        pod = _one(objects, "Deployment", "flashsale-worker")["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] >= _worker_stop_bound_s({}), overlay
