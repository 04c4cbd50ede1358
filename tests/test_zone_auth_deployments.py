"""The shipped zone deployments (deployments/dmz-replica, deployments/regions) are valid: every
voter file loads with mesh.config, every script's command parses with the CLI's own parser, and
the pieces fit together (the replicas' zones are configured on the voters, their upstreams are
the voters' addresses, the public replica is the only one without tokens)."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from mesh.cli import build_parser
from mesh.config import Config, load_config
from mesh.zones.filter import DROP_KINDS

REPO = Path(__file__).resolve().parent.parent
PATTERNS = {"dmz-replica": "admin", "regions": "hq"}


def voters(pattern: str) -> list[Config]:
    files = sorted((REPO / "deployments" / pattern).glob(f"{PATTERNS[pattern]}-*.yaml"))
    assert len(files) == 3, files
    return [load_config({}, path, {}) for path in files]


def command(script: Path) -> list[str]:
    """The arguments of the script's ``exec schedulezero ...`` line (without ``"$@"``)."""
    text = script.read_text(encoding="utf-8").replace("\\\n", " ")  # line continuations
    words = shlex.split(text, comments=True)
    start = words.index("exec")
    assert words[start + 1] == "schedulezero", words
    assert words[-1] == "$@", words
    return words[start + 2 : -1]


def scripts(pattern: str, kind: str) -> list[Path]:
    found = sorted((REPO / "deployments" / pattern).glob(f"{kind}-*.sh"))
    assert found, f"no {kind} script in deployments/{pattern}"
    return found


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_the_voters_of_a_pattern_form_one_secured_mesh(pattern: str) -> None:
    configs = voters(pattern)
    meshes = {c.mesh for c in configs}
    for c in configs:
        assert set(c.peers) | {c.mesh} == meshes and c.bootstrap_expect == 3
        assert c.security.keys is not None and c.security.api_tokens is not None
        assert c.security.tls_cert is not None and not c.security.insecure
        assert not c.security.anonymous_reads and not c.api.read_only
        assert c.zones == configs[0].zones  # a replica may fail over to any voter
    assert len({c.node_id for c in configs}) == 3


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_replica_script_parses_and_follows_its_patterns_voters(pattern: str) -> None:
    configs = voters(pattern)
    for script in scripts(pattern, "replica"):
        ns = build_parser().parse_args(command(script))
        assert ns.command == "replica", script
        assert ns.zone in configs[0].zones, f"{script}: zone {ns.zone} not configured"
        assert sorted(ns.upstreams) == sorted(c.mesh for c in configs), script
        assert ns.keys is not None and not ns.insecure, script


def test_the_dmz_replica_serves_anonymous_reads_without_tokens_and_drops_user_data() -> None:
    [script] = scripts("dmz-replica", "replica")
    ns = build_parser().parse_args(command(script))
    assert ns.anonymous_reads and ns.api_tokens is None
    assert ns.http.startswith("0.0.0.0:")  # allowed: a read-only API with anonymous reads
    dmz = voters("dmz-replica")[0].zones["dmz"]
    assert {"args", "kwargs", "results", "errors"} <= set(dmz.drop)
    assert "password" in dmz.sensitive_keys and "api_key" in dmz.sensitive_keys


def test_the_regional_replicas_need_tokens_and_their_handlers_dial_the_voters() -> None:
    configs = voters("regions")
    for script in scripts("regions", "replica"):
        ns = build_parser().parse_args(command(script))
        assert ns.api_tokens is not None and not ns.anonymous_reads, script
    for script in scripts("regions", "handler"):
        ns = build_parser().parse_args(command(script))
        assert ns.command == "handler" and ns.keys is not None, script
        assert sorted(ns.mesh) == sorted(c.mesh for c in configs), script
    for zone in configs[0].zones.values():
        assert set(zone.drop) <= set(DROP_KINDS)
