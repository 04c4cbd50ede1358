"""Harness ports stay out of the kernel's ephemeral range (where outgoing connections live)."""

from __future__ import annotations

import socket

from mesh.ports import _ephemeral_low, free_port


def test_free_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    seen = set()
    for _ in range(50):
        port = free_port(pair=True)
        assert port + 1 < _ephemeral_low()
        assert port not in seen and port + 1 not in seen
        seen.update((port, port + 1))
        for p in (port, port + 1):
            with socket.socket() as s:
                s.bind(("127.0.0.1", p))
