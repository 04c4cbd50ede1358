"""The loopback rule for an HTTP API without tokens, with ``security.anonymous_reads``
(mesh.security.policy.check_open_http): which starts are refused, and why."""

from __future__ import annotations

import pytest

from mesh.security.policy import InsecureStart, check_open_http

PUBLIC = "0.0.0.0:8080"
LOOPBACK = "127.0.0.1:8080"


@pytest.mark.parametrize("address", [PUBLIC, "10.1.2.3:80", LOOPBACK])
def test_a_read_only_api_with_anonymous_reads_may_bind_any_address(address: str) -> None:
    check_open_http(address, insecure=False, what="r1", anonymous_reads=True, read_only=True)


@pytest.mark.parametrize("address", [PUBLIC, LOOPBACK])
@pytest.mark.parametrize("insecure", [False, True])
def test_a_writable_api_with_anonymous_reads_and_no_tokens_is_refused_anywhere(
    address: str, insecure: bool
) -> None:
    with pytest.raises(InsecureStart, match="anonymous reads without API tokens need a read-only"):
        check_open_http(address, insecure=insecure, what="n1", anonymous_reads=True)


def test_a_read_only_api_without_anonymous_reads_keeps_the_loopback_rule() -> None:
    check_open_http(LOOPBACK, insecure=False, what="r1", read_only=True)
    with pytest.raises(InsecureStart, match="--anonymous-reads"):
        check_open_http(PUBLIC, insecure=False, what="r1", read_only=True)


def test_a_writable_api_is_not_told_about_anonymous_reads() -> None:
    with pytest.raises(InsecureStart) as refused:
        check_open_http(PUBLIC, insecure=False, what="n1")
    assert "anonymous" not in str(refused.value)
