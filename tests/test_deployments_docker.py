"""deployments/docker/ checked without Docker: the Compose file against the Compose
Specification's JSON schema, every service's command through mesh's own CLI parser and config
loader, Prometheus' targets against the services, the Grafana dashboard against the metrics a
real node and a real replica export, init-secrets.sh run for real, and the Dockerfile through
Docker's own parser (the ``dockerfile`` package).

The schema is the one check-jsonschema ships (``vendor/compose-spec.json``, from
github.com/compose-spec/compose-spec, Apache-2.0): an offline copy, installed from PyPI with the
``dev`` extra. A missing tool skips its test and says which.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from mesh.api.auth import ApiTokens
from mesh.cli import build_parser
from mesh.config import Config, load_config, parse_http_address, parse_mesh_address
from mesh.security.keys import KeyRing
from mesh.supervise import free_port, http_request, wait_for_http
from tests.cluster import Cluster

pytestmark = pytest.mark.timeout(120)

DOCKER = Path(__file__).resolve().parent.parent / "deployments" / "docker"
COMPOSE = DOCKER / "compose.yaml"
VOTERS = ("node-1", "node-2", "node-3")
HANDLERS = ("handler-1", "handler-2")
REPLICA = "dmz-1"
PROMETHEUS_OWN = {"up"}  # Prometheus' synthetic per-target metric: no node exports it


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text("utf-8"))  # merges the x-* anchors (<<:)


def mesh_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services running the schedulezero image (not init-secrets, Prometheus, Grafana)."""
    return {
        name: svc
        for name, svc in doc["services"].items()
        if "schedulezero" in svc.get("image", "") and "profiles" not in svc
    }


def parse(service: dict[str, Any]) -> Any:
    return build_parser().parse_args(service["command"])


# --------------------------------------------------------------------------- the Compose schema


