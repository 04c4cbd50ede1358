"""``schedulezero tokens create``: what it prints, the file it writes, and how it refuses."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from mesh.api.auth import ApiTokens, hash_token
from mesh.cli import main
from mesh.config import load_config
from tests.clierrors import one_line_error

REPO = Path(__file__).resolve().parent.parent


def tokens(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tokens", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_create_prints_the_token_and_nothing_else_and_stores_only_its_hash(
    tmp_path: Path,
) -> None:
    path = tmp_path / "tokens.json"
    # A real process: stdout must be exactly the token (for TOKEN=$(schedulezero tokens ...)).
    argv = [sys.executable, "-m", "mesh.cli", "tokens", "create", "ci", "--role", "operate"]
    result = subprocess.run(
        [*argv, "--file", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token and " " not in token and token.startswith("szt_")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    text = path.read_text()
    assert token not in text
    [entry] = json.loads(text)["tokens"]
    assert (entry["name"], entry["role"], entry["sha256"]) == ("ci", "operate", hash_token(token))
    caller = ApiTokens(path).authenticate(token)
    assert caller is not None and (caller.name, caller.role) == ("ci", "operate")


def test_create_adds_to_an_existing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    made = [
        tokens(capsys, "create", name, "--role", role, "--file", str(path))
        for name, role in (("a", "read"), ("b", "admin"))
    ]
    assert [code for code, _, _ in made] == [0, 0]
    first, second = (out.strip() for _, out, _ in made)
    api = ApiTokens(path)
    assert [(c.name, c.role) for c in map(api.authenticate, (first, second)) if c] == [
        ("a", "read"),
        ("b", "admin"),
    ]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("x", "--role", "root"), "invalid choice: 'root'"),
        (("-bad", "--role", "read"), "NAME"),
        (("a b", "--role", "read"), "invalid token name"),
        (("x",), "--role"),
    ],
)
def test_create_refuses_bad_arguments_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], expected: str
) -> None:
    path = tmp_path / "tokens.json"
    code, out, err = tokens(capsys, "create", *args, "--file", str(path))
    assert expected in one_line_error(code, err)
    assert out == "" and not path.exists()


def test_create_refuses_a_name_that_exists_and_leaves_the_file_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    assert tokens(capsys, "create", "ci", "--role", "read", "--file", str(path))[0] == 0
    before = path.read_bytes()
    code, out, err = tokens(capsys, "create", "ci", "--role", "admin", "--file", str(path))
    assert "exists" in one_line_error(code, err)
    assert out == "" and path.read_bytes() == before


def test_create_refuses_to_rewrite_a_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "tokens.json"
    path.write_text("{not json")
    code, out, err = tokens(capsys, "create", "ci", "--role", "read", "--file", str(path))
    assert "not valid JSON" in one_line_error(code, err)
    assert out == "" and path.read_text() == "{not json"


def test_the_tokens_file_and_tls_come_from_flags_env_or_config(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text("security:\n  api_tokens: /etc/sz/tokens.json\n")
    assert load_config(config_file=config).security.api_tokens == Path("/etc/sz/tokens.json")
    env = {"SCHEDULEZERO_API_TOKENS": "/e/t.json", "SCHEDULEZERO_TLS_CERT": "/e/c.pem"}
    env["SCHEDULEZERO_TLS_KEY"] = "/e/k.pem"
    sec = load_config(env=env).security
    assert (sec.api_tokens, sec.tls_cert, sec.tls_key) == tuple(
        map(Path, ("/e/t.json", "/e/c.pem", "/e/k.pem"))
    )
    flags = {"security.api_tokens": "/f/t.json"}
    assert load_config(flags, env=env).security.api_tokens == Path("/f/t.json")


def test_a_tls_cert_without_a_key_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["node", "--data-dir", str(tmp_path / "d"), "--tls-cert", str(tmp_path / "c")])
    _, err = capsys.readouterr()
    assert "--tls-key" in one_line_error(code, err)
