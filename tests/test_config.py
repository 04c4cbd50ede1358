"""Configuration: precedence of the four layers, derived defaults, and one-line errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from mesh.config import Config, ConfigError, load_config, parse_dns_server, pub_address_of

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str, name: str = "node.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a ConfigError must be one line"
    return message


# --------------------------------------------------------------------------- precedence


def test_flags_beat_file_which_beats_env_which_beats_defaults(tmp_path: Path) -> None:
    env = {"SCHEDULEZERO_MESH": "tcp://127.0.0.1:7200"}
    path = write(tmp_path, "mesh: tcp://127.0.0.1:7300\n")
    flags = {"mesh": "tcp://127.0.0.1:7400"}

    assert load_config({}, None, {}).mesh == "tcp://127.0.0.1:7100"
    assert load_config({}, None, env).mesh == "tcp://127.0.0.1:7200"
    assert load_config({}, path, env).mesh == "tcp://127.0.0.1:7300"
    assert load_config(flags, path, env).mesh == "tcp://127.0.0.1:7400"


def test_a_flag_given_as_none_does_not_override(tmp_path: Path) -> None:
    path = write(tmp_path, "log_level: DEBUG\n")
    assert load_config({"log_level": None, "peers": None}, path, {}).log_level == "DEBUG"


def test_config_file_comes_from_env_when_no_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "node_id: from-env-file\n")
    config = load_config({}, None, {"SCHEDULEZERO_CONFIG": str(path)})
    assert config.node_id == "from-env-file"


def test_env_lists_are_comma_separated() -> None:
    env = {
        "SCHEDULEZERO_PEERS": "tcp://127.0.0.1:7102, tcp://127.0.0.1:7104",
        "SCHEDULEZERO_TASKS": "app.tasks,app.more",
        "SCHEDULEZERO_BOOTSTRAP_EXPECT": "2",
    }
    config = load_config({}, None, env)
    assert config.peers == ("tcp://127.0.0.1:7102", "tcp://127.0.0.1:7104")
    assert config.tasks == ("app.tasks", "app.more")
    assert config.bootstrap_expect == 2


def test_empty_env_variable_counts_as_unset() -> None:
    assert load_config({}, None, {"SCHEDULEZERO_NODE_ID": ""}).node_id.endswith("-7100")


def test_a_higher_layer_replaces_a_list_instead_of_merging(tmp_path: Path) -> None:
    path = write(tmp_path, "peers: [tcp://127.0.0.1:7102, tcp://127.0.0.1:7104]\n")
    config = load_config({"peers": ["tcp://127.0.0.1:7106"]}, path, {})
    assert config.peers == ("tcp://127.0.0.1:7106",)


def test_nested_sections_override_only_the_keys_given(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  heartbeat_interval: 0.05\n")
    raft = load_config({}, path, {}).raft
    assert raft.heartbeat_interval == 0.05
    assert raft.election_timeout_min == 0.3
    assert raft.pre_vote is True


# --------------------------------------------------------------------------- defaults


def test_defaults_and_path_helpers() -> None:
    config = load_config({}, None, {})
    assert config.node_id == f"{socket.gethostname()}-7100"
    assert config.data_dir == Path("data") / config.node_id
    assert config.http == "127.0.0.1:8100"
    assert config.advertise_mesh == config.mesh
    assert config.advertise_http == config.http
    assert config.mesh_host_port == ("127.0.0.1", 7100)
    assert config.pub_address == "tcp://127.0.0.1:7101"
    assert config.http_host_port == ("127.0.0.1", 8100)
    assert config.state_db_path == config.data_dir / "broker_state.db"
    assert config.eventlog_path == config.data_dir / "logs" / "events.jsonl"
    assert config.max_frame_bytes == 16 * 1024 * 1024
    assert config.eventlog.max_bytes == 10 * 1024 * 1024
    assert config.mdns_service == "_schedulezero._tcp.local."


def test_node_id_defaults_to_hostname_and_mesh_port() -> None:
    config = load_config({"mesh": "tcp://127.0.0.1:7300"}, None, {})
    assert config.node_id.endswith("-7300")
    assert config.data_dir == Path("data") / config.node_id


def test_static_bootstrap_expect_defaults_to_the_whole_peer_list() -> None:
    peers = ["tcp://127.0.0.1:7102", "tcp://127.0.0.1:7104"]
    assert load_config({"peers": peers}, None, {}).bootstrap_expect == 3
    assert load_config({}, None, {}).bootstrap_expect == 1


def test_mdns_bootstrap_expect_defaults_to_three() -> None:
    assert load_config({"discovery": "mdns"}, None, {}).bootstrap_expect == 3


def test_own_address_in_the_peer_list_is_ignored() -> None:
    peers = ["tcp://127.0.0.1:7100", "tcp://127.0.0.1:7102", "tcp://127.0.0.1:7102"]
    config = load_config({"peers": peers}, None, {})
    assert config.peers == ("tcp://127.0.0.1:7102",)
    assert config.bootstrap_expect == 2


def test_bind_all_mesh_advertises_a_concrete_address() -> None:
    config = load_config({"mesh": "tcp://0.0.0.0:7100", "http": "*:8100"}, None, {})
    assert config.mesh == "tcp://0.0.0.0:7100"
    assert config.pub_address == "tcp://0.0.0.0:7101"
    assert not config.advertise_mesh.startswith("tcp://0.0.0.0")
    assert config.advertise_mesh.endswith(":7100")
    assert config.advertise_http.endswith(":8100") and "0.0.0.0" not in config.advertise_http
    assert config.advertise_pub_address == pub_address_of(config.advertise_mesh)


def test_config_can_be_built_directly_with_derived_defaults() -> None:
    config = Config(node_id="n1", peers=("tcp://127.0.0.1:7102",))
    assert config.data_dir == Path("data/n1")
    assert config.bootstrap_expect == 2


def test_shipped_default_deployment_loads_with_builtin_values() -> None:
    config = load_config({}, REPO / "deployments/default/config.yaml", {})
    assert config.raft == load_config({}, None, {}).raft
    assert config.to_dict() == load_config({}, None, {}).to_dict()


@pytest.mark.parametrize("n", [1, 2, 3])
def test_shipped_three_node_deployment_loads(n: int) -> None:
    config = load_config({}, REPO / f"deployments/three-node/node-{n}.yaml", {})
    assert config.node_id == f"node-{n}"
    assert config.mesh == f"tcp://127.0.0.1:{7098 + 2 * n}"
    assert config.http == f"127.0.0.1:{8099 + n}"
    assert len(config.peers) == 2 and config.mesh not in config.peers
    assert config.bootstrap_expect == 3


# --------------------------------------------------------------------------- errors


def test_unknown_yaml_key_names_file_line_and_key(tmp_path: Path) -> None:
    path = write(tmp_path, "mesh: tcp://127.0.0.1:7100\npeer: [tcp://127.0.0.1:7102]\n")
    message = error_of({}, path, {})
    assert str(path) in message
    assert ":2:" in message
    assert "unknown key 'peer'" in message
    assert "did you mean 'peers'" in message


def test_unknown_nested_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  heartbeat: 0.1\n")
    message = error_of({}, path, {})
    assert str(path) in message and "raft.heartbeat" in message


def test_wrong_type_in_yaml_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "bootstrap_expect: three\n")
    message = error_of({}, path, {})
    assert "bootstrap_expect" in message and "expected an integer" in message


def test_wrong_type_in_nested_yaml_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  check_quorum: 'yes'\n")
    assert "raft.check_quorum: expected true or false" in error_of({}, path, {})


def test_section_that_is_not_a_mapping_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "raft: 3\n")
    assert "raft: expected a mapping" in error_of({}, path, {})


def test_yaml_syntax_error_reports_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "mesh: tcp://127.0.0.1:7100\npeers: [tcp://a:1\nhttp: x\n")
    message = error_of({}, path, {})
    assert message.startswith(f"{path}:")
    assert "invalid YAML" in message
    line = int(message.removeprefix(f"{path}:").split(":")[0])
    assert line >= 2


def test_top_level_yaml_must_be_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "- a\n- b\n")
    assert "expected a mapping" in error_of({}, path, {})


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert error_of({}, path, {}) == f"{path}: config file not found"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"mesh": "tcp://127.0.0.1:0"}, "--mesh: port 0 is out of range 1-65534"),
        ({"mesh": "tcp://127.0.0.1:70000"}, "--mesh: port 70000 is out of range"),
        ({"mesh": "tcp://127.0.0.1:65535"}, "--mesh: port 65535 leaves no room"),
        ({"http": "127.0.0.1:65536"}, "--http: port 65536 is out of range 1-65535"),
        ({"peers": ["tcp://127.0.0.1:99999"]}, "--peer: port 99999 is out of range"),
    ],
)
def test_ports_out_of_range(args: dict, expected: str) -> None:
    assert error_of(args, None, {}).startswith(expected)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ({"mesh": "foo"}, "--mesh: expected tcp://HOST:PORT, got 'foo'"),
        ({"mesh": "127.0.0.1:7100"}, "--mesh: expected tcp://HOST:PORT, got '127.0.0.1:7100'"),
        ({"mesh": "tcp://300.1.1.1:7100"}, "--mesh: '300.1.1.1' is not a valid IPv4 address"),
        ({"mesh": "tcp://bad_host:7100"}, "--mesh: 'bad_host' is not a valid host name"),
        ({"http": "localhost"}, "--http: expected HOST:PORT, got 'localhost'"),
        ({"peers": ["tcp://0.0.0.0:7100"]}, "--peer: 0.0.0.0 is a bind-all address"),
        ({"advertise_mesh": "tcp://*:7100"}, "--advertise-mesh: * is a bind-all address"),
        ({"node_id": "has space"}, "--node-id: expected 1-64 characters"),
        ({"node_id": "x" * 65}, "--node-id: expected 1-64 characters"),
        ({"tasks": ["not a module"]}, "--tasks: expected a Python module name"),
        ({"log_level": "LOUD"}, "--log-level: expected one of DEBUG"),
        ({"bootstrap_expect": 0}, "--bootstrap-expect: must be at least 1, got 0"),
    ],
)
def test_bad_values_name_the_flag(args: dict, expected: str) -> None:
    assert error_of(args, None, {}).startswith(expected)


def test_discovery_must_be_static_mdns_or_dns(tmp_path: Path) -> None:
    assert error_of({"discovery": "k8s"}, None, {}) == (
        "--discovery: expected one of static, mdns, dns, got 'k8s'"
    )
    path = write(tmp_path, "discovery: consul\n")
    assert "discovery: expected one of static, mdns, dns" in error_of({}, path, {})


def test_dns_discovery_needs_a_name() -> None:
    assert error_of({"discovery": "dns"}, None, {}) == (
        "discovery dns needs a name to resolve: dns.name (--dns-name)"
    )


def test_dns_settings_come_from_flags_env_and_file_in_order(tmp_path: Path) -> None:
    path = write(tmp_path, "discovery: dns\ndns:\n  name: file.test\n  max_records: 16\n")
    env = {
        "SCHEDULEZERO_DNS_NAME": "env.test",
        "SCHEDULEZERO_DNS_SRV": "yes",
        "SCHEDULEZERO_DNS_PORT": "7400",
        "SCHEDULEZERO_DNS_INTERVAL": "2.5",
    }
    config = load_config({"dns.server": "127.0.0.1:5300"}, path, env)
    assert config.dns.name == "file.test"
    assert (config.dns.srv, config.dns.port, config.dns.interval) == (True, 7400, 2.5)
    assert (config.dns.server, config.dns.max_records) == ("127.0.0.1:5300", 16)
    assert config.bootstrap_expect == 3


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ({"dns.server": "dns.example:53"}, {}, "--dns-server: expected IP[:PORT]"),
        ({"dns.server": "127.0.0.1:0"}, {}, "--dns-server: port 0 is out of range"),
        ({"dns.name": "under_score.test"}, {}, "--dns-name: expected a DNS name"),
        ({"dns.port": 65535}, {}, "--dns-port: expected a mesh port, 1-65534"),
        ({"dns.interval": 0}, {}, "--dns-interval: "),
        ({}, {"SCHEDULEZERO_DNS_SRV": "maybe"}, "SCHEDULEZERO_DNS_SRV: expected one of"),
    ],
)
def test_bad_dns_settings_name_the_flag(args: dict, env: dict, expected: str) -> None:
    assert error_of(args, None, env).startswith(expected)


def test_dns_server_accepts_ipv4_ipv6_and_a_default_port() -> None:
    assert parse_dns_server("10.0.0.10") == ("10.0.0.10", 53)
    assert parse_dns_server("10.0.0.10:5353") == ("10.0.0.10", 5353)
    assert parse_dns_server("[fd00::a]:5353") == ("fd00::a", 5353)
    assert parse_dns_server("fd00::a") == ("fd00::a", 53)


def test_bad_env_value_names_the_variable() -> None:
    message = error_of({}, None, {"SCHEDULEZERO_BOOTSTRAP_EXPECT": "many"})
    assert message == "SCHEDULEZERO_BOOTSTRAP_EXPECT: expected an integer, got 'many'"
    message = error_of({}, None, {"SCHEDULEZERO_PEERS": "tcp://127.0.0.1:7102,oops"})
    assert message == "SCHEDULEZERO_PEERS: expected tcp://HOST:PORT, got 'oops'"


def test_election_timeout_min_must_be_below_max(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  election_timeout_min: 0.6\n  election_timeout_max: 0.6\n")
    message = error_of({}, path, {})
    assert "raft.election_timeout_min (0.6) must be less than raft.election_timeout_max" in message


def test_heartbeat_must_be_below_election_timeout_min(tmp_path: Path) -> None:
    path = write(tmp_path, "raft:\n  heartbeat_interval: 0.3\n")
    message = error_of({}, path, {})
    assert "raft.heartbeat_interval (0.3) must be less than raft.election_timeout_min" in message


def test_negative_time_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "membership:\n  dead_after: -1\n")
    assert "membership.dead_after: must be greater than 0" in error_of({}, path, {})


def test_static_bootstrap_expect_cannot_exceed_the_cluster() -> None:
    message = error_of({"peers": ["tcp://127.0.0.1:7102"], "bootstrap_expect": 3}, None, {})
    assert message.startswith("bootstrap_expect (3) is larger than the static cluster")


def test_http_port_must_not_collide_with_the_mesh_ports() -> None:
    message = error_of({"http": "127.0.0.1:7101"}, None, {})
    assert message == "http port 7101 collides with the mesh ports 7100-7101"


def test_unknown_argument_key_is_an_error() -> None:
    assert error_of({"colour": "blue"}, None, {}) == "--colour: not a configuration option"


def test_dispatch_governor_and_history_sections_load_from_yaml(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "governors:\n  rate: 20\n  task_concurrency: {send: 3}\n"
        "dispatch:\n  task_timeouts: {send: 5}\n  max_attempts: 2\n"
        "history:\n  max_executions: 50\n"
    )
    c = load_config({}, path, {})
    assert c.governors.rate == 20 and c.governors.task_concurrency == {"send": 3}
    assert c.dispatch.task_timeouts == {"send": 5.0} and c.dispatch.max_attempts == 2
    assert c.history.max_executions == 50


@pytest.mark.parametrize(
    ("yaml_text", "needle"),
    [
        ("governors:\n  rate: -1\n", "governors.rate"),
        ("governors:\n  task_concurrency: {send: 0}\n", "send"),
        ("governors:\n  task_rates: [1, 2]\n", "governors.task_rates"),
        ("dispatch:\n  ack_timeout: 0\n", "dispatch.ack_timeout"),
        ("history:\n  max_executions: 0\n", "history.max_executions"),
    ],
)
def test_bad_dispatch_and_governor_settings_name_the_key(tmp_path, yaml_text, needle) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=needle):
        load_config({}, path, {})


def test_dispatch_backoff_loads_from_yaml_and_defaults_to_the_dispatchers_values(tmp_path) -> None:
    assert load_config({}, None, {}).dispatch.backoff_initial == 0.05
    assert load_config({}, None, {}).dispatch.backoff_max == 1.0
    path = write(tmp_path, "dispatch:\n  backoff_initial: 0.2\n  backoff_max: 4\n")
    dispatch = load_config({}, path, {}).dispatch
    assert (dispatch.backoff_initial, dispatch.backoff_max) == (0.2, 4.0)


def test_a_bad_value_in_a_mapping_names_its_key_and_line(tmp_path: Path) -> None:
    path = write(tmp_path, "governors:\n  task_concurrency:\n    ok: 2\n    send: 0\n")
    assert error_of({}, path, {}) == (
        f"{path}:4: governors.task_concurrency.send: must be at least 1, got 0"
    )


# --------------------------------------------------------------------------- security


def test_security_defaults_to_no_keys_and_not_insecure() -> None:
    security = load_config({}, None, {}).security
    assert security.keys is None
    assert security.insecure is False


def test_security_keys_and_insecure_from_file_env_and_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "security:\n  keys: file-keys\n  insecure: true\n")
    from_file = load_config({}, path, {}).security
    assert (from_file.keys, from_file.insecure) == (Path("file-keys"), True)
    env = {"SCHEDULEZERO_KEYS": "~/env-keys", "SCHEDULEZERO_INSECURE": "yes"}
    from_env = load_config({}, None, env).security
    assert (from_env.keys, from_env.insecure) == (Path.home() / "env-keys", True)
    flags = {"security.keys": "flag-keys", "security.insecure": True}
    assert load_config(flags, path, env).security.keys == Path("flag-keys")


def test_security_keys_merge_across_layers_key_by_key(tmp_path: Path) -> None:
    # The environment gives the keys, the file only `insecure`: both hold.
    path = write(tmp_path, "security:\n  insecure: true\n")
    security = load_config({}, path, {"SCHEDULEZERO_KEYS": "/etc/mesh/keys"}).security
    assert security.keys == Path("/etc/mesh/keys")
    assert security.insecure is True


@pytest.mark.parametrize(
    ("args", "file_text", "env", "expected"),
    [
        ({}, None, {"SCHEDULEZERO_INSECURE": "maybe"}, "SCHEDULEZERO_INSECURE: expected one of"),
        ({"security.keys": ""}, None, {}, "--keys: must not be empty"),
        ({"security.insecure": "x"}, None, {}, "--insecure: expected true or false, got 'x'"),
        ({}, "security:\n  insecure: sure\n", {}, "node.yaml:2: security.insecure: expected"),
        ({}, "security:\n  key: k\n", {}, "node.yaml:2: unknown key 'security.key'"),
    ],
)
def test_bad_security_settings_name_their_source(
    tmp_path: Path, args: dict, file_text: str | None, env: dict, expected: str
) -> None:
    path = write(tmp_path, file_text) if file_text is not None else None
    assert expected in error_of(args, path, env)


def test_the_notify_section_reads_an_unquoted_on_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "notify:\n  webhook: https://ops.example/hook\n  on: [failure, paused]\n"
        "  allow_private: true\n",
    )
    notify = load_config({}, path, {}).notify
    assert (notify.webhook, notify.on, notify.allow_private) == (
        "https://ops.example/hook", ("failure", "paused"), True)  # fmt: skip


def test_a_notify_event_that_does_not_exist_names_the_key(tmp_path: Path) -> None:
    path = write(tmp_path, "notify:\n  on: [failure, exploded]\n")
    assert "notify.on" in error_of({}, path, {})
