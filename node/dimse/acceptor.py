"""The DICOM upper layer as an association acceptor: one thread per association, no polling.

pynetdicom's acceptor runs every association through two threads that poll each other's
queues with millisecond sleeps, reads the socket 4 KiB at a time and decodes every PDU into
objects: a few milliseconds per C-STORE before the node does any work of its own, which
capped the listener far below a C++ receiver. Here pynetdicom still does what it does
well, decoding the A-ASSOCIATE-RQ, negotiating presentation contexts and SCP/SCU roles
(PS3.7 Annex D, PS3.8 9.3) and encoding the A-ASSOCIATE-AC, while the data transfer phase
is a blocking loop over the socket: PDVs are sliced out of each P-DATA-TF in place, the
command set (implicit VR little endian, PS3.7 E) is read with ``struct``, and a C-STORE's
data set reaches the handler as Part 10 bytes exactly as received, never decoded.

Protocol errors end the association with an A-ABORT (PS3.8 9.3.8): unexpected or unknown
PDUs, PDVs for contexts that were not accepted, and malformed command sets.

Layers below, each importing only downward: :mod:`node.dimse.pdu` (PDU framing),
:mod:`node.dimse.messages` (command sets, Part 10 file meta), :mod:`node.dimse.association`
(what an association is, and what the acceptor asks of the node).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import struct
import time
from dataclasses import astuple
from typing import TYPE_CHECKING

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from node.core.logs import escape
from node.core.status import (
    OUT_OF_RESOURCES,
    PROCESSING_FAILURE,
    SOP_CLASS_NOT_SUPPORTED,
    SUCCESS,
    UNRECOGNISED_OPERATION,
)
from node.core.uids import is_valid_uid
from node.dimse.association import (
    ASSOCIATE_RQ_BYTES,
    Association,
    NormalisedAnswer,
    NormalisedRequest,
    Refusal,
    Requestor,
    StoreRequest,
)
from node.dimse.connections import Ticket
from node.dimse.dataset import ReceivedDataSet
from node.dimse.messages import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    NO_DATA_SET,
    NORMALISED_REQUESTS,
    file_meta,
    normalised_response,
    parse_command,
    response,
    uid,
    us_value,
)
from node.dimse.pdu import (
    ABORT,
    ABORT_INVALID_PARAMETER,
    ABORT_UNEXPECTED_PDU,
    ABORT_UNRECOGNISED_PDU,
    ASSOCIATE_RQ,
    FRAGMENTS_DONE,
    FRAGMENTS_FIRST,
    P_DATA,
    PDU_HEADER,
    RELEASE_RP,
    RELEASE_RQ,
    AssociationAborted,
    Connection,
    abort_pdu,
    bad_ae_titles,
    new_buffer,
    p_data,
    reject_pdu,
)
from node.dimse.report_channels import ReportChannel
from node.store.journal import Answer

if TYPE_CHECKING:  # the listener creates acceptors; an acceptor only reads its settings
    from node.dimse.server import Listener

log = logging.getLogger(__name__)

APPLICATION_CONTEXT_NAME = "1.2.840.10008.3.1.1.1"
MAX_ASSOCIATE_RQ = ASSOCIATE_RQ_BYTES  # ample for every presentation context a sender proposes
MAX_COMMAND = 1 << 16  # bytes: a command set is a few hundred bytes

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)

# The compiled loop's buffer: the sender's instance before, an eighth more, this at least.
COMPILED_MIN_BUFFER = 256 << 10
SLOW_STORE_SECONDS = 5.0  # a C-STORE handler slower than this is worth a line in the log
DECODED_REQUESTS = 16  # A-ASSOCIATE-RQs kept decoded: the same few senders call again and again


# --- one association --------------------------------------------------------------------------


class _Message:
    """A DIMSE message being received: its command, then its data set's fragments."""

    def __init__(self) -> None:
        self.context_id: int | None = None
        self.command = bytearray()
        self.fields: dict[int, bytes] | None = None
        self.fragments = ReceivedDataSet()
        self.ahead: int | None = None  # a C-STORE's look-ahead (see Service.look_ahead)
        self.compiled = False  # its data set read by the compiled loop (see _receive_compiled)


