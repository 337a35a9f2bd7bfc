"""Every transfer syntax the listener accepts is stored as received and decodes.

Samples: pydicom's own test files where one exists, and for HTJ2K and JPEG Lossless
(process 14) files encoded here from a real MR slice with imagecodecs (a test-only tool).
Each is sent through the real listener by a pynetdicom SCU in that transfer syntax; the
stored file must decode to exactly the pixels of the original.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, generate_uid
from pynetdicom import AE
from sqlalchemy import select

from node.catalogue.db import Catalogue, upgrade
from node.catalogue.models import Instance
from node.core.settings import DicomSettings
from node.dimse.allow_list import SourcePolicy
from node.dimse.listener import start_listener
from node.store.ingest import Ingestor
from node.store.spool import Spool
from tests.support.peers import free_port

FROM_PYDICOM = {
    "1.2.840.10008.1.2": "MR_small_implicit.dcm",
    "1.2.840.10008.1.2.1": "CT_small.dcm",
    "1.2.840.10008.1.2.1.99": "image_dfl.dcm",
    "1.2.840.10008.1.2.2": "MR_small_bigendian.dcm",
    "1.2.840.10008.1.2.4.50": "SC_rgb_dcmtk_+eb+cr.dcm",
    "1.2.840.10008.1.2.4.51": "JPGExtended.dcm",
    "1.2.840.10008.1.2.4.70": "SC_rgb_jpeg_gdcm.dcm",
    "1.2.840.10008.1.2.4.80": "MR_small_jpeg_ls_lossless.dcm",
    "1.2.840.10008.1.2.4.81": "JPEGLSNearLossless_16.dcm",
    "1.2.840.10008.1.2.4.90": "MR_small_jp2klossless.dcm",
    "1.2.840.10008.1.2.4.91": "693_J2KI.dcm",
    "1.2.840.10008.1.2.5": "MR_small_RLE.dcm",
}
ENCODED_HERE = ["1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203"]


def _encode_here(tsuid: str, folder: Path) -> Path:
    """A real MR slice re-encoded in ``tsuid``; its reference pixels are the original's."""
    imagecodecs = pytest.importorskip("imagecodecs")
    ds = dcmread(get_testdata_file("MR_small.dcm"))
    pixels = ds.pixel_array.astype(np.int16)
    if tsuid == "1.2.840.10008.1.2.4.57":
        frame = imagecodecs.jpeg8_encode(pixels.astype(np.uint16), lossless=True, predictor=2)
        ds.PixelRepresentation = 0
    elif tsuid == "1.2.840.10008.1.2.4.201":
        frame = imagecodecs.htj2k_encode(pixels, reversible=True)
    else:
        frame = imagecodecs.htj2k_encode(pixels, level=90, reversible=False)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = UID(tsuid)
    path = folder / f"{tsuid}.dcm"
    ds.save_as(path)
    return path


def _sample(tsuid: str, folder: Path) -> Path:
    if tsuid in FROM_PYDICOM:
        return Path(get_testdata_file(FROM_PYDICOM[tsuid]))
    return _encode_here(tsuid, folder)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Ingestor]]:
    root = tmp_path_factory.mktemp("ts")
    url = f"sqlite:///{root / 'c.sqlite'}"
    upgrade(url)
    catalogue = Catalogue(url)
    ingestor = Ingestor(Spool(root / "spool", root / "quarantine"), catalogue)
    port = free_port()
    server = start_listener(
        DicomSettings(host="127.0.0.1", port=port), ingestor, SourcePolicy(catalogue, True)
    )
    yield port, ingestor
    server.shutdown()


def _stored_path(ingestor: Ingestor, sop_uid: str) -> Path:
    with ingestor.catalogue.session() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == sop_uid)).one()
        assert row.transfer_syntax_uid == str(
            dcmread(ingestor.spool.absolute(row.path)).file_meta.TransferSyntaxUID
        )
        return ingestor.spool.absolute(row.path)


@pytest.mark.parametrize("tsuid", [*FROM_PYDICOM, *ENCODED_HERE])
def test_received_in_every_syntax_and_decodes(
    tsuid: str, node: tuple[int, Ingestor], tmp_path: Path
) -> None:
    port, ingestor = node
    original: Dataset = dcmread(_sample(tsuid, tmp_path))
    assert original.file_meta.TransferSyntaxUID == tsuid
    original.SOPInstanceUID = generate_uid()  # several samples share one UID
    for name in ("StudyInstanceUID", "SeriesInstanceUID"):  # and some samples lack these
        if not original.get(name):
            setattr(original, name, generate_uid())
    scu = AE(ae_title="SCU")
    scu.add_requested_context(original.SOPClassUID, tsuid)
    assoc = scu.associate("127.0.0.1", port, ae_title="CURIA")
    assert assoc.is_established
    status = assoc.send_c_store(original)
    assoc.release()
    assert status.Status == 0x0000

    stored = dcmread(_stored_path(ingestor, original.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == tsuid, "stored exactly as received"
    if "PixelData" in original and original.file_meta.TransferSyntaxUID.is_encapsulated:
        assert stored.PixelData == original.PixelData, "compressed frames kept byte for byte"
    np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)
    if tsuid in ENCODED_HERE and tsuid != "1.2.840.10008.1.2.4.203":
        reference = dcmread(get_testdata_file("MR_small.dcm")).pixel_array
        np.testing.assert_array_equal(stored.pixel_array.astype(np.int32), reference)
