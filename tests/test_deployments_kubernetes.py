"""deployments/kubernetes: every manifest is valid for Kubernetes, and the pods it describes would
start as the mesh they are meant to be.

- Schemas: each resource against the Kubernetes OpenAPI schemas that ``kubernetes-validate``
  ships (offline, strict: unknown fields are errors), for the oldest supported and the newest
  version; the validator is also shown to refuse broken manifests. The ServiceMonitor is a
  Prometheus Operator CRD that package has no schema for: it gets a structural check of the
  fields it uses (said in its test), shown to refuse a broken one too.
- Command lines: each voter pod's container args, with ``$(POD_NAME)`` / ``$(POD_NAMESPACE)``
  expanded as the kubelet does, go through the real CLI parser and ``mesh.config`` with the
  ConfigMap's node.yaml: node id, peers, bootstrap, keys and tokens paths are what the pod
  mounts. Handler and replica args parse and dial exactly the voters' advertised addresses.
- Wiring: Services, PDB, HPA and StatefulSets select or target the right pods and ports.
- Secrets: ``create-secrets.sh`` with the real ``schedulezero`` CLI (and a recording kubectl)
  makes Secrets from which every pod's init container builds a key directory the node, handler
  or replica accepts.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.api.auth import ApiTokens
from mesh.cli import build_parser, node_config
from mesh.security.keys import KeyRing

KV = pytest.importorskip(
    "kubernetes_validate",
    reason="kubernetes-validate is not installed (pip install -e '.[dev]' installs it)",
)

K8S = Path(__file__).resolve().parent.parent / "deployments" / "kubernetes"
# The StatefulSet's preStop `sleep` action needs 1.30; the newest the package knows is checked too.
K8S_VERSIONS = ("1.30.0", KV.utils.latest_version())
NAMESPACE = "prod-sched"  # not the default, so a hard-coded namespace would show


def _kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def _resources() -> list[dict[str, Any]]:
    docs = []
    for name in _kustomization()["resources"]:
        docs += [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def _one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _core_resources() -> list[dict[str, Any]]:
    return [d for d in _resources() if d["kind"] != "ServiceMonitor"]


def _container(workload: dict[str, Any], name: str) -> dict[str, Any]:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def _expand(args: list[str], env: dict[str, str]) -> list[str]:
    """The kubelet's ``$(VAR)`` expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _pod_labels(workload: dict[str, Any]) -> dict[str, str]:
    return workload["spec"]["template"]["metadata"]["labels"]


# --------------------------------------------------------------------------- schemas


def test_kustomization_lists_every_manifest_in_the_directory():
    listed = set(_kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize(
    "doc", _core_resources(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}"
)
def test_manifest_is_valid_against_the_kubernetes_schema(doc, version):
    KV.validate(doc, version, strict=True)


@pytest.mark.parametrize(
    "break_it",
    [
        lambda d: d["spec"].__setitem__("replicaz", 3),  # unknown field (strict)
        lambda d: d["spec"].__setitem__("replicas", "three"),  # wrong type
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("name"),  # required
    ],
    ids=["unknown-field", "wrong-type", "missing-required"],
)
def test_the_schema_check_refuses_a_broken_statefulset(break_it):
    doc = _one("StatefulSet", "schedulezero")
    KV.validate(doc, K8S_VERSIONS[-1], strict=True)
    break_it(doc)
    with pytest.raises(KV.ValidationError):
        KV.validate(doc, K8S_VERSIONS[-1], strict=True)


SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel"}
SERVICE_MONITOR_ENDPOINT = {"port", "path", "interval", "scheme", "scrapeTimeout"}


def _service_monitor_problems(sm: dict[str, Any], services: list[dict[str, Any]]) -> list[str]:
    """What a ServiceMonitor gets wrong, checked by hand: kubernetes-validate ships no schema for
    the Prometheus Operator's CRDs, so this covers the fields used here, and that the selected
    Services have the scraped port."""
    problems = []
    if (sm.get("apiVersion"), sm.get("kind")) != ("monitoring.coreos.com/v1", "ServiceMonitor"):
        problems.append("not a monitoring.coreos.com/v1 ServiceMonitor")
    spec = sm.get("spec", {})
    problems += [f"unknown spec field {k}" for k in set(spec) - SERVICE_MONITOR_SPEC]
    selected = [
        s
        for s in services
        if _selects(spec.get("selector", {}).get("matchLabels", {}), s["metadata"]["labels"])
    ]
    if not selected:
        problems.append("selects no Service")
    if not spec.get("endpoints"):
        problems.append("no endpoints")
    for ep in spec.get("endpoints", []):
        problems += [f"unknown endpoint field {k}" for k in set(ep) - SERVICE_MONITOR_ENDPOINT]
        if ep.get("path") != "/metrics":
            problems.append(f"path {ep.get('path')!r} is not /metrics")
        for s in selected:
            if ep.get("port") not in {p["name"] for p in s["spec"]["ports"]}:
                problems.append(f"Service {s['metadata']['name']} has no port {ep.get('port')!r}")
    return problems


def test_service_monitor_scrapes_metrics_of_the_voters_and_the_replica():
    """Structural check, not the CRD schema (none is available offline, see the helper)."""
    sm = _one("ServiceMonitor", "schedulezero")
    services = [d for d in _resources() if d["kind"] == "Service"]
    assert _service_monitor_problems(sm, services) == []
    scraped = {
        s["metadata"]["name"]
        for s in services
        if _selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])
    }
    # The headless Service (each voter its own target), not also the API one (scraped twice).
    assert scraped == {"schedulezero", "schedulezero-replica-dmz"}


