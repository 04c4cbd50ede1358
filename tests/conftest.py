"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import Cluster

ClusterFactory = Callable[..., Cluster]


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[ClusterFactory]:
    """``cluster_factory(n=3, extra_args=(), start=True, **kw)`` → a started ``Cluster`` of real
    node processes; every process is stopped after the test, pass or fail."""
    made: list[Cluster] = []

    def factory(
        n: int = 3, extra_args: tuple[str, ...] = (), *, start: bool = True, **kwargs: Any
    ) -> Cluster:
        root = tmp_path / f"cluster{len(made)}"
        root.mkdir()
        cluster = Cluster(root, n, extra_args, **kwargs)
        made.append(cluster)
        if start:
            cluster.start()
        return cluster

    try:
        yield factory
    finally:
        for cluster in made:
            cluster.stop_all()
