"""Who may call the HTTP API: bearer tokens, roles, the audit trail and redaction for readers.

Tokens file (``--api-tokens FILE``, the same file on every node). JSON, mode 0600, one entry per
token; it stores only the SHA-256 of each token, never the token::

    {"tokens": [{"name": "ci", "role": "operate", "sha256": "<64 hex>", "created": "..."}]}

A token is ``szt_`` + 43 URL-safe characters (256 random bits). Why a plain SHA-256 and not a
salted slow hash (bcrypt, scrypt, argon2): those exist to make guessing *low-entropy* passwords
expensive. Guessing a 256-bit random value is infeasible at any hash speed, and a salt only
defeats precomputed tables, which cannot exist for such values either. A slow hash would instead
cost every API request tens of milliseconds of CPU: a denial of service anyone could trigger
with garbage tokens. Presented tokens are compared with :func:`hmac.compare_digest` against every
entry, so the time taken does not depend on how much of a hash matched.

Roles are ordered ``read`` < ``operate`` < ``admin``; :func:`required_role` says what a request
needs. The file is re-read when its mtime, size or inode changes (checked at most once per
:data:`RELOAD_CHECK_SECONDS`), so ``schedulezero tokens create`` on a running cluster takes effect
without a restart; an unreadable or invalid file then refuses every token (fail closed).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import attrs
from aiohttp import web

from mesh.security.redact import DEFAULT_SENSITIVE_KEYS, MASK, redact

log = logging.getLogger("mesh.api.auth")

ROLES = ("read", "operate", "admin")
_RANK = {role: rank for rank, role in enumerate(ROLES)}
TOKEN_PREFIX = "szt_"
RELOAD_CHECK_SECONDS = 1.0
_MAX_FILE_BYTES = 4 * 1024 * 1024
_MAX_TOKEN_CHARS = 512  # longer Authorization values are refused without hashing them
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@\-]{0,127}")
_HASH_RE = re.compile(r"[0-9a-f]{64}")

# Headers a follower adds when it forwards a write to the leader (see mesh.api.http): the
# address of the client it received the request from. Reported, not proven: the audit also
# keeps the TCP peer the leader actually saw.
CLIENT_HEADER = "X-ScheduleZero-Client"
# The id of the node that forwarded a write (mesh.api.http.FORWARDED_HEADER).
FORWARDED_BY_HEADER = "X-ScheduleZero-Forwarded-By"
# Set on a request by the forwarding middleware once the leader answered it: the leader audits it.
FORWARDED_KEY: web.RequestKey[str] = web.RequestKey("forwarded_to", str)

# Fields of API responses that hold user data (schedule args/kwargs/metadata, job results):
# ``read`` callers see the values of sensitive keys inside them as "***".
USER_DATA_FIELDS = frozenset({"args", "kwargs", "metadata", "result", "results", "return_value"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
OPEN_PATHS = frozenset({"/api/health"})
ADMIN_PREFIXES = ("/api/audit", "/api/backup", "/api/restore")
# Reads audited like mutations: a backup holds every schedule's args and kwargs (mesh.api.backup).
AUDITED_READS = frozenset({"/api/backup"})


class TokenFileError(ValueError):
    """A tokens file that cannot be used; the message says which and why (one line)."""


@attrs.frozen
class TokenEntry:
    name: str
    role: str
    sha256: str


@attrs.frozen
class Caller:
    """Who is calling: a token's name and role; ``name=None`` when the API has no tokens."""

    name: str | None
    role: str | None

    def may(self, role: str) -> bool:
        return self.role is None or _RANK[self.role] >= _RANK[role]


ANONYMOUS = Caller(None, None)  # no tokens file: loopback-only, every right (docs/security.md)
# ``security.anonymous_reads``: a caller without a token who only reads. A ``read`` caller, so
# everything a read token's holder sees masked it sees masked too.
ANONYMOUS_READER = Caller(None, "read")
# Who the middleware let through, for handlers that redact themselves (a streamed response's
# body is not there to rewrite afterwards: mesh.api.events).
CALLER_KEY: web.RequestKey[Caller] = web.RequestKey("caller", Caller)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


