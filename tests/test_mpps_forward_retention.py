"""Forwarded MPPS records are removed after their retention; those not yet sent never are."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from pydicom.uid import generate_uid

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import MppsForward, utcnow
from node.core.settings import MppsForwardSettings
from node.delivery.mpps_forward import MppsForwarder
from tests.support.peers import free_port


@pytest.fixture
def catalogue(tmp_path: Path) -> Catalogue:
    url = f"sqlite:///{tmp_path / 'c.sqlite'}"
    upgrade(url)
    return Catalogue(url)


def forward(catalogue: Catalogue, sent_days_ago: float | None, created_days_ago: float) -> str:
    step = generate_uid()
    now = utcnow()
    with catalogue.session() as session:
        session.add(
            MppsForward(
                step_uid=step,
                command="n-create",
                data={},
                sent_at=None if sent_days_ago is None else now - timedelta(days=sent_days_ago),
                created_at=now - timedelta(days=created_days_ago),
                next_attempt_at=now + timedelta(days=1),  # not due: nothing is sent here
            )
        )
    return step


def kept(catalogue: Catalogue) -> set[str]:
    with catalogue.session() as session:
        return set(session.scalars(sa.select(MppsForward.step_uid)))


def test_sent_records_past_the_retention_are_removed(catalogue: Catalogue) -> None:
    old_sent = forward(catalogue, sent_days_ago=31, created_days_ago=31)
    recent_sent = forward(catalogue, sent_days_ago=29, created_days_ago=40)
    old_unsent = forward(catalogue, sent_days_ago=None, created_days_ago=90)
    settings = MppsForwardSettings(ae_title="RIS", host="127.0.0.1", port=free_port())
    assert settings.retention_days == 30
    forwarder = MppsForwarder(catalogue, settings, "CURIA")

    assert forwarder.forward_due() == 0  # the poller's turn removes them first
    assert kept(catalogue) == {recent_sent, old_unsent}
    assert old_sent not in kept(catalogue)

    assert forwarder.prune(utcnow() + timedelta(days=2)) == 1, "the other one's time came"
    assert kept(catalogue) == {old_unsent}, "a record never sent is never removed"


def test_the_retention_is_a_setting(catalogue: Catalogue) -> None:
    forward(catalogue, sent_days_ago=2, created_days_ago=2)
    settings = MppsForwardSettings(
        ae_title="RIS", host="127.0.0.1", port=free_port(), retention_days=1
    )
    assert MppsForwarder(catalogue, settings, "CURIA").prune() == 1
    assert kept(catalogue) == set()
    with pytest.raises(ValueError):
        MppsForwardSettings(ae_title="RIS", host="h", port=104, retention_days=0)
