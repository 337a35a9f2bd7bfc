"""multipart/related (RFC 2387) for DICOMweb: media types, a streamed reader, a writer.

STOW-RS bodies can be gigabytes, so the parser never holds a whole body: it parses the
request stream chunk by chunk and hands each part's bytes to a sink as they arrive. The
sink of :class:`MultipartReader` spools each part, in memory while a per-request budget
lasts and then to an unnamed temporary file; a part larger than the limit is cut there and
marked, so the caller can refuse it without ever storing half an instance. STOW-RS brings
its own sink, which writes parts straight to the spool.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Generic, Protocol, TypeVar

MAX_HEADER_BYTES = 16 * 1024
_PARAMETER = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


class MultipartError(ValueError):
    """The body is not a well-formed multipart message (or ends before its last part)."""


@dataclass(frozen=True)
class MediaType:
    """A media type with its parameters; names lower-cased, values unquoted."""

    type: str
    params: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, value: str) -> MediaType:
        main, _, rest = value.partition(";")
        params: dict[str, str] = {}
        for match in _PARAMETER.finditer(";" + rest):
            raw = match.group(2).strip()
            if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[match.group(1).lower()] = raw
        return cls(main.strip().lower(), params)

    @property
    def quality(self) -> float:
        try:
            return float(self.params.get("q", "1"))
        except ValueError:
            return 0.0


def parse_accept(value: str | None) -> list[MediaType]:
    """The media ranges of an Accept header, most preferred first (``*/*`` when absent).

    Commas inside quoted parameter values do not split ranges.
    """
    if not value or not value.strip():
        return [MediaType("*/*")]
    ranges = [MediaType.parse(item) for item in _split_outside_quotes(value, ",") if item.strip()]
    ranges = [media for media in ranges if media.quality > 0]
    return sorted(ranges, key=lambda media: -media.quality)


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == separator and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items


class PartSink(Protocol):
    """Where the parser puts one part: its bytes in order, then :meth:`end`."""

    def write(self, data: bytes | memoryview) -> None: ...

    def end(self) -> None:
        """The part is complete (its closing delimiter was seen)."""

    def close(self) -> None:
        """Release what the part holds (also for a part that never ended)."""


P = TypeVar("P", bound=PartSink)


class _MemoryBudget:
    """Bytes of part bodies a request may keep in memory, shared by all its parts."""

    def __init__(self, limit: int) -> None:
        self.left = limit

    def take(self, size: int) -> bool:
        if size > self.left:
            return False
        self.left -= size
        return True

    def give(self, size: int) -> None:
        self.left += size


class Part:
    """One body part: its headers and its spooled content (at most ``limit`` bytes)."""

    def __init__(self, headers: dict[str, str], limit: int, budget: _MemoryBudget, tmp: Path):
        self.headers = headers
        self.size = 0
        self.oversized = False
        self._limit = limit
        self._budget = budget
        self._tmp = tmp
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None

    @property
    def content_type(self) -> MediaType | None:
        value = self.headers.get("content-type")
        return MediaType.parse(value) if value else None

    def write(self, data: bytes | memoryview) -> None:
        """Keep ``data`` unless the part is over its limit; then remember only that it is."""
        if self.oversized:
            return
        if self.size + len(data) > self._limit:
            data = data[: self._limit - self.size]
            self.oversized = True
        if not data:
            return
        if self._memory is not None and self._budget.take(len(data)):
            self._memory += data
        else:
            self._spill().write(data)
        self.size += len(data)

    def end(self) -> None:
        """Nothing to do: the content is kept as it arrives."""

    def _spill(self) -> BinaryIO:
        if self._file is None:
            # Unnamed (O_TMPFILE where supported): nothing to clean up after a crash. It
            # outlives this call on purpose; close() ends it.
            self._file = tempfile.TemporaryFile(dir=self._tmp)  # noqa: SIM115
            if self._memory:
                self._file.write(self._memory)
                self._budget.give(len(self._memory))
            self._memory = None
        return self._file

    def head(self, size: int) -> bytes:
        """The first ``size`` kept bytes (enough to name an instance that is not kept)."""
        if self._memory is not None:
            return bytes(self._memory[:size])
        assert self._file is not None
        self._file.seek(0)
        return self._file.read(size)

    def read(self) -> bytes:
        """The whole kept content (one part at a time is in memory while it is ingested)."""
        if self._memory is not None:
            return bytes(self._memory)
        assert self._file is not None
        self._file.seek(0)
        return self._file.read()

    def close(self) -> None:
        if self._memory is not None:
            self._budget.give(len(self._memory))
            self._memory = None
        if self._file is not None:
            self._file.close()
            self._file = None


class MultipartParser(Generic[P]):
    """Incremental parser: :meth:`feed` chunks in any sizes, then :meth:`finish`.

    ``new_part`` makes the sink for each part from its headers (names lower-cased).
    """

    def __init__(self, boundary: str, new_part: Callable[[dict[str, str]], P]) -> None:
        # RFC 2046 allows 70 characters; Orthanc's DICOMweb client sends 73, so be lenient.
        if not boundary or len(boundary) > 256:
            raise MultipartError("the boundary parameter must have 1 to 256 characters")
        # Every delimiter is CRLF "--" boundary; a leading CRLF lets the first one match too.
        self._delimiter = b"\r\n--" + boundary.encode("latin-1")
        self._buffer = bytearray(b"\r\n")
        self._state = "preamble"
        self._new_part = new_part
        self._current: P | None = None
        self.parts: list[P] = []

    def feed(self, chunk: bytes) -> None:
        if self._state == "done" or not chunk:
            return
        self._buffer += chunk
        while self._step():
            pass

    def finish(self) -> list[P]:
        """The complete parts; raises :class:`MultipartError` if the close delimiter is
        missing (a truncated upload) or no part was sent."""
        if self._state != "done":
            self.close()
            raise MultipartError("the body ends before the closing boundary")
        if not self.parts:
            raise MultipartError("the body has no parts")
        return self.parts

    def close(self) -> None:
        for part in self.parts:
            part.close()
        if self._current is not None:
            self._current.close()

    def _step(self) -> bool:
        """Advance one state; False when more input is needed."""
        buffer, delimiter = self._buffer, self._delimiter
        if self._state in ("preamble", "body"):
            index = buffer.find(delimiter)
            if index < 0:
                keep = len(delimiter) - 1
                if len(buffer) > keep:
                    if self._current is not None:
                        self._current.write(memoryview(buffer)[: len(buffer) - keep])
                    del buffer[: len(buffer) - keep]
                return False
            if self._current is not None:
                self._current.write(memoryview(buffer)[:index])
                self._current.end()
                self.parts.append(self._current)
                self._current = None
            del buffer[: index + len(delimiter)]
            self._state = "delimiter"
            return True
        if self._state == "delimiter":
            if len(buffer) < 2:
                return False
            if buffer.startswith(b"--"):
                self._state = "done"
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise MultipartError("a boundary line does not end")
                return False
            if buffer[:end].strip(b" \t"):
                raise MultipartError("text after a boundary on its line")
            del buffer[: end + 2]
            self._state = "headers"
            return True
        if self._state == "headers":
            if buffer.startswith(b"\r\n"):
                headers: dict[str, str] = {}
                del buffer[:2]
            else:
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEADER_BYTES:
                        raise MultipartError("part headers longer than 16 KiB")
                    return False
                headers = _parse_headers(bytes(buffer[:end]))
                del buffer[: end + 4]
            self._current = self._new_part(headers)
            self._state = "body"
            return True
        return False


class MultipartReader(MultipartParser[Part]):
    """A parser that keeps each part (:class:`Part`) within a per-request memory budget."""

    def __init__(
        self, boundary: str, *, max_part_bytes: int, memory_budget: int, tmp_dir: Path
    ) -> None:
        budget = _MemoryBudget(memory_budget)
        super().__init__(boundary, lambda headers: Part(headers, max_part_bytes, budget, tmp_dir))


def _parse_headers(block: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in block.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or not name.strip():
            raise MultipartError("malformed part header line")
        headers[name.strip().lower()] = value.strip()
    return headers


def write_parts(boundary: str, parts: Iterator[tuple[str, Iterator[bytes]]]) -> Iterator[bytes]:
    """Encode ``(content type, content chunks)`` pairs as a multipart body, lazily."""
    for content_type, chunks in parts:
        yield f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode("latin-1")
        yield from chunks
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode("latin-1")
