"""A schedule's controls: overlap, retry, timeout, target, history, run limit, notify, note.

The API's "added fields" (docs/scheduling.md, one section per control). They travel inside the
schedule's ``metadata`` under the reserved key :data:`KEY`, as plain JSON holding only the
fields that differ from their defaults, because that is where APScheduler's model has room for
them: the metadata is replicated with the schedule by every command that writes one (create,
replace, bulk, pause, snapshots), and every job a fire creates copies it, so the leader that
starts a job (maybe a new leader, after a failover) reads the job's controls from the job
itself. The API shows them as top-level fields and hides :data:`KEY` from ``metadata``; a user's
own metadata may not use that key.

Pure data and its codec: no clock, no I/O. The state machine and the leader call
:func:`controls_of` on the hot path, so a schedule without controls costs one dict lookup.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = [
    "DEFAULT",
    "KEY",
    "NOTIFY_EVENTS",
    "OVERLAP_POLICIES",
    "Controls",
    "History",
    "Notify",
    "Retry",
    "Target",
    "controls_of",
    "parse_tag",
    "user_metadata",
    "with_controls",
]

KEY = "schedulezero"  # the reserved metadata key

OverlapPolicy = Literal["allow_all", "skip", "buffer_one", "buffer_all", "cancel_other"]
OVERLAP_POLICIES: tuple[str, ...] = (
    "allow_all",
    "skip",
    "buffer_one",
    "buffer_all",
    "cancel_other",
)
NotifyEvent = Literal["failure", "missed", "skipped", "timeout", "paused", "no_handler"]
NOTIFY_EVENTS: tuple[str, ...] = ("failure", "missed", "skipped", "timeout", "paused", "no_handler")
# What ``notify.on`` is when not given: every event that means a fire did not run as it
# should; ``paused`` (an operator's act as often as not) only when asked for.
DEFAULT_NOTIFY_ON: tuple[str, ...] = ("failure", "missed", "skipped", "timeout", "no_handler")

MAX_ATTEMPTS = 100
MAX_DELAY_SECONDS = 7 * 24 * 3600.0  # a retry's backoff: at most a week
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600.0
MAX_TAGS = 32
MAX_TAG_TEXT = 128
MAX_HISTORY = 10_000
MAX_NOTE = 1000
MAX_URL = 2000
MAX_RUNS = 1_000_000_000

TAG_PATTERN = r"^[A-Za-z0-9_.:/-]{1,128}\Z"
TAG_RULE = "1 to 128 characters from A-Z a-z 0-9 _ . : / -"
TagText = Annotated[str, Meta(pattern=TAG_PATTERN, description=f"a string of {TAG_RULE}")]
# A handler's tags (``schedulezero handler --tag K=V``, its hellos) and a target's: one shape.
Tags = Annotated[
    dict[TagText, TagText],
    Meta(max_length=MAX_TAGS, description=f"an object of at most {MAX_TAGS} tags"),
]
Delay = Annotated[
    float,
    Meta(ge=0, le=MAX_DELAY_SECONDS, description="a number of seconds from 0 to 604800"),
]


class _Struct(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, frozen=True):
    pass


class Retry(_Struct):
    """Run a failed fire again (same idempotency key), after ``initial_delay * multiplier**(n-1)``
    seconds (at most ``max_delay``), up to ``max_attempts`` runs in all."""

    max_attempts: Annotated[
        int, Meta(ge=1, le=MAX_ATTEMPTS, description=f"an integer from 1 to {MAX_ATTEMPTS}")
    ] = 3
    initial_delay: Delay = 1.0
    max_delay: Delay = 60.0
    multiplier: Annotated[float, Meta(ge=1, le=100, description="a number from 1 to 100")] = 2.0
    on_exhausted: Annotated[
        Literal["continue", "pause"], Meta(description="one of 'continue', 'pause'")
    ] = "continue"

    def delay(self, failed_attempts: int) -> float:
        """Seconds to wait before the run after ``failed_attempts`` failures (>= 1)."""
        exponent = max(0, failed_attempts - 1)
        # Bounded before the power: 100**100 would overflow a float's exponent range quickly.
        delay = self.initial_delay
        for _ in range(min(exponent, 64)):
            delay *= self.multiplier
            if delay >= self.max_delay:
                break
        return min(delay, self.max_delay)


class Target(_Struct):
    """Which handlers run the fire: those started with all of ``tags``; every one of them
    (``broadcast``, each with its shard index) or one chosen as usual."""

    tags: Tags = {}
    broadcast: Annotated[bool, Meta(description="true or false")] = False


class History(_Struct):
    """How many finished runs of this schedule the execution history keeps, per kind."""

    keep_success: (
        Annotated[
            int, Meta(ge=0, le=MAX_HISTORY, description=f"an integer from 0 to {MAX_HISTORY}")
        ]
        | None
    ) = None
    keep_failed: (
        Annotated[
            int, Meta(ge=0, le=MAX_HISTORY, description=f"an integer from 0 to {MAX_HISTORY}")
        ]
        | None
    ) = None


class Notify(_Struct):
    """Where to tell about the schedule's events (``on``)."""

    webhook: Annotated[
        str,
        Meta(
            max_length=MAX_URL,
            pattern=r"^https?://\S+\Z",
            description="an http:// or https:// URL",
        ),
    ]
    on: Annotated[
        list[NotifyEvent],
        Meta(
            max_length=len(NOTIFY_EVENTS),
            description="a list of events: " + ", ".join(map(repr, NOTIFY_EVENTS)),
        ),
    ] = msgspec.field(default_factory=lambda: list(DEFAULT_NOTIFY_ON))