@functools.lru_cache(maxsize=DECODED_REQUESTS)
def _decoded_request(body: bytes) -> A_ASSOCIATE:
    """An A-ASSOCIATE-RQ's body as pynetdicom's primitive, which is only read from then on.

    Decoding one costs about 9 ms of processor time, held under the interpreter lock, when
    storescu proposes its 128 presentation contexts, and a sender sends the same bytes on
    every association it opens: the last few requests are kept decoded."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(PDU_HEADER.pack(ASSOCIATE_RQ, len(body)) + body)
    return rq.to_primitive()


@functools.lru_cache(maxsize=DECODED_REQUESTS)
def _negotiated(body: bytes, server: Listener) -> tuple[dict[int, PresentationContext], bytes]:
    """What ``server`` agrees to of an A-ASSOCIATE-RQ body (already decoded, see
    :func:`_decoded_request`): the accepted presentation contexts by ID, only read from
    then on, and the A-ASSOCIATE-AC that says so.

    Both follow from the request's bytes and the listener's fixed settings alone. Working
    them out for storescu's 128 contexts took 8.5 ms of processor time, under the
    interpreter lock that every other association waits for: a sender that opens an
    association per series (or per instance) asks the same again and again."""
    primitive = _decoded_request(body)
    items = primitive.user_information
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in items
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
    }
    requested = primitive.presentation_context_definition_list
    contexts, role_items = negotiate_as_acceptor(
        requested, server.contexts_for(requested), roles or None
    )
    accepted = {
        int(cx.context_id): cx for cx in contexts if cx.result == 0x00 and cx.context_id is not None
    }
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = server.limits.max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    answer: list[object] = [maximum, implementation, version, *role_items]
    if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in items):
        window = AsynchronousOperationsWindowNegotiation()  # one operation at a time
        window.maximum_number_operations_invoked = 1
        window.maximum_number_operations_performed = 1
        answer.append(window)
    accept = A_ASSOCIATE()
    accept.application_context_name = UID(APPLICATION_CONTEXT_NAME)
    accept.calling_ae_title = primitive.calling_ae_title
    accept.called_ae_title = primitive.called_ae_title
    accept.result = 0x00
    accept.result_source = 0x01
    accept.presentation_context_definition_results_list = contexts
    accept.user_information = answer  # type: ignore[assignment]
    pdu = A_ASSOCIATE_AC()
    pdu.from_primitive(accept)
    return accepted, pdu.encode()


class AssociationAcceptor:
    """Serves one connection from A-ASSOCIATE-RQ to release or abort."""

    def __init__(
        self,
        connection: Connection,
        requestor_address: tuple[str, int],
        server: Listener,
        ticket: Ticket | None = None,
    ) -> None:
        self.connection = connection
        self.address = requestor_address
        self.server = server
        self.limits = server.limits
        self.ticket = ticket or Ticket(requestor_address[0], connection.sock)
        self._receiving: ReceivedDataSet | None = None  # a data set that may be on disk
        self._last_size = 0  # of the last data set received: the next one's likely size
        self._reports: ReportChannel | None = None  # storage commitment reports sent back here
        self._answer: bytes | None = None  # a response not yet sent (see _respond)
        self._answered = False  # the last message's response sent by the journal (Answer)

    def run(self) -> None:
        try:
            association = self._negotiate()
        except AssociationAborted as exc:
            why = self.ticket.closed_why or exc
            self.server.throttle.log(
                logging.INFO,
                f"unassociated:{self.address[0]}",
                "association request from %s ended: %s",
                self.address[0],
                why,
            )
            if exc.reason is not None:
                with contextlib.suppress(AssociationAborted):
                    self.connection.send(abort_pdu(exc.reason))
            return
        if association is None:
            return
        outcome, reason = "released", None
        paths = self.server.return_paths
        try:
            if paths is not None:
                self._reports = paths.open(association, self.connection)
            self._transfer(association)
        except AssociationAborted as exc:
            outcome, reason = "aborted", str(exc)
            if exc.reason is not None:
                with contextlib.suppress(AssociationAborted):
                    self._send_answer()  # what was answered before the fault is told
                    self.connection.send(abort_pdu(exc.reason))
        finally:
            if self._receiving is not None:
                self._receiving.discard()  # cut short: its spilled bytes are not kept
            if self._reports is not None:
                self._reports.close()  # unanswered reports go the other way, if allowed
            # The peer is done with the connection: it and its association slot go before
            # the association's end is recorded, which waits for its instances to be filed
            # (a sender that associates again at once finds its slot free).
            self.connection.close()
            self.server.gate.close(self.ticket)
            self.server.service.closed(association, outcome, reason)

    # -- association establishment

    def _negotiate(self) -> Association | None:
        # The whole request must arrive within acse_timeout of the connection, however its
        # bytes are paced: a trickle cannot hold the connection open.
        deadline = self.ticket.opened + self.limits.acse_timeout
        pdu_type, body = self.connection.read_pdu(MAX_ASSOCIATE_RQ, deadline)
        if pdu_type != ASSOCIATE_RQ:
            reason = ABORT_UNEXPECTED_PDU if pdu_type <= ABORT else ABORT_UNRECOGNISED_PDU
            raise AssociationAborted(f"PDU type 0x{pdu_type:02X} before association", reason)
        invalid = bad_ae_titles(body)
        if invalid is not None:
            raise AssociationAborted(invalid, ABORT_INVALID_PARAMETER)
        request = bytes(body)
        try:
            primitive = _decoded_request(request)
        except Exception as exc:  # whatever the decoder trips on, the request is invalid
            raise AssociationAborted(
                f"an undecodable A-ASSOCIATE-RQ: {exc}", ABORT_INVALID_PARAMETER
            ) from None
        requestor = Requestor(
            calling_ae_title=str(primitive.calling_ae_title or "").strip(),
            called_ae_title=str(primitive.called_ae_title or "").strip(),
            address=self.address[0],
            port=self.address[1],
        )
        association = Association(requestor, peer_max_pdu=primitive.maximum_length_received or 0)
        refusal = self._refusal(primitive, requestor)
        if refusal is not None:
            self.server.throttle.log(
                logging.WARNING,
                f"refused:{requestor.calling_ae_title}:{requestor.address}",
                "refused association from AE '%s' at %s: %s%s",
                escape(requestor.calling_ae_title),
                requestor.address,
                refusal.why,
                refusal.hint,
            )
            self.connection.send(reject_pdu(refusal.result, refusal.source, refusal.diagnostic))
            self.server.service.closed(association, "rejected", refusal.why)
            return None
        self._accept(request, association)
        self.server.service.accepted(association)
        return association

    def _refusal(self, primitive: A_ASSOCIATE, requestor: Requestor) -> Refusal | None:
        if str(primitive.application_context_name) != APPLICATION_CONTEXT_NAME:
            return Refusal(*REJECT_APPLICATION_CONTEXT, "application context not supported")
        refusal = self.server.service.admit(requestor)
        if refusal is None and not self.server.gate.associate(self.ticket):
            return Refusal(*REJECT_LOCAL_LIMIT_EXCEEDED, "too many associations")
        return refusal

    def _accept(self, body: bytes, association: Association) -> None:
        contexts, answer = _negotiated(body, self.server)
        association.contexts = dict(contexts)
        self.connection.send(answer)

    # -- data transfer

    def _transfer(self, association: Association) -> None:
        connection, limits = self.connection, self.limits
        message = _Message()
        while True:
            waiting = message.context_id is not None
            idle = 0.0
            if not waiting and self._reports is not None:
                idle = self._reports.idle(limits.network_timeout)  # reports sent back here
            timeout = limits.dimse_timeout if waiting else limits.network_timeout
            connection.set_timeout(max(timeout - idle, 0.001) if timeout else None)
            try:
                if message.compiled:
                    self._send_answer()
                    handed = self._receive_compiled(association, message)
                    if handed is None:  # the data set is in, and its message answered
                        message = _Message()
                        continue
                    pdu_type, body = handed
                else:
                    # Silence before a PDU is timed as above; a PDU once begun must arrive
                    # whole within network_timeout, however its bytes are paced.
                    answer, self._answer = self._answer, None
                    within = limits.network_timeout or None
                    if answer is not None or self._answered:  # sent, and the next PDU read
                        self._answered = False
                        pdu_type, body = connection.exchange(answer or b"", limits.max_pdu, within)
                    else:
                        pdu_type, body = connection.read_pdu(
                            limits.max_pdu, within=within, at_once=True
                        )
            except AssociationAborted as exc:
                if not waiting:
                    raise
                # Where in the message the peer stopped tells a stalled sender from a
                # node that missed the end of a message.
                raise AssociationAborted(
                    f"{exc} in the middle of a message (command received: "
                    f"{message.fields is not None}, data set bytes: {message.fragments.size})",
                    exc.reason,
                ) from None
            if pdu_type == P_DATA:
                message = self._pdvs(association, body, message)
            elif pdu_type == RELEASE_RQ:
                if waiting:
                    raise AssociationAborted("release requested mid-message", ABORT_UNEXPECTED_PDU)
                self.server.service.releasing(association)
                connection.send(RELEASE_RP)
                self._await_close()
                return
            elif pdu_type == ABORT:
                raise AssociationAborted("the peer aborted the association")
            elif pdu_type in (0x02, 0x03, 0x06, ASSOCIATE_RQ):
                raise AssociationAborted(f"unexpected PDU 0x{pdu_type:02X}", ABORT_UNEXPECTED_PDU)
            else:
                raise AssociationAborted(f"unknown PDU 0x{pdu_type:02X}", ABORT_UNRECOGNISED_PDU)

    def _await_close(self) -> None:
        """After the A-RELEASE-RP the requestor closes the connection (PS3.8 7.2); wait for
        that briefly, so the answer is not cut off by our own close."""
        self.connection.wait_closed(min(self.limits.acse_timeout or 5.0, 5.0))

    def _pdvs(
        self, association: Association, body: bytes | bytearray, message: _Message
    ) -> _Message:
        view = memoryview(body)
        offset, size = 0, len(body)
        while offset < size:
            if offset + 6 > size:
                raise AssociationAborted("a PDV item is cut short", ABORT_INVALID_PARAMETER)
            length, context_id, header = struct.unpack_from(">LBB", body, offset)
            end = offset + 4 + length
            if length < 2 or end > size:
                raise AssociationAborted("a PDV item of a wrong length", ABORT_INVALID_PARAMETER)
            if context_id not in association.contexts:
                raise AssociationAborted(
                    f"a PDV for presentation context {context_id}, not accepted",
                    ABORT_INVALID_PARAMETER,
                )
            if message.context_id is None:
                message.context_id = context_id
            elif context_id != message.context_id:
                raise AssociationAborted(
                    "a message switched presentation context", ABORT_INVALID_PARAMETER
                )
            value = view[offset + 6 : end]
            offset = end
            last = bool(header & 0x02)
            if header & 0x01:  # a command fragment
                if message.fields is not None:
                    raise AssociationAborted("a command after a command", ABORT_UNEXPECTED_PDU)
                if len(message.command) + len(value) > MAX_COMMAND:
                    raise AssociationAborted("a command set too long", ABORT_INVALID_PARAMETER)
                message.command += value
                if not last:
                    continue
                message.fields = parse_command(message.command)
                if us_value(message.fields, 0x0800) != NO_DATA_SET:
                    if us_value(message.fields, 0x0100) == C_STORE_RQ:
                        message.fragments.begin(*self._file_meta(association, message))
                        message.ahead = self._look_ahead(message.fields)
                        if message.ahead is not None:  # new: written as it arrives
                            room = self.server.service.reserve(self._last_size)
                            message.fragments.write_into(room)
                            self._receiving = message.fragments  # its room given back if cut
                        message.compiled = self.connection.compiled and offset == size
                    continue
            else:
                if message.fields is None:
                    raise AssociationAborted("a data set before its command", ABORT_UNEXPECTED_PDU)
                self._receiving = message.fragments
                message.fragments.add(
                    value,
                    self.limits.max_instance_bytes,
                    self.limits.instance_memory_bytes,
                    self.server.service.stage,
                )
                if not last:
                    continue
            self._dispatch(association, message)
            message = _Message()
        return message

    def _receive_compiled(
        self, association: Association, message: _Message
    ) -> tuple[int, bytes | bytearray] | None:
        """Read a C-STORE's data set with the compiled loop (:mod:`node.dimse._receive`)
        into one buffer after its file meta, sized from the sender's instance before; its
        header read from the start of it, as :class:`ReceivedDataSet` does. None once
        the message is in and answered; else the PDU the loop handed back (the data set
        goes on the usual way).

        On the only association, the loop stops after the first fragment, and the header
        is read while the rest arrives: it is then ready with the last byte. With others
        open, the processors are busy with them anyway, and each stop cost the thread a
        hand-over of the interpreter lock: the loop reads the data set whole, and the
        header is read from its start after."""
        fragments, limits = message.fragments, self.limits
        assert message.context_id is not None
        self._receiving = fragments
        start = len(fragments.prefix)
        hint = max(self._last_size + self._last_size // 8, COMPILED_MIN_BUFFER)
        most = min(limits.instance_memory_bytes, limits.max_instance_bytes)
        buffer = new_buffer(start + min(hint, most))
        buffer[:start] = fragments.prefix
        room = fragments.room()
        early = bool(fragments.syntax) and self.server.gate.associations < 2
        end, first = start, early
        while True:
            got = self.connection.receive_fragments(
                buffer,
                end,
                message.context_id,
                limits.max_pdu,
                limits.network_timeout or None,
                room,
                first_only=first,
            )
            if got.status == FRAGMENTS_FIRST:
                fragments.read_ahead(memoryview(buffer)[start : got.end])
                end, first = got.end, False
                continue
            break
        if fragments.syntax and not early and got.end > start:  # its first PDU's worth
            fragments.read_ahead(memoryview(buffer)[start : min(got.end, start + limits.max_pdu)])
        fragments.received(buffer, start, got.end, room)
        message.compiled = False
        if got.status == FRAGMENTS_DONE:
            self._dispatch(association, message)
            return None
        return got.pdu

    def _dispatch(self, association: Association, message: _Message) -> None:
        fields = message.fields
        assert fields is not None and message.context_id is not None
        command = us_value(fields, 0x0100)
        if command & 0x8000:
            if self._reports is not None and self._reports.response(fields):
                return  # the requester's answer to a storage commitment report
            raise AssociationAborted("a response to a request never sent", ABORT_UNEXPECTED_PDU)
        if command == C_CANCEL_RQ:
            return
        context = association.contexts[message.context_id]
        if command in NORMALISED_REQUESTS:
            answer = self._normalised(association, context, fields, message.fragments)
            self._respond(
                association, message.context_id, normalised_response(fields, *astuple(answer))
            )
            if self._reports is not None:
                self._reports.answered_request()
            return
        status, comment = UNRECOGNISED_OPERATION, ""
        if command == C_ECHO_RQ:
            status = SUCCESS
        elif command == C_STORE_RQ:
            early = self._early_answer(association, message.context_id, fields)
            status, comment = self._store(
                association, context, fields, message.fragments, message.ahead, early
            )
            if early is not None and early.error:
                raise AssociationAborted(f"cannot send to the peer: {os.strerror(early.error)}")
            if early is not None and early.sent:
                self._answered = True
                return
        self._respond(association, message.context_id, response(fields, status, comment))

    def _early_answer(
        self, association: Association, context_id: int, fields: dict[int, bytes]
    ) -> Answer | None:
        """A C-STORE's Success response for the journal to send the moment the instance is
        durable, before this thread counts it (:class:`node.store.journal.Answer`), on the
        only association: its sender then turns to its next instance while this thread
        does the rest. None where responses go another way (through TLS, beside storage
        commitment reports, behind one kept by :meth:`_respond`), and while other
        associations are open: their threads have the processors' time anyway.

        One association sending 513 KiB slices into a 2-core VM, alternated in one
        process, 16 pairs: median 1.04 x (11 above 1); the wait from the answer to the
        sender's next command 120-170 us down to about 90 (one run). Ten senders, 9
        pairs, answered this way too: median 0.96 x."""
        connection = self.connection
        if (
            not connection.compiled
            or self._reports is not None
            or self._answer is not None
            or self.server.gate.associations > 1
        ):
            return None
        success = response(fields, SUCCESS, "")
        pdus = p_data(context_id, success, b"", association.peer_max_pdu)
        return Answer(connection.sock.fileno(), pdus)

    def _respond(self, association: Association, context_id: int, command: bytes) -> None:
        """Send a response, or, on a plain TCP connection without storage commitment
        reports, keep it for the read of the sender's next PDU (:meth:`Connection.exchange`:
        one call sends it and reads that PDU). Kept responses go in the order made; any kept
        is sent before the association's thread waits for anything else."""
        pdus = p_data(context_id, command, b"", association.peer_max_pdu)
        if self.connection.compiled and self._reports is None:
            self._answer = pdus if self._answer is None else self._answer + pdus
        else:
            self.connection.send(pdus)

    def _send_answer(self) -> None:
        """Send the response kept by :meth:`_respond`, if any."""
        answer, self._answer = self._answer, None
        if answer is not None:
            self.connection.send(answer)

    def _look_ahead(self, fields: dict[int, bytes]) -> int | None:
        """Ask the node about the instance a C-STORE names while its data set arrives
        (a UID that is not valid is left to the checks after its last byte)."""
        sop_instance = uid(fields.get(0x1000, b""))
        if not is_valid_uid(sop_instance):
            return None
        return self.server.service.look_ahead(sop_instance)

    @staticmethod
    def _file_meta(association: Association, message: _Message) -> tuple[bytes, str]:
        """The Part 10 file meta of a C-STORE's data set, from its command and context,
        and the data set's transfer syntax."""
        assert message.fields is not None and message.context_id is not None
        context = association.contexts[message.context_id]
        syntax = str(context.transfer_syntax[0])
        meta = file_meta(
            message.fields.get(0x0002, b""),
            message.fields.get(0x1000, b""),
            syntax,
            association.requestor.calling_ae_title,
        )
        return meta, syntax

    def _normalised(
        self,
        association: Association,
        context: PresentationContext,
        fields: dict[int, bytes],
        fragments: ReceivedDataSet,
    ) -> NormalisedAnswer:
        """An N-CREATE / N-SET / N-ACTION (MPPS, Storage Commitment), handed to the node
        with its data set as received; the node decodes it. These data sets are small: one
        that outgrew memory is refused, never read from disk."""
        if fragments.spill is not None or fragments.over_limit:
            fragments.discard()
            return NormalisedAnswer(PROCESSING_FAILURE, "data set too large for an N-service")
        sop_class = uid(fields.get(0x0002) or fields.get(0x0003, b""))
        if sop_class != str(context.abstract_syntax):
            return NormalisedAnswer(SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the context")
        request = NormalisedRequest(
            command=us_value(fields, 0x0100),
            sop_class_uid=sop_class,
            sop_instance_uid=uid(fields.get(0x1000) or fields.get(0x1001, b"")),
            action_type=us_value(fields, 0x1008) if 0x1008 in fields else None,
            transfer_syntax_uid=str(context.transfer_syntax[0]),
            data=b"".join(fragments),
        )
        try:
            return self.server.service.normalised(association, request)
        except Exception:
            log.exception(
                "the N-service handler failed for a request from %s",
                association.requestor.calling_ae_title,
            )
            return NormalisedAnswer(PROCESSING_FAILURE, "processing failure")

    def _store(
        self,
        association: Association,
        context: PresentationContext,
        fields: dict[int, bytes],
        fragments: ReceivedDataSet,
        ahead: int | None = None,
        answer: Answer | None = None,
    ) -> tuple[int, str]:
        try:
            return self._store_received(association, context, fields, fragments, ahead, answer)
        finally:
            fragments.discard()  # placed by ingest, moved to quarantine, or not kept
            self._receiving = None

    def _store_received(
        self,
        association: Association,
        context: PresentationContext,
        fields: dict[int, bytes],
        fragments: ReceivedDataSet,
        ahead: int | None,
        answer: Answer | None = None,
    ) -> tuple[int, str]:
        sop_class, sop_instance = fields.get(0x0002, b""), fields.get(0x1000, b"")
        size = fragments.size
        if fragments.over_limit:
            association.count(OUT_OF_RESOURCES, size)
            limit = self.limits.max_instance_bytes
            log.warning(
                "an instance of %d bytes from %s refused: over the limit of %d",
                size,
                escape(association.requestor.calling_ae_title),
                limit,
            )
            return OUT_OF_RESOURCES, f"instance larger than {limit} bytes"
        if uid(sop_class) != str(context.abstract_syntax):
            association.count(SOP_CLASS_NOT_SUPPORTED, size)
            return SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context"
        syntax = str(context.transfer_syntax[0])
        calling = association.requestor.calling_ae_title
        if fragments.spill is not None:
            request = StoreRequest(uid(sop_class), uid(sop_instance), syntax, b"", fragments.spill)
        else:
            data = fragments.parts()
            request = StoreRequest(
                uid(sop_class),
                uid(sop_instance),
                syntax,
                data,
                crc32=fragments.crc32,
                ahead=ahead,
                reserved=fragments.reserved,
                header=fragments.header(),
                answer=answer,
            )
            self._last_size = size + len(fragments.prefix)
            fragments.clear()
        started = time.monotonic()
        try:
            status, comment = self.server.service.store(association, request)
            elapsed = time.monotonic() - started
            if elapsed > SLOW_STORE_SECONDS:
                log.warning("storing one instance from %s took %.1f s", calling, elapsed)
        except Exception:
            log.exception("the C-STORE handler failed for an instance from %s", calling)
            status, comment = PROCESSING_FAILURE, "processing failure"
        association.count(status, size)
        return status, comment
