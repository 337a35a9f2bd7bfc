"""PostgreSQL stops while a sender stores, then comes back (production mode).

While the catalogue cannot commit, the node must not answer Success (Success means stored
and catalogued): the sender gets a failure status and keeps the instance. When PostgreSQL
is back, the same node accepts the study again, without a restart, and the results reach
the archive once.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from tests.support.broker import delete_queues
from tests.support.env import production_env
from tests.support.node_api import runs_of
from tests.support.peers import NodeProcess, Orthanc, port_open, wait_for
from tests.support.results import EXPECTED, download_results
from tests.support.storescu import send_to_node

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _cluster(action: str) -> None:
    version = sorted(p.name for p in Path("/etc/postgresql").iterdir())[-1]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action],
        check=True,
        capture_output=True,
        timeout=120,
    )


def _store_one(node: NodeProcess, path: Path) -> int | None:
    """The C-STORE status, or None when the association was refused."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, dcmread(path).file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.dicom_port, ae_title="CURIA")
    if not assoc.is_established:
        return None
    try:
        return int(assoc.send_c_store(dcmread(path)).Status)
    finally:
        assoc.release()


@pytest.mark.e2e
@pytest.mark.production
def test_no_success_while_the_catalogue_is_down_and_recovery_without_restart(
    orthanc: Orthanc, ct_series: list[Path], node_factory, tmp_path: Path, postgres_url: str
) -> None:
    env = production_env(tmp_path, orthanc, postgres_url)
    node = node_factory(env, separate_worker=True)
    _cluster("stop")
    try:
        wait_for(lambda: not port_open(5432), 60, "PostgreSQL did not stop")
        # The allow-list cannot be read: the association is refused (transiently); were it
        # accepted from a cached allow-list, the C-STORE must fail. Never Success.
        status = _store_one(node, ct_series[0])
        if status is None:
            assert "allow-list unavailable" in node.log()
        else:
            assert status >> 12 in (0xA, 0xC), f"a failure status is expected, got {status:#06x}"
    finally:
        _cluster("start")
    wait_for(lambda: port_open(5432), 60, "PostgreSQL did not come back")
    try:
        send_to_node(node, ct_series)  # the sender retries the whole study: every instance Success
        study_uid = dcmread(ct_series[0], stop_before_pixels=True).StudyInstanceUID
        download_results(orthanc, study_uid, tmp_path / "results", EXPECTED)
        wait_for(lambda: runs_of(node)[0]["state"] == "succeeded", 120, "the run did not finish")
        assert len(runs_of(node)) == 1
    finally:
        delete_queues(env["CURIA_PIPELINE__QUEUE_PREFIX"])