def test_the_service_monitor_check_refuses_a_broken_one():
    services = [d for d in _resources() if d["kind"] == "Service"]
    sm = _one("ServiceMonitor", "schedulezero")
    sm["spec"]["endpoints"][0]["port"] = "metrics"
    sm["spec"]["endpoints"][0]["pathh"] = "/metrics"
    sm["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "other"
    problems = _service_monitor_problems(sm, services)
    assert "selects no Service" in problems
    assert "unknown endpoint field pathh" in problems


# --------------------------------------------------------------------------- command lines


def _voter_env(pod: str) -> dict[str, str]:
    return {"POD_NAME": pod, "POD_NAMESPACE": NAMESPACE}


def _voter_pods() -> list[str]:
    sts = _one("StatefulSet", "schedulezero")
    return [f"schedulezero-{i}" for i in range(sts["spec"]["replicas"])]


def _mount_path(container: dict[str, Any], volume: str) -> str:
    (m,) = [m for m in container["volumeMounts"] if m["name"] == volume]
    return m["mountPath"]


def _advertised_mesh(pod: str) -> str:
    return f"tcp://{pod}.schedulezero.{NAMESPACE}.svc:7100"


@pytest.mark.parametrize("pod", ["schedulezero-0", "schedulezero-1", "schedulezero-2"])
def test_each_voter_pod_loads_its_config_as_a_member_of_the_three(pod, tmp_path):
    assert pod in _voter_pods()
    sts = _one("StatefulSet", "schedulezero")
    node = _container(sts, "node")
    node_yaml = tmp_path / "node.yaml"
    node_yaml.write_text(_one("ConfigMap", "schedulezero-config")["data"]["node.yaml"])
    args = _expand(node["args"], _voter_env(pod))
    config_mount = _mount_path(node, "config")
    assert f"--config={config_mount}" in args
    args = [f"--config={node_yaml}" if a == f"--config={config_mount}" else a for a in args]
    config = node_config(build_parser().parse_args(args), env={})

    assert config.node_id == pod
    assert config.advertise_mesh == _advertised_mesh(pod)
    assert config.mesh == "tcp://0.0.0.0:7100" and config.http == "0.0.0.0:8100"
    others = {_advertised_mesh(p) for p in _voter_pods() if p != pod}
    assert set(config.peers) == others  # its own address dropped from the shared list
    assert config.discovery == "static" and config.bootstrap_expect == 3
    assert str(config.data_dir) == _mount_path(node, "data")
    assert str(config.security.keys) == _mount_path(node, "keys")
    tokens_dir = _mount_path(node, "api-tokens")
    assert str(config.security.api_tokens) == f"{tokens_dir}/tokens.json"
    assert "dmz" in config.zones  # the replica's zone is filtered as configured, not strictest
    ports = {p["name"]: p["containerPort"] for p in node["ports"]}
    assert ports == {"mesh": 7100, "mesh-pub": 7101, "http": 8100}


def test_handlers_parse_and_dial_the_voters_with_their_own_key():
    sts = _one("StatefulSet", "schedulezero-handler")
    handler = _container(sts, "handler")
    args = _expand(handler["args"], {**_voter_env("x"), "POD_NAME": "schedulezero-handler-3"})
    ns = build_parser().parse_args(args)
    assert ns.command == "handler"
    assert ns.handler_id == "schedulezero-handler-3"
    assert set(ns.mesh) == {_advertised_mesh(p) for p in _voter_pods()}
    assert ns.keys == _mount_path(handler, "keys")


def test_the_replica_parses_and_follows_every_voter_in_its_zone():
    dep = _one("Deployment", "schedulezero-replica-dmz")
    replica = _container(dep, "replica")
    ns = build_parser().parse_args(_expand(replica["args"], _voter_env("x")))
    assert (ns.command, ns.node_id, ns.zone) == ("replica", "dmz-1", "dmz")
    assert set(ns.upstreams) == {_advertised_mesh(p) for p in _voter_pods()}
    assert ns.anonymous_reads and ns.api_tokens is None  # public, read-only, no token on it
    (init,) = dep["spec"]["template"]["spec"]["initContainers"]
    assert {"name": "KEY_NAME", "value": ns.node_id} in init["env"]
    assert dep["spec"]["strategy"]["type"] == "Recreate"  # never two processes on one key


# --------------------------------------------------------------------------- wiring


def test_services_select_the_voters_and_target_their_ports():
    sts = _one("StatefulSet", "schedulezero")
    ports = {p["name"] for p in _container(sts, "node")["ports"]}
    for name in ("schedulezero", "schedulezero-api"):
        svc = _one("Service", name)
        assert _selects(svc["spec"]["selector"], _pod_labels(sts)), name
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports, name
    headless = _one("Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    # Peers must resolve before they are ready: readiness needs a quorum, a quorum needs peers.
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert sts["spec"]["podManagementPolicy"] == "Parallel"


def test_the_replica_service_selects_only_the_replica():
    dep = _one("Deployment", "schedulezero-replica-dmz")
    svc = _one("Service", "schedulezero-replica-dmz")
    assert _selects(svc["spec"]["selector"], _pod_labels(dep))
    for sts in ("schedulezero", "schedulezero-handler"):
        assert not _selects(svc["spec"]["selector"], _pod_labels(_one("StatefulSet", sts)))


def test_workload_selectors_match_their_own_pods_and_no_others():
    workloads = [d for d in _resources() if d["kind"] in ("StatefulSet", "Deployment")]
    for w in workloads:
        selector = w["spec"]["selector"]["matchLabels"]
        for other in workloads:
            assert _selects(selector, _pod_labels(other)) == (other is w), (w, other)


def test_the_pdb_keeps_a_quorum_of_the_voters():
    pdb = _one("PodDisruptionBudget", "schedulezero")
    sts = _one("StatefulSet", "schedulezero")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], _pod_labels(sts))
    assert not _selects(
        pdb["spec"]["selector"]["matchLabels"],
        _pod_labels(_one("StatefulSet", "schedulezero-handler")),
    )
    assert pdb["spec"]["maxUnavailable"] == 1
    assert sts["spec"]["replicas"] - pdb["spec"]["maxUnavailable"] > sts["spec"]["replicas"] // 2


