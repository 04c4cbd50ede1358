"""CURVE key files and the key ring a process trusts.

A key is a pair of pyzmq ``zmq.auth`` certificate files (ZPL text):

* ``DIR/NAME.key``: the public key, with ``role`` metadata (``node``, ``handler`` or ``replica``)
  and, for a replica, its ``zone`` (the zone filter the voters apply to it, docs/zones.md);
* ``DIR/NAME.key_secret``: the same plus the secret key, mode 0600.

``NAME`` is the identity: a node id, handler id or replica id *is* the name of its certificate.
A process started with ``--keys DIR`` as ``NAME`` uses ``DIR/NAME.key_secret`` and trusts exactly
the public certificates in ``DIR`` (``*.key``). The directory is read again on SIGHUP and every
:data:`RELOAD_SECONDS` (when its listing or a file's mtime changed): adding a ``.key`` file
admits a peer, deleting it revokes the peer (see :class:`KeyRing`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import attrs
import zmq
from zmq.utils import z85

log = logging.getLogger("mesh.security")

ROLES = ("node", "handler", "replica")
# How often a running process looks at its key directory for added or removed certificates.
RELOAD_SECONDS = 2.0
# Certificate names are identities (node ids, handler ids): kept to a safe file-name alphabet.
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# Zone names (a replica certificate's ``zone``, the keys of the voters' ``zones`` config).
ZONE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
_MAX_CERT_BYTES = 64 * 1024
_ZPL_LINE = re.compile(r'^\s*([A-Za-z0-9_\-]+)\s*=\s*"?([^"]*?)"?\s*$')


class KeyFileError(ValueError):
    """A key file or directory that cannot be used; the message says which and why."""


def check_name(name: str) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise KeyFileError(
            f"invalid key name {name!r}: use 1-128 of A-Z a-z 0-9 _ . - (not starting with . - _)"
        )
    return name


def check_zone(zone: str) -> str:
    if not isinstance(zone, str) or ZONE_RE.fullmatch(zone) is None:
        raise KeyFileError(
            f"invalid zone {zone!r}: use 1-64 of A-Z a-z 0-9 _ . - (not starting with . - _)"
        )
    return zone


@attrs.frozen
class Certificate:
    """A trusted public key: its name (the identity), role and the 32-byte CURVE public key.

    ``zone`` is a replica's zone (``zone`` metadata), None when the certificate names none:
    the voters then serve it their strictest filter (docs/zones.md).
    """

    name: str
    role: str
    public: bytes
    zone: str | None = None


def create_key(
    directory: str | os.PathLike[str], name: str, role: str, *, zone: str | None = None
) -> tuple[Path, Path]:
    """Write ``DIR/NAME.key`` and ``DIR/NAME.key_secret`` (0600); refuse to overwrite either.

    ``zone`` (replica keys only) is written as ``zone`` metadata in both files.
    """
    check_name(name)
    if role not in ROLES:
        raise KeyFileError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    if zone is not None:
        check_zone(zone)
        if role != "replica":
            raise KeyFileError(f"only a replica key has a zone, not a {role} key")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    public, secret = d / f"{name}.key", d / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} already exists; delete it first to replace the key")
    public_key, secret_key = zmq.curve_keypair()
    # The ZPL layout of zmq.auth (which zmq.auth.load_certificate reads), with the role in both
    # files: pyzmq's own writer puts metadata in the secret file only, unquoted.
    zone_line = f'    zone = "{zone}"\n' if zone is not None else ""
    body = (
        f'metadata\n    role = "{role}"\n{zone_line}'
        f'curve\n    public-key = "{public_key.decode()}"\n'
    )
    in_zone = f", zone {zone}" if zone is not None else ""
    banner = f"#   ScheduleZero Mesh CURVE certificate for {name} (role {role}{in_zone})\n"
    _write(public, banner + body, 0o644)
    _write(secret, banner + body + f'    secret-key = "{secret_key.decode()}"\n', 0o600)
    return public, secret


def _write(path: Path, text: str, mode: int) -> None:
    # Created with its final mode (O_EXCL: never over an existing file), so the secret is
    # private from its first byte on.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def _read_cert(path: Path) -> tuple[dict[str, str], bytes, bytes | None]:
    """(metadata, public key, secret key or None) of a certificate file; raises KeyFileError."""
    try:
        if path.stat().st_size > _MAX_CERT_BYTES:
            raise KeyFileError(f"{path}: too large to be a certificate")
        text = path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KeyFileError(f"{path}: cannot read: {e}") from e
    section = ""
    meta: dict[str, str] = {}
    keys: dict[str, str] = {}
    for raw in text.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        if not raw[0].isspace():
            section = raw.strip()
            continue
        m = _ZPL_LINE.match(raw)
        if m is None:
            continue
        if section == "metadata":
            meta[m.group(1)] = m.group(2)
        elif section == "curve":
            keys[m.group(1)] = m.group(2)
    try:
        public = z85.decode(keys["public-key"])
        secret = z85.decode(keys["secret-key"]) if "secret-key" in keys else None
    except (KeyError, ValueError, TypeError) as e:
        raise KeyFileError(f"{path}: no valid curve public-key in it") from e
    if len(public) != 32 or (secret is not None and len(secret) != 32):
        raise KeyFileError(f"{path}: a CURVE key is 40 Z85 characters")
    return meta, public, secret


def load_certificates(directory: str | os.PathLike[str]) -> dict[str, Certificate]:
    """Every valid ``*.key`` in ``directory`` by name; a bad file is skipped with a warning."""
    d = Path(directory)
    certs: dict[str, Certificate] = {}
    for path in sorted(d.glob("*.key")):
        name = path.name[: -len(".key")]
        try:
            check_name(name)
            meta, public, _ = _read_cert(path)
        except KeyFileError as e:
            log.warning("ignoring certificate: %s", e)
            continue
        role = meta.get("role", "")
        if role not in ROLES:
            log.warning("ignoring certificate %s: role %r is not one of %s", path, role, ROLES)
            continue
        zone = meta.get("zone")
        if zone is not None and (role != "replica" or ZONE_RE.fullmatch(zone) is None):
            # Read as no zone: a replica is then served the strictest filter, never a laxer one.
            log.warning("certificate %s: ignoring zone %r (invalid, or not a replica)", path, zone)
            zone = None
        certs[name] = Certificate(name, role, public, zone)
    return certs


def _listing(directory: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        entries = [
            (p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in directory.glob("*.key")
        ]
    except OSError:
        return ()
    return tuple(sorted(entries))


class KeyRing:
    """This process's own key pair and the public certificates it trusts, kept current.

    ``certificates`` is replaced whole on :meth:`reload` (never mutated), so readers on the
    event loop always see one consistent set. Lookups by public key and by name are O(1).
    """

    def __init__(self, directory: str | os.PathLike[str], name: str) -> None:
        self.directory = Path(directory)
        self.name = check_name(name)
        if not self.directory.is_dir():
            raise KeyFileError(f"key directory {self.directory} does not exist")
        secret_path = self.directory / f"{name}.key_secret"
        if not secret_path.exists():
            raise KeyFileError(
                f"no secret key for {name!r}: expected {secret_path} "
                f"(create it with: schedulezero keys create {name} --role ROLE --dir "
                f"{self.directory})"
            )
        mode = secret_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise KeyFileError(f"{secret_path} is readable by others (mode {mode:o}); chmod 600 it")
        meta, public, secret = _read_cert(secret_path)
        if secret is None:
            raise KeyFileError(f"{secret_path} holds no secret-key")
        self.public, self.secret = public, secret
        self.role = meta.get("role", "")
        self.certificates: Mapping[str, Certificate] = {}
        self._by_public: Mapping[bytes, Certificate] = {}
        self._listing: tuple[tuple[str, int, int], ...] | None = None
        self.reload()
        own = self.certificates.get(name)
        if own is None or own.public != public:
            raise KeyFileError(
                f"{self.directory / (name + '.key')} is missing or does not match "
                f"{secret_path}: a process must trust its own public certificate"
            )
        self.role = own.role
        self.zone = own.zone  # a replica's zone; None for other keys

    def reload(self, *, force: bool = False) -> tuple[set[str], set[str]]:
        """Read the directory again if it changed; returns (added, removed) names."""
        listing = _listing(self.directory)
        if listing == self._listing and not force:
            return set(), set()
        self._listing = listing
        new = load_certificates(self.directory)
        old = self.certificates
        added = {n for n in new if n not in old or old[n] != new[n]}
        removed = {n for n in old if n not in new or old[n] != new[n]}
        self.certificates = new
        self._by_public = {c.public: c for c in new.values()}
        if old and (added or removed):
            log.info(
                "key ring %s reloaded: added %s, removed %s",
                self.directory,
                sorted(added) or "-",
                sorted(removed) or "-",
            )
        return added, removed

    def by_public(self, public: bytes) -> Certificate | None:
        return self._by_public.get(public)

    def get(self, name: str) -> Certificate | None:
        return self.certificates.get(name)

    def names(self, role: str) -> list[str]:
        return sorted(n for n, c in self.certificates.items() if c.role == role)
