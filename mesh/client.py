"""A small synchronous client of a node's HTTP API (docs/api.md), used by the CLI's client
commands (docs/cli.md) and usable from scripts.

Standard library only (urllib, ssl): a client needs nothing the node's dependencies would add.
Every failure is an :class:`ApiError` carrying one line to show: the API's ``{"error"}`` message
with its status, or why the node could not be reached.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "DEFAULT_URL",
    "ApiClient",
    "ApiError",
    "ClientConfigError",
    "describe_trigger",
    "format_table",
    "short_time",
]

DEFAULT_URL = "http://127.0.0.1:8100"
DEFAULT_TIMEOUT = 30.0  # a write waits for a majority; the API answers 503 well before this
MAX_PAGES = 100_000  # a server whose `next` never ends must not loop us forever
# apply_schedules: bodies per POST /api/schedules/bulk, and roughly the most JSON bytes in one
# (the API takes at most 5,000 and api.max_body_bytes, 1 MiB by default).
BULK_CHUNK = 1000
BULK_CHUNK_BYTES = 768 * 1024


class ApiError(Exception):
    """The API refused a call (``status`` is its HTTP code) or could not be reached
    (``status`` is None). ``str(error)`` is one line."""

    def __init__(self, message: str, status: int | None = None, body: Any = None) -> None:
        super().__init__(" ".join(message.split()))
        self.status = status
        self.body = body  # the decoded answer of a refusal (its fields beside "error")


class ClientConfigError(ValueError):
    """The client itself is misconfigured (a bad URL, an unreadable CA file)."""


class ApiClient:
    """Calls on one node: ``url`` is its base (``http[s]://HOST:PORT``), ``token`` a bearer
    token (docs/security.md), ``cacert`` a PEM file of the CA to trust for HTTPS."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        token: str | None = None,
        cacert: str | Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ClientConfigError(f"--url: expected http://HOST:PORT or https://..., got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or None
        self.cacert = cacert
        self.timeout = timeout
        handlers: list[Any] = [urllib.request.ProxyHandler({})]  # the API is never proxied
        if cacert is not None:
            try:
                context = ssl.create_default_context(cafile=str(cacert))
            except (OSError, ssl.SSLError) as e:
                raise ClientConfigError(f"--cacert: cannot load {cacert}: {e}") from None
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------ transport

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        query: Mapping[str, Any] | None = None,
        text: str | None = None,
    ) -> Any:
        """One call; the decoded JSON answer (None for an empty one), or ApiError. ``text``
        is a body that is not JSON (a scenario's YAML), sent as ``text/plain``."""
        data, content_type = None, "application/json"
        if text is not None:
            data, content_type = text.encode(), "text/plain; charset=utf-8"
        elif body is not None:
            data = json.dumps(body).encode()
        req = self._request(method, path, query, data, content_type)
        req.add_header("Accept", "application/json")
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except urllib.error.URLError as e:
            raise ApiError(f"cannot reach {self.url}: {_reason(e.reason)}") from None
        except (OSError, ValueError) as e:  # a reset connection, a timeout, a bad port
            raise ApiError(f"cannot reach {self.url}: {_reason(e)}") from None
        decoded = _decode(raw)
        if status >= 400:
            raise ApiError(f"{status}: {_error_message(status, decoded)}", status, decoded)
        return decoded

    def _request(
        self,
        method: str,
        path: str,
        query: Mapping[str, Any] | None = None,
        data: bytes | None = None,
        content_type: str = "application/json",
    ) -> urllib.request.Request:
        url = self.url + path + _query_string(query)  # ids: quoted by the callers (_segment)
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        return req

    def text(self, path: str, query: Mapping[str, Any] | None = None) -> str:
        """``GET path`` answered with text that is not JSON (a CSV export); ApiError as
        ``request``."""
        sink = io.BytesIO()
        self.download(path + _query_string(query), sink)
        return sink.getvalue().decode("utf-8", "replace")

    def events(self, path: str, *, idle: float = 60.0) -> Iterator[tuple[str, Any]]:
        """A Server-Sent Events stream: ``(event, decoded data)`` per event as it arrives.
        ``idle`` bounds the wait for the next line (the API sends a keepalive comment every
        15 s). ApiError as ``request`` if it cannot start; a stream cut short, or silent for
        ``idle`` seconds, raises ApiError with status None."""
        req = self._request("GET", path)
        req.add_header("Accept", "text/event-stream")
        try:
            resp = self._opener.open(req, timeout=idle)
        except urllib.error.HTTPError as e:
            decoded = _decode(e.read())
            raise ApiError(
                f"{e.code}: {_error_message(e.code, decoded)}", e.code, decoded
            ) from None
        except urllib.error.URLError as e:
            raise ApiError(f"cannot reach {self.url}: {_reason(e.reason)}") from None
        except (OSError, ValueError) as e:
            raise ApiError(f"cannot reach {self.url}: {_reason(e)}") from None
        with resp:
            try:
                yield from _sse(resp)
            except (http.client.HTTPException, OSError, ValueError) as e:
                raise ApiError(f"the stream from {self.url} broke: {_reason(e)}") from None

    def download(self, path: str, sink: BinaryIO, *, chunk: int = 1 << 20) -> int:
        """``GET path`` with its body written to ``sink`` a piece at a time (a backup can be
        larger than memory); returns the bytes written. ApiError as ``request``; a body shorter
        than its Content-Length is one too."""
        req = self._request("GET", path)
        written = 0
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                while piece := resp.read(chunk):
                    sink.write(piece)
                    written += len(piece)
        except urllib.error.HTTPError as e:
            decoded = _decode(e.read())
            message = f"{e.code}: {_error_message(e.code, decoded)}"
            raise ApiError(message, e.code, decoded) from None
        except urllib.error.URLError as e:
            raise ApiError(f"cannot reach {self.url}: {_reason(e.reason)}") from None
        except http.client.HTTPException:  # IncompleteRead: the connection ended early
            raise ApiError(f"the answer from {self.url} was cut short") from None
        except (OSError, ValueError) as e:
            raise ApiError(f"cannot reach {self.url}: {_reason(e)}") from None
        return written

    def pages(
        self, path: str, key: str, query: Mapping[str, Any] | None = None, *, limit: int = 0
    ) -> Iterator[dict[str, Any]]:
        """The items under ``key`` of a list endpoint, following ``next`` page after page
        (docs/api.md "Pages"); at most ``limit`` items when it is positive."""
        params = dict(query or {})
        seen = 0
        for _ in range(MAX_PAGES):
            page = self.request("GET", path, query=params)
            if not isinstance(page, dict) or not isinstance(page.get(key), list):
                raise ApiError(f"unexpected answer from GET {path}: no {key!r} list")
            for item in page[key]:
                yield item
                seen += 1
                if limit and seen >= limit:
                    return
            nxt = page.get("next")
            if not nxt or nxt == params.get("after"):
                return
            params["after"] = nxt

    # ------------------------------------------------------------------ schedules

    def schedules(self) -> list[dict[str, Any]]:
        return list(self.pages("/api/schedules", "schedules"))

    def schedule(self, schedule_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/schedules/{_segment(schedule_id)}")

    def create_schedule(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", "/api/schedules", dict(body))

    def replace_schedule(self, schedule_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PUT", f"/api/schedules/{_segment(schedule_id)}", dict(body))

    def apply_schedule(self, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create the schedule, or replace it when its id exists: ``("created"|"replaced",
        schedule)``. A body without an id can only be created."""
        schedule_id = body.get("id")
        if not isinstance(schedule_id, str) or not schedule_id:
            return "created", self.create_schedule(body)
        try:
            self.schedule(schedule_id)
        except ApiError as e:
            if e.status != 404:
                raise
            try:
                return "created", self.create_schedule(body)
            except ApiError as e2:
                if e2.status != 409:  # 409: created meanwhile by someone else; replace it
                    raise
        return "replaced", self.replace_schedule(schedule_id, body)

    def bulk_schedules(
        self, bodies: Sequence[Mapping[str, Any]], *, replace: bool = True
    ) -> dict[str, Any]:
        """One ``POST /api/schedules/bulk`` (docs/api.md, "Many at once"): the API's answer
        ``{"created", "updated", "unchanged", "conflicts", "schedules", "warnings"?}``."""
        body = {"schedules": [dict(b) for b in bodies], "replace": replace}
        return self.request("POST", "/api/schedules/bulk", body)

    def apply_schedules(
        self,
        bodies: Sequence[Mapping[str, Any]],
        *,
        chunk: int = BULK_CHUNK,
        chunk_bytes: int = BULK_CHUNK_BYTES,
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """Create or replace every body with ``POST /api/schedules/bulk``, at most ``chunk``
        bodies and about ``chunk_bytes`` of JSON per request: ``(index of the request's first
        body, the API's answer)`` per request, in order. An ApiError stops it (the requests
        before are in; a 400's ``schedules[N]`` is renumbered to count from the first body)."""
        start = 0
        while start < len(bodies):
            end, size = start, 0
            while end < len(bodies) and end - start < chunk:
                size += len(json.dumps(bodies[end])) + 2
                if size > chunk_bytes and end > start:
                    break
                end += 1
            try:
                answer = self.bulk_schedules(bodies[start:end])
            except ApiError as e:
                if start and e.status == 400:
                    raise ApiError(_renumber(str(e), start), e.status) from None
                raise
            yield start, answer
            start = end

    def pause(self, schedule_id: str, note: str | None = None) -> dict[str, Any]:
        body = {"note": note} if note is not None else None
        return self.request("POST", f"/api/schedules/{_segment(schedule_id)}/pause", body)

    def resume(self, schedule_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/schedules/{_segment(schedule_id)}/resume")

    def delete_schedule(self, schedule_id: str) -> None:
        self.request("DELETE", f"/api/schedules/{_segment(schedule_id)}")

    def trigger(self, schedule_id: str) -> Any:
        return self.request("POST", f"/api/schedules/{_segment(schedule_id)}/trigger")

    def backfill(self, schedule_id: str, start: str, end: str) -> Any:
        body = {"start": start, "end": end}
        return self.request("POST", f"/api/schedules/{_segment(schedule_id)}/backfill", body)

    # ------------------------------------------------------------------ the rest

    def run_job(
        self, task: str, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Run ``task`` once now: ``{"job_id", "warnings"?}``."""
        body = {"task": task, "args": list(args), "kwargs": dict(kwargs or {})}
        return self.request("POST", "/api/jobs", body)

    def job(self, job_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/jobs/{_segment(job_id)}")

    def executions(
        self,
        *,
        schedule_id: str | None = None,
        outcome: str | None = None,
        since: str | None = None,
        limit: int = 0,
    ) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"schedule_id": schedule_id, "outcome": outcome, "since": since}
        if limit:
            query["limit"] = limit  # one page holds them all when the server allows it
        return list(self.pages("/api/executions", "executions", query, limit=limit))

    # ------------------------------------------------------------------ scenarios

    def scenarios(self) -> list[dict[str, Any]]:
        """The loaded scenarios (``GET /api/tests``)."""
        return self.request("GET", "/api/tests")["scenarios"]

    def scenario(self, name: str) -> dict[str, Any]:
        """One loaded scenario with its ``definition`` (and ``source``, for operate and up)."""
        return self.request("GET", f"/api/tests/library/{_segment(name)}")

    def load_scenario(self, text: str) -> dict[str, Any]:
        """Load (or replace) a scenario from its YAML text: ``{"name", "version"}``."""
        return self.request("POST", "/api/tests/load", text=text)

    def run_scenario(self, name: str, parameters: Mapping[str, Any] | None = None) -> str:
        """Queue a run of the loaded scenario ``name``; its run id."""
        body: dict[str, Any] = {"name": name}
        if parameters:
            body["parameters"] = dict(parameters)
        return self.request("POST", "/api/tests/run", body)["run_id"]

    def schedule_scenario(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """``POST /api/tests/schedule`` (``{"name", "trigger", "parameters"?, "id"?}``)."""
        return self.request("POST", "/api/tests/schedule", dict(body))

    def scenario_result(self, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/api/tests/results/{_segment(run_id)}")

    def scenario_runs(self, name: str | None = None, limit: int | None = None) -> list[Any]:
        """The runs, newest first (the API keeps a bounded history)."""
        return self.request("GET", "/api/tests/runs", query={"name": name, "limit": limit})["runs"]

    def cancel_scenario(self, run_id: str) -> dict[str, Any]:
        return self.request("POST", f"/api/tests/runs/{_segment(run_id)}/cancel")

    def handlers(self) -> list[dict[str, Any]]:
        return list(self.pages("/api/handlers", "handlers"))

    def health(self) -> dict[str, Any]:
        return self.request("GET", "/api/health")

    def cluster(self) -> dict[str, Any]:
        return self.request("GET", "/api/cluster")

    def members(self) -> dict[str, Any]:
        return self.request("GET", "/api/cluster/members")

    def add_member(self, node_id: str) -> Any:
        return self.request("POST", "/api/cluster/members", {"node_id": node_id})

    def remove_member(self, node_id: str) -> Any:
        return self.request("DELETE", f"/api/cluster/members/{_segment(node_id)}")


def _query_string(query: Mapping[str, Any] | None) -> str:
    params = {k: str(v) for k, v in (query or {}).items() if v is not None}
    return "?" + urllib.parse.urlencode(params) if params else ""


MAX_EVENT_BYTES = 4 << 20  # one event's data: a result without samples is far smaller


def _sse(resp: Any) -> Iterator[tuple[str, Any]]:
    """The events of an open ``text/event-stream`` answer (the subset the API sends: ``event``,
    ``data`` and ``:`` comment lines, events ended by an empty line)."""
    event, data = "message", bytearray()
    for line in resp:
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield event, _decode(bytes(data))
            event, data = "message", bytearray()
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode("utf-8", "replace")
        elif line.startswith(b"data:"):
            data += (b"\n" if data else b"") + line[5:].lstrip(b" ")
            if len(data) > MAX_EVENT_BYTES:
                raise ValueError(f"an event larger than {MAX_EVENT_BYTES} bytes")


def _segment(value: str) -> str:
    # An id is one path segment: "/" and "?" inside it must not change the route.
    return urllib.parse.quote(value, safe="")


def _decode(raw: bytes) -> Any:
    if not raw:
        return None
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


def _error_message(status: int, decoded: Any) -> str:
    if isinstance(decoded, dict) and isinstance(decoded.get("error"), str):
        return decoded["error"]
    if isinstance(decoded, str) and decoded.strip():
        return decoded.strip().splitlines()[0][:200]
    return {404: "Not Found", 405: "Method Not Allowed"}.get(status, "no error message")


def _reason(reason: Any) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"certificate not trusted ({reason.verify_message}); give --cacert FILE"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


# --------------------------------------------------------------------------- presentation
# How the CLI shows API objects to people (``-o table``); scripts should use ``-o json``.

_INTERVAL_UNITS = {  # the API's unit: (its short form, its seconds)
    "weeks": ("w", 604_800),
    "days": ("d", 86_400),
    "hours": ("h", 3_600),
    "minutes": ("m", 60),
    "seconds": ("s", 1),
}
_CALENDAR_UNITS = ("years", "months", "weeks", "days")


def describe_trigger(trigger: Any) -> str:
    """A trigger's JSON (docs/api.md) in a few words: ``every 1h 30m``, ``cron */5 * * * *
    (Europe/Berlin)``, ``once at 2026-11-23 10:00:00Z``, ``every 1 month at 10:00:00``."""
    if not isinstance(trigger, dict):
        return "?"
    kind = trigger.get("type")
    if kind == "interval":
        # Normalised ("minutes": 90 reads "every 1h 30m"), largest unit first.
        try:
            left = sum(
                float(trigger.get(unit) or 0) * size for unit, (_, size) in _INTERVAL_UNITS.items()
            )
        except (TypeError, ValueError, OverflowError):
            return "interval ?"
        parts = []
        for short, size in _INTERVAL_UNITS.values():
            count = left // size if short != "s" else left
            if count:
                parts.append(f"{_number(round(count, 6))}{short}")
                left -= count * size
        text = "every " + " ".join(parts) if parts else "interval"
        if trigger.get("end_time"):
            text += f" until {short_time(trigger['end_time'])}"
        return text
    if kind == "cron":
        if trigger.get("expr"):
            text = f"cron {trigger['expr']}"
        else:
            fields = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")
            text = "cron " + " ".join(f"{f}={trigger[f]}" for f in fields if f in trigger)
        zone = trigger.get("timezone")
        return f"{text} ({zone})" if zone else text
    if kind == "date":
        return f"once at {short_time(trigger.get('run_time'))}"
    if kind == "calendarinterval":
        parts = [
            f"{trigger[u]} {u[:-1] if trigger[u] == 1 else u}"
            for u in _CALENDAR_UNITS
            if trigger.get(u)
        ]
        clock = ":".join(f"{int(trigger.get(f) or 0):02d}" for f in ("hour", "minute", "second"))
        zone = trigger.get("timezone")
        text = f"every {' '.join(parts) or '?'} at {clock}"
        return f"{text} ({zone})" if zone else text
    if kind == "unsupported":
        return str(trigger.get("description") or trigger.get("class") or "unsupported")
    return str(kind or "?")


def short_time(value: Any) -> str:
    """An ISO-8601 time from the API, to the second, with its offset (``-`` for none)."""
    if not value:
        return "-"
    text = str(value)
    date, sep, rest = text.partition("T")
    if not sep:
        return text
    clock, offset = rest, ""
    for mark in ("+", "-", "Z"):
        if mark in rest:
            clock, found, tail = rest.partition(mark)
            offset = found + tail
            break
    clock = clock.split(".")[0]
    return f"{date} {clock}{'Z' if offset in ('Z', '+00:00') else offset}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Rows as fixed-width columns under upper-case headers; long cells are cut with ``…``."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [[h.upper() for h in headers], *cells]
    ]
    return "\n".join(lines)


MAX_CELL = 60


def _cell(value: Any) -> str:
    if value is None:
        text = "-"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, list | tuple):
        text = ",".join(str(v) for v in value) or "-"
    elif isinstance(value, dict):
        text = ",".join(f"{k}={v}" for k, v in value.items()) or "-"
    else:
        text = str(value)
    text = " ".join(text.split())  # one line per row, whatever the data holds
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 1] + "…"


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _renumber(message: str, offset: int) -> str:
    """``schedules[N]`` in a bulk request's error → ``schedules[N + offset]``."""
    return re.sub(r"\bschedules\[(\d+)\]", lambda m: f"schedules[{int(m[1]) + offset}]", message)