def test_the_hpa_scales_the_handlers_on_cpu():
    hpa = _one("HorizontalPodAutoscaler", "schedulezero-handler")
    ref = hpa["spec"]["scaleTargetRef"]
    target = _one(ref["kind"], ref["name"])
    assert _container(target, "handler")["resources"]["requests"]["cpu"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] == target["spec"]["replicas"]


def test_voters_are_spread_over_nodes_and_probe_health_without_a_token():
    sts = _one("StatefulSet", "schedulezero")
    pod = sts["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert _selects(term["labelSelector"]["matchLabels"], _pod_labels(sts))
    node = _container(sts, "node")
    assert node["livenessProbe"]["httpGet"]["path"] == "/api/health"
    assert "/api/health" in "".join(node["readinessProbe"]["exec"]["command"])
    assert "has_quorum" in "".join(node["readinessProbe"]["exec"]["command"])
    # Room for the preStop pause and the leader's hand-over after SIGTERM.
    assert pod["terminationGracePeriodSeconds"] > node["lifecycle"]["preStop"]["sleep"]["seconds"]


# --------------------------------------------------------------------------- secrets


def _fake_kubectl(tmp_path: Path) -> Path:
    log = tmp_path / "kubectl.log"
    stub = tmp_path / "kubectl"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {log}\n')
    stub.chmod(0o755)
    return stub


def _schedulezero_cli(tmp_path: Path) -> Path:
    """This worktree's CLI, as the image's ``schedulezero`` entry point runs it."""
    cli = tmp_path / "schedulezero"
    cli.write_text(f'#!/bin/sh\nexec {sys.executable} -m mesh.cli "$@"\n')
    cli.chmod(0o755)
    return cli


def _created_secrets(log: Path) -> dict[str, list[Path]]:
    """``kubectl create secret generic NAME --from-file=F...`` lines → {NAME: [F, ...]}."""
    secrets = {}
    for line in log.read_text().splitlines():
        words = line.split()
        assert words[:2] == ["-n", NAMESPACE] and words[2:5] == ["create", "secret", "generic"]
        files = [Path(w.removeprefix("--from-file=")) for w in words[6:]]
        assert all(w.startswith("--from-file=") for w in words[6:]), line
        secrets[words[5]] = files
    return secrets


def _mount_secret(files: list[Path], at: Path, mode: int) -> Path:
    """A Secret volume as the kubelet lays it out with fsGroup: the files, group-readable."""
    at.mkdir()
    for f in files:
        shutil.copy(f, at / f.name)
        (at / f.name).chmod(mode | stat.S_IRGRP)
    return at


def _init_keys(workload: dict[str, Any], key_name: str, secrets: dict, root: Path) -> Path:
    """Run the workload's init container script on its mounted Secrets; the key directory."""
    spec = workload["spec"]["template"]["spec"]
    (init,) = spec["initContainers"]
    volumes = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
    root.mkdir(parents=True)
    remap = {}
    for m in init["volumeMounts"]:
        local = root / m["name"]
        if m["name"] in volumes:
            sec = volumes[m["name"]]
            _mount_secret(secrets[sec["secretName"]], local, sec.get("defaultMode", 0o644))
        else:
            local.mkdir()
        remap[m["mountPath"]] = str(local)
    script = init["command"][-1]
    for path, local in sorted(remap.items(), key=lambda kv: -len(kv[0])):
        script = script.replace(path, local)
    env = {**os.environ, "KEY_NAME": key_name}
    subprocess.run(["sh", "-ec", script], env=env, check=True, timeout=10)
    return Path(remap["/keys"])


def test_create_secrets_gives_every_pod_a_key_directory_it_accepts(tmp_path):
    kubectl = _fake_kubectl(tmp_path)
    env = {
        **os.environ,
        "KUBECTL": str(kubectl),
        "SCHEDULEZERO": str(_schedulezero_cli(tmp_path)),
        "PYTHONPATH": str(K8S.parent.parent),
    }
    out = tmp_path / "out"
    subprocess.run(
        ["sh", str(K8S / "create-secrets.sh"), str(out), NAMESPACE],
        env=env,
        check=True,
        timeout=120,
        capture_output=True,
    )
    secrets = _created_secrets(tmp_path / "kubectl.log")
    referenced = {
        v["secret"]["secretName"]
        for d in _resources()
        if d["kind"] in ("StatefulSet", "Deployment")
        for v in d["spec"]["template"]["spec"]["volumes"]
        if "secret" in v
    }
    assert referenced == set(secrets)

    hpa = _one("HorizontalPodAutoscaler", "schedulezero-handler")
    pods = [(_one("StatefulSet", "schedulezero"), p, "node") for p in _voter_pods()]
    pods += [
        (_one("StatefulSet", "schedulezero-handler"), f"schedulezero-handler-{i}", "handler")
        for i in range(hpa["spec"]["maxReplicas"])  # every pod the HPA may start has its key
    ]
    pods.append((_one("Deployment", "schedulezero-replica-dmz"), "dmz-1", "replica"))
    for workload, name, role in pods:
        keys = _init_keys(workload, name, secrets, tmp_path / "pods" / name)
        ring = KeyRing(keys, name)  # refuses a missing, foreign or group-readable secret
        assert ring.role == role
        assert [p.name for p in keys.glob("*.key_secret")] == [f"{name}.key_secret"]
        assert len(list(keys.glob("*.key"))) == len(pods)  # every public key is trusted

    (tokens_file,) = secrets["schedulezero-api-tokens"]
    sts = _one("StatefulSet", "schedulezero")
    (vol,) = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "api-tokens"]
    mounted = _mount_secret([tokens_file], tmp_path / "tokens", vol["secret"]["defaultMode"])
    ApiTokens(mounted / "tokens.json")  # refuses a file that group or others may write
    admin = (out / "admin.token").read_text().strip()
    assert admin.startswith("szt_")
    assert stat.S_IMODE((out / "admin.token").stat().st_mode) == 0o600
