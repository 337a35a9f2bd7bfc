"""The data set of an N-CREATE, N-SET or N-ACTION, decoded, or the status that says why not.

The acceptor hands these data sets over as received; the MPPS and Storage Commitment SCPs
decode them here, in the transfer syntax of their presentation context.
"""

from __future__ import annotations

from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom.dsutils import decode

from node.core.status import MISSING_ATTRIBUTE, PROCESSING_FAILURE
from node.dimse.association import NormalisedRequest


class BadDataSet(ValueError):
    """An N-service data set the node cannot use; carries the status to answer with."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def decode_data_set(request: NormalisedRequest) -> Dataset:
    """The request's data set, decoded in its presentation context's transfer syntax."""
    if not request.data:
        raise BadDataSet(MISSING_ATTRIBUTE, "the request carries no data set")
    syntax = UID(request.transfer_syntax_uid)
    try:
        dataset = decode(
            BytesIO(request.data),
            syntax.is_implicit_VR,
            syntax.is_little_endian,
            syntax.is_deflated,
        )
        dataset.decode()  # character sets; also walks it once, so a broken one fails here
    except Exception as exc:
        reason = f"undecodable data set: {type(exc).__name__}"
        raise BadDataSet(PROCESSING_FAILURE, reason) from None
    return dataset