OverlapField = Annotated[
    OverlapPolicy, Meta(description="one of " + ", ".join(map(repr, OVERLAP_POLICIES)))
]
TimeoutField = Annotated[
    float,
    Meta(gt=0, le=MAX_TIMEOUT_SECONDS, description="a number of seconds > 0 (at most a week)"),
]
RunsField = Annotated[
    int, Meta(ge=0, le=MAX_RUNS, description=f"an integer from 0 to {MAX_RUNS} or null")
]
NoteField = Annotated[
    str, Meta(max_length=MAX_NOTE, description=f"a text of at most {MAX_NOTE} characters")
]


class Controls(_Struct):
    overlap: OverlapField = "allow_all"
    retry: Retry | None = None
    timeout: TimeoutField | None = None
    target: Target | None = None
    history: History | None = None
    remaining_runs: RunsField | None = None
    notify: Notify | None = None
    note: NoteField = ""


DEFAULT = Controls()
_FIELDS = Controls.__struct_fields__


def controls_of(obj: Any) -> Controls:
    """The controls of a schedule, a job (a copy of its schedule's) or a metadata mapping;
    :data:`DEFAULT` when there are none. Stored controls were validated when the schedule was
    written; a stored value this version cannot read (written by a newer one) counts as none."""
    metadata = obj if isinstance(obj, Mapping) else getattr(obj, "metadata", None)
    if not metadata:
        return DEFAULT
    raw = metadata.get(KEY)
    if not raw:
        return DEFAULT
    try:
        return msgspec.convert(raw, Controls)
    except msgspec.ValidationError:
        return DEFAULT


def parse_tag(text: str) -> tuple[str, str]:
    """``KEY=VALUE`` (``--tag``) as ``(KEY, VALUE)``; ValueError with a one-line message when
    either side breaks the rule a target's tags follow."""
    key, sep, value = text.partition("=")
    if not sep or not re.match(TAG_PATTERN, key) or not re.match(TAG_PATTERN, value):
        raise ValueError(f"expected KEY=VALUE, each of {TAG_RULE}; got {text!r}")
    return key, value


def to_plain(controls: Controls) -> dict[str, Any]:
    """Only the fields that differ from the defaults, as plain JSON."""
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(controls, name)
        if value != getattr(DEFAULT, name):
            out[name] = _without_nulls(msgspec.to_builtins(value))
    return out


def _without_nulls(value: Any) -> Any:
    """A nested field left null (``history.keep_failed``) is left out: APScheduler refuses
    metadata holding a null, and a missing field reads back as its default (null)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


def to_json(controls: Controls) -> dict[str, Any]:
    """Every field, as the API shows it."""
    return {name: msgspec.to_builtins(getattr(controls, name)) for name in _FIELDS}


def with_controls(metadata: Mapping[str, Any], controls: Controls) -> dict[str, Any]:
    """``metadata`` (a user's, or a stored one) carrying ``controls`` (and nothing under
    :data:`KEY` when they are the defaults)."""
    out = {k: v for k, v in metadata.items() if k != KEY}
    plain = to_plain(controls)
    if plain:
        out[KEY] = plain
    return out


def user_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The user's own metadata: ``metadata`` without :data:`KEY`."""
    return {k: v for k, v in metadata.items() if k != KEY}
