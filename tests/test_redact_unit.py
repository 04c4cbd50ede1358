"""Secrets in user data are masked for read callers, logs and the event log."""

from __future__ import annotations

from mesh.security.redact import MASK, redact


def test_sensitive_keys_are_masked_at_any_depth_and_case() -> None:
    body = {
        "kwargs": {"Password": "hunter2", "db": {"db_password": "x", "host": "h"}},
        "metadata": {"items": [{"X-Api-Key": "k"}, {"note": "fine"}]},
        "args": ["password"],  # a value, not a key: left alone
    }
    out = redact(body)
    assert out["kwargs"] == {"Password": MASK, "db": {"db_password": MASK, "host": "h"}}
    assert out["metadata"]["items"] == [{"X-Api-Key": MASK}, {"note": "fine"}]
    assert out["args"] == ["password"]
    assert body["kwargs"]["Password"] == "hunter2"  # the original is untouched


def test_custom_names_replace_the_defaults() -> None:
    assert redact({"pin": 1, "password": 2}, ["pin"]) == {"pin": MASK, "password": 2}
    assert redact({"password": 2}, []) == {"password": 2}


def test_keys_that_merely_contain_a_name_are_kept() -> None:
    assert redact({"tokenizer": "bpe", "secretary": "ann"}) == {
        "tokenizer": "bpe",
        "secretary": "ann",
    }
