"""A short schema-driven fuzz campaign against a live 3-node mesh (real node processes).

Schemathesis generates valid and invalid requests from the mesh's own ``/api/openapi.json``
(tests/fuzz_api.py); they go to all three nodes. The campaign runs once for this module (at most
FUZZ_REQUESTS requests, FUZZ_SECONDS seconds, each request bounded by a timeout); the tests
below read its findings. ``make fuzz`` runs a longer campaign with a random seed;
``FUZZ_SEED=n`` replays one here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.cluster import Cluster
from tests.fuzz_api import VOTER_PREFIX, Campaign, run_campaign

FUZZ_REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "200"))
FUZZ_SECONDS = float(os.environ.get("FUZZ_SECONDS", "45"))
FUZZ_SEED = int(os.environ.get("FUZZ_SEED", "20261129"))


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Campaign]:
    cluster = Cluster(tmp_path_factory.mktemp("fuzz"), 3, id_prefix=VOTER_PREFIX)
    try:
        cluster.start()
        yield run_campaign(
            cluster, requests_max=FUZZ_REQUESTS, seconds=FUZZ_SECONDS, fuzz_seed=FUZZ_SEED
        )
    finally:
        cluster.stop_all()


def test_the_campaign_sent_requests_to_every_operation(campaign: Campaign) -> None:
    # A campaign that never reached the API would make every other test here pass vacuously.
    report = campaign.report
    assert report.requests >= min(FUZZ_REQUESTS, 100), campaign.summary()
    assert len(report.by_operation) >= 15, campaign.summary()


def test_no_fuzzed_request_gets_a_server_error_or_no_answer(campaign: Campaign) -> None:
    report = campaign.report
    bad = report.of_kind("server error") + report.of_kind("no answer")
    assert not bad, campaign.summary()


def test_every_answer_is_as_the_document_says(campaign: Campaign) -> None:
    assert not campaign.report.of_kind("not as documented"), campaign.summary()


def test_the_leader_is_unchanged_and_answers_after_the_campaign(campaign: Campaign) -> None:
    assert not campaign.nodes_exited, campaign.summary()
    assert campaign.leader_after == campaign.leader_before, campaign.summary()
    assert campaign.leader_answers, campaign.summary()
