"""``schedulezero keys create`` and ``keys list``: the files they write and how they refuse."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest
from zmq.utils import z85

from mesh.cli import main
from mesh.security.keys import KeyRing, load_certificates
from tests.clierrors import one_line_error

REPO = Path(__file__).resolve().parent.parent


def keys(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["keys", *args])
    out, err = capsys.readouterr()
    return code, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_writes_a_public_and_a_private_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key_dir = tmp_path / "keys"
    code, out, err = keys(capsys, "create", "node-1", "--role", "node", "--dir", str(key_dir))
    assert code == 0, err
    assert mode(key_dir) == 0o700
    assert mode(key_dir / "node-1.key") == 0o644
    assert mode(key_dir / "node-1.key_secret") == 0o600
    assert str(key_dir / "node-1.key") in out
    assert str(key_dir / "node-1.key_secret") in out


@pytest.mark.parametrize("role", ["node", "handler", "replica"])
def test_create_records_the_role_in_the_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], role: str
) -> None:
    assert keys(capsys, "create", "p1", "--role", role, "--dir", str(tmp_path))[0] == 0
    ring = KeyRing(tmp_path, "p1")  # the secret file loads as the process's own key
    assert ring.role == role
    assert load_certificates(tmp_path)["p1"].role == role


def test_create_refuses_to_overwrite_an_existing_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys(capsys, "create", "h1", "--role", "handler", "--dir", str(tmp_path))[0] == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    code, out, err = keys(capsys, "create", "h1", "--role", "node", "--dir", str(tmp_path))
    line = one_line_error(code, err)
    assert "already exists" in line
    assert out == ""
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("create", "bad/name", "--role", "node"), "invalid key name 'bad/name'"),
        (("create", "n 1", "--role", "node"), "invalid key name"),
        (("create", "n1", "--role", "admin"), "--role: invalid choice: 'admin'"),
        (("create", "n1"), "--role"),
    ],
)
def test_create_with_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    code, _, err = keys(capsys, *args, "--dir", str(tmp_path / "keys"))
    assert needle in one_line_error(code, err)
    assert not list(tmp_path.glob("keys/*"))


def test_create_in_an_unwritable_place_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, _, err = keys(capsys, "create", "n1", "--role", "node", "--dir", str(blocker / "keys"))
    assert "cannot write keys" in one_line_error(code, err)


def test_list_shows_name_role_and_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, role in (("n1", "node"), ("h1", "handler"), ("r1", "replica")):
        assert keys(capsys, "create", name, "--role", role, "--dir", str(tmp_path))[0] == 0
    (tmp_path / "r1.key_secret").unlink()  # a peer's key: only its public half is here
    code, out, err = keys(capsys, "list", "--dir", str(tmp_path))
    assert code == 0, err
    rows = [line.split("\t") for line in out.splitlines()]
    publics = {c.name: c.public for c in load_certificates(tmp_path).values()}
    assert rows == [
        ["h1", "handler", z85.encode(publics["h1"]).decode(), "secret"],
        ["n1", "node", z85.encode(publics["n1"]).decode(), "secret"],
        ["r1", "replica", z85.encode(publics["r1"]).decode(), "-"],
    ]


def test_list_of_a_missing_directory_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = keys(capsys, "list", "--dir", str(tmp_path / "nope"))
    assert "is not a directory" in one_line_error(code, err)


def test_the_real_command_refuses_without_a_traceback(tmp_path: Path) -> None:
    args = ["keys", "create", "n1", "--role", "node", "--dir", str(tmp_path)]
    first = subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True, cwd=REPO
    )
    assert first.returncode == 0, first.stderr
    again = subprocess.run(
        [sys.executable, "-m", "mesh.cli", *args], capture_output=True, text=True, cwd=REPO
    )
    assert "already exists" in one_line_error(again.returncode, again.stderr)


def test_create_with_zone_records_the_zone_of_a_replica_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = keys(
        capsys, "create", "r1", "--role", "replica", "--zone", "dmz", "--dir", str(tmp_path)
    )
    assert code == 0, err
    assert "zone dmz" in out
    assert load_certificates(tmp_path)["r1"].zone == "dmz"
    assert KeyRing(tmp_path, "r1").zone == "dmz"


def test_a_key_created_without_zone_has_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert keys(capsys, "create", "r1", "--role", "replica", "--dir", str(tmp_path))[0] == 0
    assert load_certificates(tmp_path)["r1"].zone is None


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--role", "handler", "--zone", "dmz"), "--zone: only a replica key has a zone"),
        (("--role", "node", "--zone", "dmz"), "--zone: only a replica key has a zone"),
        (("--role", "replica", "--zone", 'a"b'), "--zone: invalid zone"),
        (("--role", "replica", "--zone", ""), "--zone: invalid zone"),
    ],
)
def test_create_refuses_a_zone_it_cannot_bind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], needle: str
) -> None:
    code, _out, err = keys(capsys, "create", "k1", *args, "--dir", str(tmp_path))
    assert needle in one_line_error(code, err)
    assert not list(tmp_path.glob("k1.*"))


def test_a_zone_on_a_non_replica_certificate_is_ignored(tmp_path: Path) -> None:
    # Edited by hand: a zone means nothing on a node key, and a bad zone is read as none
    # (the strictest filter), never as some other zone.
    from mesh.security.keys import create_key

    public, _ = create_key(tmp_path, "n1", "node")
    text = public.read_text().replace('role = "node"\n', 'role = "node"\n    zone = "dmz"\n')
    public.write_text(text)
    assert load_certificates(tmp_path)["n1"].zone is None
