"""The systemd units and the Ansible playbook in deployments/ are valid, checked with the field's
own tools where they are installed, and fit the code they start:

- ``systemd-analyze verify`` passes the units without a word (it only warns about an unknown key
  or a bad value, so any output counts as a failure) and ``systemd-analyze security --offline``
  rates their hardening; both are shown to catch a broken unit.
- ``ansible-playbook --syntax-check`` passes site.yml and rejects a broken playbook;
  ``ansible-inventory --list`` reads the example inventory; the role's controller tasks run for
  real (into a temporary directory) and make keys and tokens the mesh accepts.
- node.yaml and the handler env files the role's templates render (plain Jinja in-process, with
  the inventory's variables over the role's defaults) load with mesh.config and parse with the
  CLI's own parser, and the units' command lines parse with it too.

A tool that is not installed skips its tests with the reason (systemd: Debian's ``systemd``
package; Ansible: ``ansible-core`` from the ``dev`` extra).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jinja2
import pytest
import yaml

from mesh.api.auth import ApiTokens
from mesh.cli import build_parser
from mesh.config import Config, load_config
from mesh.security.keys import KeyRing

REPO = Path(__file__).resolve().parent.parent
SYSTEMD = REPO / "deployments" / "systemd"
ANSIBLE = REPO / "deployments" / "ansible"
ROLE = ANSIBLE / "roles" / "schedulezero"
NODE_UNIT = SYSTEMD / "schedulezero-node.service"
HANDLER_UNIT = SYSTEMD / "schedulezero-handler@.service"
VENV_BIN = "/opt/schedulezero/venv/bin/schedulezero"
GROUPS_VAR = "schedulezero_handler_groups"
TIMEOUT = 60


def tool(name: str, why: str) -> str:
    """The path of a command-line tool (the venv's first), or skip saying what is missing."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed ({why})")
    return found


def systemd_analyze() -> str:
    return tool("systemd-analyze", "Debian package systemd; .ci/run installs it")


def run(
    *argv: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


# --------------------------------------------------------------------------- the units


def stage_unit(tmp_path: Path, text: str, name: str) -> Path:
    """The unit as ``systemd-analyze verify`` can check it here: its ExecStart pointed at a stub
    (verify insists the binary exists), and a template unit given an instance name."""
    stub = tmp_path / "bin" / "schedulezero"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / name.replace("@.", "@eu.")
    unit.write_text(text.replace(VENV_BIN, str(stub)))
    return unit


def verify_complaints(tmp_path: Path, text: str, name: str) -> str:
    """What ``systemd-analyze verify`` says about the unit: empty when it passes cleanly."""
    unit = stage_unit(tmp_path, text, name)
    done = run(systemd_analyze(), "verify", "--man=no", str(unit), cwd=tmp_path)
    said = (done.stdout + done.stderr).strip()
    return said or (f"exit status {done.returncode}" if done.returncode else "")


@pytest.mark.parametrize("unit", [NODE_UNIT, HANDLER_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify_passes_the_unit_without_a_warning(
    unit: Path, tmp_path: Path
) -> None:
    assert verify_complaints(tmp_path, unit.read_text(), unit.name) == ""


BREAKAGES = {
    "misspelt key": ("ProtectSystem=strict", "ProtectSytem=strict"),
    "bad value": ("KillSignal=SIGTERM", "KillSignal=SIGTREM"),
    "key in the wrong section": ("StartLimitBurst=10\n", "\n[Service]\nStartLimitBurst=10\n"),
    "missing binary": (VENV_BIN, "/nonexistent/schedulezero"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_systemd_analyze_verify_rejects_a_broken_unit(breakage: str, tmp_path: Path) -> None:
    old, new = BREAKAGES[breakage]
    text = NODE_UNIT.read_text()
    assert old in text
    assert verify_complaints(tmp_path, text.replace(old, new, 1), NODE_UNIT.name) != ""


HARDENING = re.compile(
    r"^(NoNewPrivileges|Protect\w+|Private\w+|Restrict\w+|CapabilityBoundingSet|"
    r"SystemCall\w+|LockPersonality|UMask|DevicePolicy|KeyringMode|RemoveIPC)=.*\n",
    re.MULTILINE,
)
# systemd's own exposure score, 0.0 (locked down) to 10.0 (exposed); "OK" is below 4.0.
MAX_EXPOSURE = "30"  # --threshold is in tenths: 3.0


def exposure_within_limit(tmp_path: Path, text: str, name: str) -> bool:
    unit = stage_unit(tmp_path, text, name)
    done = run(
        systemd_analyze(),
        "security",
        "--offline=true",
        f"--threshold={MAX_EXPOSURE}",
        "--no-pager",
        str(unit),
        cwd=tmp_path,
    )
    if "--offline" in done.stderr and "unrecognized" in done.stderr:
        pytest.skip("this systemd-analyze has no offline security rating (systemd < 250)")
    return done.returncode == 0


@pytest.mark.parametrize("unit", [NODE_UNIT, HANDLER_UNIT], ids=lambda p: p.name)
def test_the_units_hardening_rates_ok_and_fails_without_it(unit: Path, tmp_path: Path) -> None:
    text = unit.read_text()
    assert exposure_within_limit(tmp_path, text, unit.name)
    stripped = HARDENING.sub("", text)
    assert stripped != text
    assert not exposure_within_limit(tmp_path, stripped, unit.name)


def unit_directives(unit: Path) -> dict[str, list[str]]:
    """Every ``Key=value`` of the unit, continuation lines joined, in order per key."""
    found: dict[str, list[str]] = {}
    for line in unit.read_text().replace("\\\n", " ").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def env_file(text: str) -> dict[str, str]:
    """An EnvironmentFile's variables (KEY=VALUE lines; the value is the rest of the line)."""
    pairs = (line.partition("=") for line in text.splitlines() if line and line[0] != "#")
    return {key.strip(): value.strip() for key, _, value in pairs if key.strip()}


def exec_argv(unit: Path, env: dict[str, str]) -> list[str]:
    """ExecStart's arguments after the binary, with systemd's expansion: ``${VAR}`` is one word,
    a bare ``$VAR`` word is split on whitespace."""
    (line,) = unit_directives(unit)["ExecStart"]
    binary, *words = shlex.split(line)
    assert binary == VENV_BIN
    argv: list[str] = []
    for word in words:
        if re.fullmatch(r"\$\w+", word):
            argv += env[word[1:]].split()
        else:
            argv.append(re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], word))
    return argv


def test_the_node_units_command_starts_a_secured_node_from_etc() -> None:
    ns = build_parser().parse_args(exec_argv(NODE_UNIT, {}))
    assert ns.command == "node"
    assert ns.config == "/etc/schedulezero/node.yaml"
    assert ns.keys == "/etc/schedulezero/keys"
    assert ns.api_tokens == "/etc/schedulezero/tokens.json"
    assert not ns.insecure


def test_the_handler_unit_with_the_example_env_file_starts_a_keyed_handler() -> None:
    env = env_file((SYSTEMD / "handler-eu.env.example").read_text())
    directives = unit_directives(HANDLER_UNIT)
    assert directives["EnvironmentFile"] == ["/etc/schedulezero/handler-%i.env"]
    ns = build_parser().parse_args(exec_argv(HANDLER_UNIT, env))
    assert (ns.command, ns.handler_id, ns.keys) == ("handler", "eu-h1", "/etc/schedulezero/keys")
    assert len(ns.mesh) == 3 and ns.tasks == ["mesh.sample_tasks"]
    assert ns.tags == [("region", "eu")] and not ns.insecure


@pytest.mark.parametrize("unit", [NODE_UNIT, HANDLER_UNIT], ids=lambda p: p.name)
def test_the_units_run_as_the_service_user_and_stop_gracefully(unit: Path) -> None:
    d = unit_directives(unit)
    assert d["User"] == ["schedulezero"] and d["Group"] == ["schedulezero"]
    assert d["KillSignal"] == ["SIGTERM"] and d["KillMode"] == ["mixed"]
    assert d["Restart"] == ["on-failure"] and d["RestartPreventExitStatus"] == ["2"]
    # The node's leadership transfer waits at most 2 x raft.election_timeout_max (1.2 s); the
    # handler drains for up to 10 s (mesh/dispatch/handler.py).
    assert int(d["TimeoutStopSec"][0].removesuffix("s")) >= 20
    assert d["CapabilityBoundingSet"] == [""] and d["ProtectSystem"] == ["strict"]
    assert d["StateDirectory"][0].startswith("schedulezero")


def test_the_role_installs_where_the_units_look() -> None:
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    node = NODE_UNIT.read_text()
    assert VENV_BIN == f"{defaults['schedulezero_venv']}/bin/schedulezero"
    assert f"{defaults['schedulezero_etc']}/node.yaml" in node
    assert f"WorkingDirectory={defaults['schedulezero_state_dir']}" in node
    assert f"User={defaults['schedulezero_user']}" in node
    handler_env = (ROLE / "templates" / "handler.env.j2").read_text()
    assert "HANDLER_ID=" in handler_env and "HANDLER_ARGS=" in handler_env


# --------------------------------------------------------------------------- Ansible


def ansible_tool(name: str) -> str:
    return tool(name, "pip package ansible-core, in the dev extra")


def ansible_env(home: Path) -> dict[str, str]:
    """Ansible run with deployments/ansible's ansible.cfg, its home and temp files in ``home``
    (the test's own directory: nothing is left in the user's ~/.ansible)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "SCHEDULEZERO_"))}
    env["ANSIBLE_CONFIG"] = str(ANSIBLE / "ansible.cfg")
    env["ANSIBLE_HOME"] = str(home / "ansible-home")
    env["ANSIBLE_LOCAL_TEMP"] = env["ANSIBLE_REMOTE_TEMP"] = str(home / "ansible-tmp")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_PYTHON_INTERPRETER"] = sys.executable  # no interpreter discovery: quicker
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def test_ansible_syntax_check_passes_the_playbooks(tmp_path: Path) -> None:
    for playbook in ("site.yml", "secrets.yml"):
        done = run(
            ansible_tool("ansible-playbook"),
            "--syntax-check",
            playbook,
            cwd=ANSIBLE,
            env=ansible_env(tmp_path),
        )
        assert done.returncode == 0, done.stdout + done.stderr


def test_ansible_syntax_check_rejects_a_broken_playbook(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    # A task with two actions: the mistake a bad merge or a lost indent makes.
    broken.write_text(
        (ANSIBLE / "site.yml").read_text()
        + "\n- name: Broken\n  hosts: all\n  tasks:\n"
        + "    - name: Two actions\n      ansible.builtin.ping:\n      ansible.builtin.debug:\n"
    )
    (tmp_path / "secrets.yml").write_text((ANSIBLE / "secrets.yml").read_text())
    done = run(
        ansible_tool("ansible-playbook"),
        "--syntax-check",
        str(broken),
        cwd=ANSIBLE,
        env=ansible_env(tmp_path),
    )
    assert done.returncode != 0
    assert "conflicting action statements" in done.stdout + done.stderr


def inventory(tmp_path: Path) -> dict[str, Any]:
    done = run(ansible_tool("ansible-inventory"), "--list", cwd=ANSIBLE, env=ansible_env(tmp_path))
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def groups_of(listing: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: body["hosts"]
        for name, body in listing.items()
        if name != "_meta" and isinstance(body, dict) and "hosts" in body
    }


def test_the_example_inventory_has_three_voters_and_two_handler_hosts(tmp_path: Path) -> None:
    listing = inventory(tmp_path)
    groups = groups_of(listing)
    assert len(groups["schedulezero_nodes"]) == 3
    assert len(groups["schedulezero_handlers"]) == 2
    hostvars = listing["_meta"]["hostvars"]
    ids = [g["id"] for h in groups["schedulezero_handlers"] for g in hostvars[h][GROUPS_VAR]]
    assert len(ids) == len(set(ids)) == 3  # a handler id names a key: unique in the mesh
    assert all(hostvars[h]["schedulezero_api_tokens"] for h in groups["schedulezero_nodes"])


def render(template: str, host: str, listing: dict[str, Any], **extra: Any) -> str:
    """A role template as Ansible renders it for ``host`` (its template module's trim_blocks):
    the inventory's variables over the role's defaults, whose own Jinja is resolved first."""
    jinja = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, keep_trailing_newline=True
    )
    hostvars = listing["_meta"]["hostvars"]
    context: dict[str, Any] = {
        "inventory_hostname": host,
        "groups": groups_of(listing),
        "hostvars": hostvars,
        "playbook_dir": str(ANSIBLE),
    }
    variables = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    variables.update(hostvars[host], **extra)
    for name, value in variables.items():
        if isinstance(value, str) and "{{" in value:
            variables[name] = jinja.from_string(value).render({**context, **variables})
    source = (ROLE / "templates" / template).read_text()
    return jinja.from_string(source).render({**context, **variables})


def rendered_config(tmp_path: Path, host: str, listing: dict[str, Any], **extra: Any) -> Config:
    path = tmp_path / f"{host}.yaml"
    path.write_text(render("node.yaml.j2", host, listing, **extra))
    return load_config({}, path, {})


def test_each_voters_rendered_node_yaml_loads_as_one_secured_mesh(tmp_path: Path) -> None:
    listing = inventory(tmp_path)
    voters = groups_of(listing)["schedulezero_nodes"]
    configs = [rendered_config(tmp_path, host, listing) for host in voters]
    meshes = {c.mesh for c in configs}
    assert meshes == {f"tcp://10.0.0.{n}:7100" for n in (1, 2, 3)}
    for host, c in zip(voters, configs, strict=True):
        assert c.node_id == host and c.bootstrap_expect == 3
        assert set(c.peers) | {c.mesh} == meshes
        assert str(c.data_dir) == f"/var/lib/schedulezero/{host}"
        assert str(c.security.keys) == "/etc/schedulezero/keys"
        assert str(c.security.api_tokens) == "/etc/schedulezero/tokens.json"
        assert not c.security.insecure and c.security.tls_cert is None


def test_node_yaml_renders_tls_and_extra_settings_when_given(tmp_path: Path) -> None:
    config = rendered_config(
        tmp_path,
        "node-2",
        inventory(tmp_path),
        schedulezero_tls_cert_src="cert.pem",
        schedulezero_tls_key_src="key.pem",
        schedulezero_node_settings={"raft": {"election_timeout_max": 1.5}, "log_level": "DEBUG"},
    )
    assert str(config.security.tls_cert) == "/etc/schedulezero/tls/cert.pem"
    assert str(config.security.tls_key) == "/etc/schedulezero/tls/key.pem"
    assert config.raft.election_timeout_max == 1.5 and config.log_level == "DEBUG"


def test_each_rendered_handler_env_file_starts_its_handler_against_the_voters(
    tmp_path: Path,
) -> None:
    listing = inventory(tmp_path)
    hostvars = listing["_meta"]["hostvars"]
    started = []
    for host in groups_of(listing)["schedulezero_handlers"]:
        for group in hostvars[host][GROUPS_VAR]:
            env = env_file(render("handler.env.j2", host, listing, group=group))
            assert env["PYTHONPATH"] == "/opt/schedulezero/tasks"
            ns = build_parser().parse_args(exec_argv(HANDLER_UNIT, env))
            assert ns.mesh == [f"tcp://10.0.0.{n}:7100" for n in (1, 2, 3)]
            assert ns.tasks == group["tasks"] and ns.concurrency == group["concurrency"]
            assert dict(ns.tags) == group.get("tags", {})
            started.append(ns.handler_id)
    assert started == ["worker-1-eu", "worker-2-eu", "worker-2-reports"]


SMALL_INVENTORY = """
all:
  children:
    schedulezero_nodes:
      hosts:
        node-1: {ansible_host: 10.0.0.1}
    schedulezero_handlers:
      hosts:
        worker-1:
          ansible_host: 10.0.1.1
          schedulezero_handler_groups: [{name: eu, id: worker-1-eu, tasks: [m]}]
"""


def test_the_controller_play_makes_keys_and_tokens_the_mesh_accepts(tmp_path: Path) -> None:
    """secrets.yml for real, on a one-voter inventory, into a temporary directory; a second run
    changes nothing (existing secrets are kept)."""
    cli = tmp_path / "schedulezero"
    cli.write_text(
        f"#!/bin/sh\nPYTHONPATH={shlex.quote(str(REPO))} exec {shlex.quote(sys.executable)} "
        '-m mesh.cli "$@"\n'
    )
    cli.chmod(0o755)
    hosts = tmp_path / "hosts.yml"
    hosts.write_text(SMALL_INVENTORY)
    secrets = tmp_path / "secrets"
    argv = [
        ansible_tool("ansible-playbook"),
        "secrets.yml",
        "-i",
        str(hosts),
        "-e",
        json.dumps(
            {
                "schedulezero_secrets_dir": str(secrets),
                "schedulezero_controller_cli": str(cli),
                "schedulezero_api_tokens": [{"name": "ops", "role": "admin"}],
            }
        ),
    ]
    first = run(*argv, cwd=ANSIBLE, env=ansible_env(tmp_path))
    assert first.returncode == 0, first.stdout + first.stderr
    keys = secrets / "keys"
    assert KeyRing(keys, "node-1").role == "node"
    assert KeyRing(keys, "worker-1-eu").role == "handler"
    for secret in keys.glob("*.key_secret"):
        assert secret.stat().st_mode & 0o777 == 0o600
    assert (secrets / "keys").stat().st_mode & 0o777 == 0o700
    token_file = secrets / "tokens" / "ops.token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    caller = ApiTokens(secrets / "tokens.json").authenticate(token_file.read_text().strip())
    assert caller is not None and caller.role == "admin"
    assert token_file.read_text().strip() not in first.stdout  # never in the log
    again = run(*argv, cwd=ANSIBLE, env=ansible_env(tmp_path))
    assert again.returncode == 0 and re.search(r"changed=0\b", again.stdout), again.stdout