# --------------------------------------------------------------------------- the file


def load_tokens(path: str | os.PathLike[str]) -> list[TokenEntry]:
    """The entries of a tokens file; raises :class:`TokenFileError` (one line) if unusable."""
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_FILE_BYTES:
            raise TokenFileError(f"{p}: too large to be a tokens file")
        text = p.read_text("utf-8")
    except FileNotFoundError:
        raise TokenFileError(
            f"{p}: tokens file not found (create it with: schedulezero tokens create NAME "
            f"--role admin --file {p})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenFileError(f"{p}: cannot read tokens file: {e}") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise TokenFileError(f"{p}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("tokens"), list):
        raise TokenFileError(f'{p}: expected {{"tokens": [...]}}')
    entries: list[TokenEntry] = []
    names: set[str] = set()
    for i, item in enumerate(data["tokens"]):
        where = f"{p}: tokens[{i}]"
        if not isinstance(item, dict):
            raise TokenFileError(f"{where}: expected an object")
        name, role, digest = item.get("name"), item.get("role"), item.get("sha256")
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
            raise TokenFileError(f"{where}: invalid name {name!r}")
        if role not in ROLES:
            raise TokenFileError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(digest, str) or _HASH_RE.fullmatch(digest) is None:
            raise TokenFileError(f"{where}: sha256 must be 64 lowercase hex digits")
        if name in names:
            raise TokenFileError(f"{where}: the name {name!r} appears twice")
        names.add(name)
        entries.append(TokenEntry(name, role, digest))
    return entries


def create_token(path: str | os.PathLike[str], name: str, role: str) -> str:
    """Add a token ``name`` with ``role`` to the tokens file (created 0600); return the token.

    The file is rewritten whole and renamed into place, so a node reloading it never reads half a
    file. An existing name is refused: revoke by deleting its entry, then create it again.
    """
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise TokenFileError(
            f"invalid token name {name!r}: use 1-128 of A-Z a-z 0-9 _ . @ - "
            "(starting with a letter or digit)"
        )
    if role not in ROLES:
        raise TokenFileError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    p = Path(path)
    data: dict[str, Any] = {"tokens": []}
    if p.exists():
        load_tokens(p)  # refuse to rewrite a file we cannot read correctly
        data = json.loads(p.read_text("utf-8"))
        if any(t.get("name") == name for t in data["tokens"]):
            raise TokenFileError(
                f"{p}: a token named {name!r} exists; delete its entry first to replace it"
            )
    token = new_token()
    created = datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    data["tokens"].append(
        {"name": name, "role": role, "sha256": hash_token(token), "created": created}
    )
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)  # mkstemp: mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return token


