"""DIMSE status codes: the one table every layer answers with and reads answers by.

The listener answers C-ECHO and C-STORE with these codes, STOW-RS reports them as each
failed part's Failure Reason (PS3.18 10.5.3 takes its reasons from the Storage Service),
and the C-STORE client reads a peer's answers with them. Each code has its category
(PS3.7 C.1: Success, Warning or Failure) and a short description for logs and answers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final


class Category(StrEnum):
    """What a status says about the operation (PS3.7 C.1)."""

    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"


@dataclass(frozen=True)
class Status:
    """One row of the table: the code, what it says, and where the standard defines it."""

    code: int
    category: Category
    description: str
    reference: str

    def __str__(self) -> str:
        return f"0x{self.code:04X} {self.category} ({self.description})"


# General statuses (PS3.7 C.4)
SUCCESS: Final = 0x0000
PROCESSING_FAILURE: Final = 0x0110
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
UNRECOGNISED_OPERATION: Final = 0x0211
# DIMSE-N statuses (PS3.7 C.4): MPPS and Storage Commitment answers
INVALID_ATTRIBUTE_VALUE: Final = 0x0106
DUPLICATE_SOP_INSTANCE: Final = 0x0111
NO_SUCH_SOP_INSTANCE: Final = 0x0112
MISSING_ATTRIBUTE: Final = 0x0120
NO_SUCH_ACTION_TYPE: Final = 0x0123
# Storage Commitment Failure Reasons (0008,1197), PS3.3 C.14.1.1
REASON_PROCESSING_FAILURE: Final = 0x0110
REASON_NO_SUCH_OBJECT: Final = 0x0112
REASON_CLASS_INSTANCE_CONFLICT: Final = 0x0119
# Storage Service statuses (PS3.4 B.2.3)
OUT_OF_RESOURCES: Final = 0xA700
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
CANNOT_UNDERSTAND: Final = 0xC000
COERCION_OF_DATA_ELEMENTS: Final = 0xB000
ELEMENTS_DISCARDED: Final = 0xB006
DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING: Final = 0xB007

STATUSES: Final[dict[int, Status]] = {
    row.code: row
    for row in (
        Status(SUCCESS, Category.SUCCESS, "Success", "PS3.7 C.1.1"),
        Status(PROCESSING_FAILURE, Category.FAILURE, "Processing failure", "PS3.7 C.4.2"),
        Status(SOP_CLASS_NOT_SUPPORTED, Category.FAILURE, "SOP class not supported", "PS3.7 C.5.9"),
        Status(UNRECOGNISED_OPERATION, Category.FAILURE, "Unrecognised operation", "PS3.7 C.5.22"),
        Status(INVALID_ATTRIBUTE_VALUE, Category.FAILURE, "Invalid attribute value", "PS3.7 C.4.8"),
        Status(DUPLICATE_SOP_INSTANCE, Category.FAILURE, "Duplicate SOP instance", "PS3.7 C.4.4"),
        Status(NO_SUCH_SOP_INSTANCE, Category.FAILURE, "No such SOP instance", "PS3.7 C.4.18"),
        Status(MISSING_ATTRIBUTE, Category.FAILURE, "Missing attribute", "PS3.7 C.4.14"),
        Status(NO_SUCH_ACTION_TYPE, Category.FAILURE, "No such action type", "PS3.7 C.4.16"),
        Status(OUT_OF_RESOURCES, Category.FAILURE, "Refused: out of resources", "PS3.4 B.2.3"),
        Status(
            DATASET_DOES_NOT_MATCH_SOP_CLASS,
            Category.FAILURE,
            "Error: data set does not match SOP class",
            "PS3.4 B.2.3",
        ),
        Status(CANNOT_UNDERSTAND, Category.FAILURE, "Error: cannot understand", "PS3.4 B.2.3"),
        Status(
            COERCION_OF_DATA_ELEMENTS,
            Category.WARNING,
            "Coercion of data elements",
            "PS3.4 B.2.3",
        ),
        Status(ELEMENTS_DISCARDED, Category.WARNING, "Elements discarded", "PS3.4 B.2.3"),
        Status(
            DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
            Category.WARNING,
            "Data set does not match SOP class",
            "PS3.4 B.2.3",
        ),
    )
}

# C-STORE answers that mean the peer kept the object: Success and the Storage warnings.
STORE_KEPT: Final = frozenset(
    {
        SUCCESS,
        COERCION_OF_DATA_ELEMENTS,
        ELEMENTS_DISCARDED,
        DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING,
    }
)


def category(code: int) -> Category:
    """The category of any code, in the table or not: 0x0001, 0x0107, 0x0116 and 0xBxxx
    are Warnings, the rest Failures (PS3.7 C.1, C.4; Pending and Cancel never answer the
    operations the node performs or serves)."""
    row = STATUSES.get(code)
    if row is not None:
        return row.category
    if code in (0x0001, 0x0107, 0x0116) or code >> 12 == 0xB:
        return Category.WARNING
    return Category.FAILURE