@pytest.fixture(scope="module")
def compose_validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is not installed")
    try:
        vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    except ModuleNotFoundError:
        pytest.skip("check-jsonschema (the offline Compose schema) is not installed: pip install")
    schema = json.loads((vendor / "compose-spec.json").read_text("utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator: Any, doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_the_compose_file_is_valid_against_the_compose_specification(
    compose_validator: Any,
) -> None:
    assert schema_errors(compose_validator, compose()) == []


@pytest.mark.parametrize(
    "breakage",
    [
        ("a misspelt key", lambda d: d["services"]["node-1"].update(stop_grace_priod="30s")),
        ("ports as a mapping", lambda d: d["services"]["node-1"].update(ports={"8100": 8100})),
        ("a healthcheck of the wrong type", lambda d: d["services"]["dmz-1"].update(healthcheck=1)),
    ],
    ids=lambda b: b[0],
)
def test_a_broken_compose_file_is_rejected_by_the_schema(
    compose_validator: Any, breakage: tuple[str, Any]
) -> None:
    doc = copy.deepcopy(compose())
    breakage[1](doc)
    assert schema_errors(compose_validator, doc) != []


# --------------------------------------------------------------------------- the services


def test_the_mesh_is_three_voters_two_handlers_and_a_dmz_replica() -> None:
    kinds = {name: svc["command"][0] for name, svc in mesh_services(compose()).items()}
    assert kinds == {
        **dict.fromkeys(VOTERS, "node"),
        **dict.fromkeys(HANDLERS, "handler"),
        REPLICA: "replica",
    }


def voter_config(svc: dict[str, Any]) -> Config:
    """The node's Config as ``schedulezero node`` would build it in the container, with the
    paths of the container mapped to the files in deployments/docker/."""
    ns = parse(svc)
    assert ns.config == "/etc/schedulezero/mesh.yaml"
    assert svc["configs"] == [{"source": "mesh", "target": ns.config}]
    config_file = DOCKER / compose()["configs"]["mesh"]["file"]
    keys = ("node_id", "mesh", "advertise_mesh", "http", "advertise_http", "peers", "discovery")
    return load_config({k: getattr(ns, k) for k in keys}, config_file=config_file, env={})


@pytest.mark.parametrize("name", VOTERS)
def test_each_voter_loads_the_shared_config_and_peers_with_the_others_by_service_name(
    name: str,
) -> None:
    svc = compose()["services"][name]
    config = voter_config(svc)
    assert config.node_id == name
    assert config.advertise_mesh == f"tcp://{name}:7100"
    assert set(config.peers) == {f"tcp://{v}:7100" for v in VOTERS if v != name}
    assert config.bootstrap_expect == len(VOTERS)
    # Secured: CURVE keys and API tokens, from the mounts init-secrets.sh fills.
    mounts = dict(reversed(m.split(":")[:2]) for m in svc["volumes"])
    assert mounts[str(config.security.keys)] == f"./secrets/{name}"
    assert mounts[str(config.security.api_tokens.parent)] == "./secrets/api"
    assert config.data_dir == Path("/var/lib/schedulezero")
    assert mounts["/var/lib/schedulezero"] == f"{name}-data"  # a named volume
    assert "dmz" in config.zones and "kwargs" in config.zones["dmz"].drop
    # The HTTP API the healthcheck and Prometheus use: the container's 8100.
    assert parse_http_address(config.http, bind=True)[1] == 8100


@pytest.mark.parametrize("name", HANDLERS)
def test_each_handler_has_keys_tags_and_dials_every_voter(name: str) -> None:
    ns = parse(compose()["services"][name])
    assert ns.handler_id == name and ns.keys == "/etc/schedulezero/keys"
    assert {parse_mesh_address(m)[0] for m in ns.mesh} == set(VOTERS)
    assert ns.tags and dict(ns.tags)["site"] == "compose"
    config = load_config(
        {"tasks": ns.tasks, "node_id": ns.handler_id, "log_level": ns.log_level}, env={}
    )
    assert config.tasks == ("mesh.sample_tasks",)


def test_the_two_handlers_can_be_told_apart_by_tags() -> None:
    tags = [dict(parse(compose()["services"][h]).tags) for h in HANDLERS]
    assert tags[0]["pool"] != tags[1]["pool"]


def test_the_replica_is_read_only_public_and_follows_every_voter() -> None:
    svc = compose()["services"][REPLICA]
    ns = parse(svc)
    assert (ns.node_id, ns.zone, ns.anonymous_reads, ns.api_tokens) == (REPLICA, "dmz", True, None)
    assert {parse_mesh_address(u)[0] for u in ns.upstreams} == set(VOTERS)
    port = parse_http_address(ns.http, bind=True)[1]
    assert svc["environment"]["HEALTHCHECK_URL"] == f"http://127.0.0.1:{port}/api/health"
    # It holds no voter secret and no API token: only its own key directory is mounted.
    assert [v.split(":")[0] for v in svc["volumes"]] == [f"{REPLICA}-data", f"./secrets/{REPLICA}"]
    assert svc["networks"] == ["dmz"]


def test_every_mesh_service_is_hardened_and_given_time_for_the_leadership_transfer() -> None:
    for name, svc in mesh_services(compose()).items():
        assert svc["stop_signal"] == "SIGTERM", name
        assert svc["stop_grace_period"] == "30s", name
        assert svc["read_only"] is True and svc["cap_drop"] == ["ALL"], name
        assert all(v.endswith(":ro") for v in svc["volumes"] if v.startswith("./")), name
        # Published ports of the admin API stay on the host's loopback.
        for port in svc.get("ports", []):
            assert name == REPLICA or port.startswith("127.0.0.1:"), (name, port)


# --------------------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_every_voter_and_the_replica_on_their_http_ports() -> None:
    prom = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text("utf-8"))
    targets = {
        t
        for job in prom["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
        if job.get("metrics_path", "/metrics") == "/metrics"
    }
    expected = set()
    for name, svc in mesh_services(compose()).items():
        ns = parse(svc)
        if ns.command == "node":
            expected.add(f"{name}:{parse_http_address(voter_config(svc).http, bind=True)[1]}")
        elif ns.command == "replica":
            expected.add(f"{name}:{parse_http_address(ns.http, bind=True)[1]}")
    assert targets == expected
    # /metrics is open (docs/security.md): no credential in the file.
    assert not any(
        "authorization" in job or "bearer_token" in job for job in prom["scrape_configs"]
    )


# --------------------------------------------------------------------------- Grafana

DASHBOARD = DOCKER / "grafana" / "dashboards" / "schedulezero-mesh.json"
_METRIC_RE = re.compile(r"\b(?:mesh|schedulezero)_[A-Za-z0-9_:]+|\bup\b")


def dashboard_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every metric name the dashboard's PromQL expressions use (ours and ``up``)."""
    names: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            used = set(_METRIC_RE.findall(target["expr"]))
            assert used, f"{panel['title']}: {target['expr']!r} names no metric"
            names |= used
    return names


def sample_names(text: str) -> set[str]:
    """The sample names a /metrics text can carry, also for families without samples yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count")}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def unknown_metrics(dashboard: dict[str, Any], exported: set[str]) -> set[str]:
    return dashboard_metrics(dashboard) - exported - PROMETHEUS_OWN


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Iterator[set[str]]:
    """Sample names from the /metrics of a real voter and of a real replica following it."""
    root = tmp_path_factory.mktemp("docker-metrics")
    cluster = Cluster(root, 1)
    replica: subprocess.Popen[bytes] | None = None
    try:
        cluster.start()
        node = cluster.wait_for_leader(15)
        port = free_port()
        log = (root / "replica.log").open("wb")
        replica = subprocess.Popen(
            [sys.executable, "-m", "mesh.cli", "replica", "--node-id", "r1", "--zone", "dmz",
             "--upstream", f"tcp://127.0.0.1:{node.mesh_port}", "--http", f"127.0.0.1:{port}",
             "--data-dir", str(root / "r1")],
            stdout=log, stderr=subprocess.STDOUT, env=cluster.env,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for_http(url, 15, proc=replica)
        texts = [node.metrics_text(), http_request(url).body]
        assert all(isinstance(t, str) and t for t in texts)
        yield set().union(*map(sample_names, texts))
    finally:
        if replica is not None:
            replica.terminate()
            try:
                replica.wait(10)
            except subprocess.TimeoutExpired:
                replica.kill()
                replica.wait(5)
        cluster.stop_all()


def test_the_dashboard_uses_only_metrics_a_real_node_or_replica_exports(
    exported: set[str],
) -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    assert unknown_metrics(dashboard, exported) == set()
    # It shows the Raft state, the scheduling counters and the replica, not just one family.
    used = dashboard_metrics(dashboard)
    for name in ("mesh_is_leader", "schedulezero_fires_recorded_total", "mesh_replica_lag_seconds"):
        assert name in used


def test_the_dashboard_check_catches_a_metric_no_node_exports(exported: set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    dashboard["panels"][1]["targets"][0]["expr"] = "rate(schedulezero_fires_total[1m])"
    assert unknown_metrics(dashboard, exported) == {"schedulezero_fires_total"}


def test_every_panel_uses_the_provisioned_datasource() -> None:
    ds = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )["datasources"]
    uid = ds[0]["uid"]
    assert ds[0]["url"] == "http://prometheus:9090" and "prometheus" in compose()["services"]
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    uids = {p["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row"}
    assert uids == {uid}
    provider = yaml.safe_load(
        (DOCKER / "grafana" / "provisioning" / "dashboards" / "schedulezero.yaml").read_text()
    )["providers"][0]
    mounts = dict(reversed(v.split(":")[:2]) for v in compose()["services"]["grafana"]["volumes"])
    assert mounts[provider["options"]["path"]] == "./grafana/dashboards"


# --------------------------------------------------------------------------- init-secrets.sh


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """init-secrets.sh run as it is in the container, into a temporary SECRETS_DIR."""
    bindir = Path(sys.executable).parent
    if shutil.which("sh") is None or not (bindir / "schedulezero").exists():
        pytest.skip("init-secrets.sh needs sh and the schedulezero script beside the Python")
    out = tmp_path_factory.mktemp("secrets") / "secrets"
    env = {**os.environ, "SECRETS_DIR": str(out), "PATH": f"{bindir}:{os.environ['PATH']}"}
    env["SERVICE_UID"] = env["GRAFANA_UID"] = str(os.getuid())  # chown to ourselves: no root
    run = subprocess.run(
        ["sh", str(DOCKER / "init-secrets.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return out, run.stdout


def test_init_secrets_fills_every_directory_the_compose_file_mounts(
    secrets: tuple[Path, str],
) -> None:
    out, _ = secrets
    mounted = {
        v.split(":")[0].removeprefix("./secrets/")
        for svc in mesh_services(compose()).values()
        for v in svc["volumes"]
        if v.startswith("./secrets/")
    }
    assert {p.name for p in out.iterdir() if p.is_dir()} == mounted
    assert (out / "grafana-admin-password").read_text().strip()


def test_each_service_holds_its_own_secret_and_trusts_exactly_whom_it_talks_to(
    secrets: tuple[Path, str],
) -> None:
    out, _ = secrets
    for name in (*VOTERS, *HANDLERS, REPLICA):
        ring = KeyRing(out / name, name)  # its secret, mode 0600, matching its certificate
        assert sorted(p.name for p in (out / name).glob("*.key_secret")) == [f"{name}.key_secret"]
        trusted = set(ring.certificates)
        if name in VOTERS:
            assert ring.role == "node"
            assert trusted == {*VOTERS, *HANDLERS, REPLICA}
        else:
            assert trusted == {*VOTERS, name}
    assert KeyRing(out / REPLICA, REPLICA).zone == "dmz"
    # The same voter key pair everywhere it is trusted.
    assert len({(out / d / "node-1.key").read_bytes() for d in (*VOTERS, REPLICA)}) == 1


def test_init_secrets_prints_tokens_that_the_tokens_file_accepts(
    secrets: tuple[Path, str],
) -> None:
    out, stdout = secrets
    printed = dict(re.findall(r"^(\w+) token \w+: (szt_\S+)$", stdout, re.M))
    assert set(printed) == {"admin", "read"}
    tokens = ApiTokens(out / "api" / "tokens.json")
    assert tokens.authenticate(printed["admin"]).role == "admin"
    assert tokens.authenticate(printed["read"]).role == "read"
    assert tokens.authenticate(printed["admin"] + "x") is None
    assert printed["admin"] not in (out / "api" / "tokens.json").read_text()


def test_init_secrets_run_again_keeps_every_key(secrets: tuple[Path, str]) -> None:
    out, _ = secrets
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = {**os.environ, "SECRETS_DIR": str(out)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    env["SERVICE_UID"] = env["GRAFANA_UID"] = str(os.getuid())
    run = subprocess.run(
        ["sh", str(DOCKER / "init-secrets.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "szt_" not in run.stdout  # no new tokens
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- the Dockerfile


@pytest.fixture(scope="module")
def instructions() -> list[Any]:
    dockerfile = pytest.importorskip(
        "dockerfile", reason="the dockerfile package (Docker's own parser) is not installed"
    )
    return list(dockerfile.parse_file(str(DOCKER / "Dockerfile")))


def test_the_image_is_built_in_two_stages_on_slim_python_3_11(instructions: list[Any]) -> None:
    froms = [c.value for c in instructions if c.cmd == "FROM"]
    assert len(froms) == 2 and froms[0][1:] == ("AS", "build")
    args = {c.value[0].split("=", 1)[0]: c.value[0].split("=", 1)[1]
            for c in instructions if c.cmd == "ARG" and "=" in c.value[0]}  # fmt: skip
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?", args["PYTHON_IMAGE"])
    copies = [c for c in instructions if c.cmd == "COPY" and any("--from" in f for f in c.flags)]
    assert copies and copies[0].value[0] == "/opt/schedulezero"


def test_the_image_runs_as_a_non_root_user_with_the_schedulezero_entrypoint(
    instructions: list[Any],
) -> None:
    final = instructions[max(i for i, c in enumerate(instructions) if c.cmd == "FROM") :]
    by_cmd = {c.cmd: c for c in final}
    user = by_cmd["USER"].value[0].split(":")[0]
    assert user not in ("root", "0")
    assert by_cmd["STOPSIGNAL"].value == ("SIGTERM",)
    entry = by_cmd["ENTRYPOINT"]
    assert entry.json and entry.value == ("schedulezero",)
    health = by_cmd["HEALTHCHECK"]
    assert health.json and health.value[:2] == ("CMD", "python")  # no curl in a slim image
    env = dict(zip(by_cmd["ENV"].value[::2], by_cmd["ENV"].value[1::2], strict=True))
    assert env["HEALTHCHECK_URL"].endswith("/api/health") and "HEALTHCHECK_URL" in health.original


def test_every_file_the_dockerfile_copies_exists_and_is_not_ignored(
    instructions: list[Any],
) -> None:
    root = DOCKER.parent.parent
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for c in instructions:
        if c.cmd == "COPY" and not any(f.startswith("--from") for f in c.flags):
            for src in c.value[:-1]:
                assert (root / src).exists(), src
                assert src.rstrip("/") in kept, f"{src} is excluded by Dockerfile.dockerignore"