class ApiTokens:
    """The tokens a node accepts, kept current with the file (see the module docstring)."""

    def __init__(
        self, path: str | os.PathLike[str], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.path = Path(path)
        self._clock = clock
        mode = self.path.stat().st_mode & 0o777 if self.path.exists() else 0
        if mode & 0o022:
            # Whoever can write the file can mint an admin token.
            raise TokenFileError(
                f"{self.path} is writable by group or others (mode {mode:o}); chmod 600 it"
            )
        self._entries = load_tokens(self.path)
        self._stamp = self._file_stamp()
        self._checked = clock()
        # Tokens this process made for itself (never written anywhere): add_internal.
        self._internal: list[TokenEntry] = []

    def add_internal(self, name: str, role: str) -> str:
        """A token for this node's own calls to its API (the scenario runner's ``http_get``):
        random, held in memory only, gone when the process ends; returns it."""
        if role not in ROLES:
            raise ValueError(f"invalid role {role!r}")
        token = new_token()
        self._internal.append(TokenEntry(name, role, hash_token(token)))
        return token

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _maybe_reload(self) -> None:
        now = self._clock()
        if now - self._checked < RELOAD_CHECK_SECONDS:
            return
        self._checked = now
        stamp = self._file_stamp()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            self._entries = load_tokens(self.path)
        except TokenFileError as e:
            # Fail closed: a broken edit must not keep a token working that it meant to revoke.
            self._entries = []
            log.error("tokens file unusable, refusing every token until it is fixed: %s", e)
            return
        log.info("tokens file %s reloaded: %d tokens", self.path, len(self._entries))

    def authenticate(self, token: str) -> Caller | None:
        """The caller a token belongs to, or None."""
        self._maybe_reload()
        if not token or len(token) > _MAX_TOKEN_CHARS:
            return None
        digest = hash_token(token)
        found: TokenEntry | None = None
        for entry in (*self._entries, *self._internal):  # no early exit: timing says nothing
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return Caller(found.name, found.role) if found is not None else None


# --------------------------------------------------------------------------- roles


def required_role(method: str, path: str) -> str | None:
    """The role a request needs, or None for the open paths (health, metrics, dashboard)."""
    if not path.startswith("/api/") or path in OPEN_PATHS:
        return None
    if path.startswith(ADMIN_PREFIXES):
        return "admin"
    safe = method.upper() in SAFE_METHODS
    if path == "/api/cluster/members" or path.startswith("/api/cluster/members/"):
        return "read" if safe else "admin"
    return "read" if safe else "operate"


def bearer_token(request: web.Request) -> str | None:
    value = request.headers.get("Authorization", "")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


# --------------------------------------------------------------------------- audit


class AuditSink(Protocol):
    """Where mutations are recorded (the node's ``broker_state.db``: ``AuditLog``)."""

    def record(self, entry: dict[str, Any]) -> int: ...

    def page(self, *, after: int, limit: int) -> list[dict[str, Any]]: ...


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _redacted(value: Any, names: tuple[str, ...], depth: int = 0) -> Any:
    """``value`` with sensitive keys masked inside every user-data field, at any depth."""
    if depth > 64:
        return MASK  # fail closed rather than recurse without end
    if isinstance(value, dict):
        return {
            k: redact(v, names) if k in USER_DATA_FIELDS else _redacted(v, names, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_redacted(v, names, depth + 1) for v in value]
    return value


def redact_for_reader(response: web.StreamResponse, names: tuple[str, ...]) -> None:
    """Mask secrets in a JSON response body in place (for ``read`` callers)."""
    if not isinstance(response, web.Response) or response.content_type != "application/json":
        return
    body = response.body
    if not isinstance(body, bytes | bytearray) or not body:
        return
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return
    response.body = json.dumps(_redacted(data, names)).encode()


def _schedule_id(request: web.Request, response: web.StreamResponse | None, raw: bytes) -> Any:
    if sid := request.match_info.get("id"):
        return sid
    if request.path.rstrip("/") != "/api/schedules":
        return None
    for source in (
        raw,
        response.body if isinstance(response, web.Response) else None,
    ):
        if isinstance(source, bytes | bytearray) and source:
            try:
                data = json.loads(source)
            except (ValueError, RecursionError):  # not JSON, or nested too deep to look into
                continue
            if isinstance(data, dict) and isinstance(data.get("id"), str):
                return data["id"][:200]
    return None


def auth_middleware(
    tokens: ApiTokens | None,
    *,
    node_id: str,
    audit: AuditSink | None = None,
    sensitive_keys: Iterable[str] | None = None,
    anonymous_reads: bool = False,
) -> Any:
    """The outermost middleware: authenticate, check the role, audit mutations (and the reads of
    ``AUDITED_READS``), redact reads.

    ``tokens=None`` (no tokens file) lets every request through as :data:`ANONYMOUS` (the node
    then binds loopback only, see mesh.app); mutations are still audited.

    ``anonymous_reads`` (``security.anonymous_reads``): a request that needs only ``read`` and
    carries no token is served as :data:`ANONYMOUS_READER` (redacted like any ``read`` caller).
    A token that is sent is still checked (a wrong one: 401), and everything that needs more
    than ``read`` still needs its token. Without a tokens file every caller is the anonymous
    reader, whatever it sends: a GET that needs more (``/api/audit``) answers 403, and a
    mutation goes on to the read-only middleware, which ``create_app`` requires in that case
    (mesh.security.policy refuses the combination on a writable node) and which answers 403.
    """
    names = tuple(sensitive_keys) if sensitive_keys is not None else DEFAULT_SENSITIVE_KEYS

    @web.middleware
    async def authenticate(request: web.Request, handler: Any) -> web.StreamResponse:
        needed = required_role(request.method, request.path)
        if needed is None:
            return await handler(request)
        caller: Caller | None = ANONYMOUS
        response: web.StreamResponse | None = None
        token = bearer_token(request)
        if tokens is None and anonymous_reads:
            caller = ANONYMOUS_READER
            if needed != "read" and request.method in SAFE_METHODS:
                response = _error(
                    403,
                    f"this API serves anonymous reads only: {request.method} {request.path} "
                    f"needs {needed!r}",
                )
        elif anonymous_reads and token is None and needed == "read":
            caller = ANONYMOUS_READER
        elif tokens is not None:
            caller = tokens.authenticate(token) if token else None
            if caller is None:
                why = "missing" if token is None else "invalid"
                response = _error(
                    401,
                    f"{why} API token: send Authorization: Bearer TOKEN",
                    **{"WWW-Authenticate": 'Bearer realm="schedulezero"'},
                )
            elif not caller.may(needed):
                response = _error(
                    403,
                    f"token {caller.name!r} has role {caller.role!r}; "
                    f"{request.method} {request.path} needs {needed!r}",
                )
        if response is None:
            if caller is not None:
                request[CALLER_KEY] = caller
            response = await handler(request)
            if caller is not None and caller.role == "read":
                redact_for_reader(response, names)
        if (
            audit is not None
            and (request.method not in SAFE_METHODS or request.path in AUDITED_READS)
            # A write the leader answered for us is in the leader's audit, not ours.
            and FORWARDED_KEY not in request
        ):
            await _record(audit, request, response, caller, node_id)
        return response

    return authenticate


async def _record(
    audit: AuditSink,
    request: web.Request,
    response: web.StreamResponse,
    caller: Caller | None,
    node_id: str,
) -> None:
    forwarded_by = request.headers.get(FORWARDED_BY_HEADER)
    peer = request.remote or ""
    raw = b""
    if response.status not in (401, 403) and request.path.rstrip("/") == "/api/schedules":
        # The id of a create is in its body, which the handler read (aiohttp keeps it); a
        # caller refused above never gets its body read.
        try:
            raw = await request.read()
        except Exception:
            raw = b""
    entry = {
        "ts": datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "node_id": node_id,
        "received_by": (forwarded_by or node_id)[:128],
        "token": caller.name if caller is not None else None,
        "role": caller.role if caller is not None else None,
        "method": request.method[:16],
        "path": request.path[:512],
        "schedule_id": _schedule_id(request, response, raw),
        "client": (request.headers.get(CLIENT_HEADER, peer) if forwarded_by else peer)[:128],
        "peer": peer[:128],
        "status": response.status,
    }
    try:
        audit.record(entry)
    except Exception:
        # The request already happened; losing its audit row must be loud, not a 500.
        log.exception("could not record audit entry %s", entry)


def add_audit_route(app: web.Application, audit: AuditSink) -> None:
    """``GET /api/audit?limit=&after=``: mutations recorded on this node, oldest first."""

    async def audit_page(request: web.Request) -> web.Response:
        q = request.query
        unknown = set(q) - {"limit", "after"}
        if unknown:
            return _error(400, f"unknown query parameter {sorted(unknown)[0]!r}")
        limit_raw, after_raw = q.get("limit", "100"), q.get("after", "0")
        if not limit_raw.isascii() or not limit_raw.isdigit() or not 1 <= int(limit_raw) <= 1000:
            return _error(400, f"limit must be an integer from 1 to 1000, got {limit_raw!r}")
        if not after_raw.isascii() or not after_raw.isdigit() or len(after_raw) > 18:
            return _error(400, f"after must be an audit entry id (an integer), got {after_raw!r}")
        limit = int(limit_raw)
        items = audit.page(after=int(after_raw), limit=limit)
        next_after = items[-1]["id"] if len(items) == limit else None
        return web.json_response({"audit": items, "next_after": next_after})

    app.router.add_get("/api/audit", audit_page)
