"""Chat: every datagram a member sends goes to every other member of the room.

One :class:`ChatRoom` is shared by all the sessions of a server; its
:meth:`ChatRoom.handle` is the handler::

    room = ChatRoom()
    await serve_dtls(room.handle, 4433, config=config)

A member is named by who it authenticated as (its certificate's common name,
or its PSK identity), so names cannot be spoofed; a second session with a name
already in the room gets a suffix (``alice#2``).

What members see, one datagram per line (UTF-8)::

    * welcome alice; here now: alice, bob      (to the newcomer)
    * alice joined                             (to the others)
    bob: hello                                 (a message from bob)
    * here now: alice, bob                     (the reply to /who)
    ! message too long (2000 bytes, limit 1024)   (an error; nothing was sent)
    * bye                                      (the reply to /quit; the session ends)
    * bob left (idle timeout)                  (bob is gone, and why)

Commands: ``/who`` lists the members, ``/quit`` leaves. A member that floods
the room is throttled (a token bucket per member), an oversized message is
refused, and a member that cannot keep up only loses its own messages: each
member has a bounded outbox and its own sender task, so the room never waits
for one peer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import trio

from .._session import MAX_DATAGRAM_PAYLOAD, CloseReason, DTLSSession

__all__ = ["ChatRoom"]

logger = logging.getLogger("trio_dtls_server.chat")

#: Datagrams waiting for one member before further ones are dropped for it.
OUTBOX_SIZE = 64

#: Seconds a leaving member's sender task gets to send what is still queued
#: (the ``* bye`` after ``/quit`` above all) before the session is closed.
DRAIN_TIMEOUT = 2.0

#: Longest member name, in characters. Certificate common names stop at 64;
#: PSK identities may be longer, but a name is repeated in every line, and this
#: keeps every line within one DTLS record (see ``_MAX_MESSAGE_LIMIT``).
MAX_NAME_CHARS = 64

# A line is "NAME: text" with NAME at most 64 characters of up to 4 bytes plus a
# "#N" suffix: 512 bytes leave room for that within one 16 KiB record.
_MAX_MESSAGE_LIMIT = MAX_DATAGRAM_PAYLOAD - 512

# Control characters (C0 except tab, DEL, C1) in names and messages become "?":
# a newline or an escape sequence in a message would otherwise let one member
# print lines on the others' terminals that look as if the room, or another
# member, had said them. "?" keeps the byte count, so the limits still hold.
_CONTROL = {c: "?" for c in (*range(0x00, 0x09), *range(0x0A, 0x20), *range(0x7F, 0xA0))}

# How each way a session can end is told to the others: "* NAME left (REASON)".
_LEAVE_REASONS = {
    CloseReason.PEER_CLOSED: "disconnected",
    CloseReason.LOCAL_CLOSE: "closed",
    CloseReason.HANDLER_RETURNED: "closed",
    CloseReason.HANDLER_ERROR: "error",
    CloseReason.IDLE_TIMEOUT: "idle timeout",
    CloseReason.REPLACED: "reconnected",
    CloseReason.EVICTED: "evicted",
    CloseReason.SHUTDOWN: "server shutdown",
    CloseReason.PROTOCOL_ERROR: "connection error",
    CloseReason.UNREACHABLE: "unreachable",
}


def _clean(text: str) -> str:
    return text.translate(_CONTROL)


class _TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; one per datagram."""

    def __init__(self, rate: float, burst: int) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._tokens = float(burst)
        self._updated = trio.current_time()

    def take(self) -> bool:
        """Take a token if there is one; False means: drop this datagram."""
        now = trio.current_time()
        self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


@dataclass(eq=False)
class _Member:
    name: str
    session: DTLSSession
    outbox: trio.MemorySendChannel[bytes]
    bucket: _TokenBucket
    # True while datagrams are being dropped by the rate limit, so that a
    # flooding member gets one "slow down" per episode, not one per datagram
    # (which would double the traffic it causes).
    throttled: bool = False
    # Lines dropped because the outbox was full: this member is too slow.
    dropped: int = field(default=0)

    def post(self, data: bytes) -> None:
        """Queue ``data`` for this member without ever waiting; drop it if the outbox is full."""
        try:
            self.outbox.send_nowait(data)
        except trio.WouldBlock:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                logger.info("%s is not keeping up; %d line(s) dropped", self.name, self.dropped)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the member is leaving: its sender task is gone or going

    def reply(self, line: str) -> None:
        self.post(line.encode())


class ChatRoom:
    """A chat room: one instance per server, :meth:`handle` is the session handler.

    Args:
      max_message_bytes: longest message accepted, in bytes (the datagram as
        received, before the trailing newline is stripped); a longer one is
        refused with an error reply and not sent to anyone.
      rate: messages per second each member may send, on average.
      burst: messages a member may send at once after being quiet.
    """

    def __init__(self, max_message_bytes: int = 1024, rate: float = 5.0, burst: int = 10) -> None:
        if isinstance(max_message_bytes, bool) or not 1 <= max_message_bytes <= _MAX_MESSAGE_LIMIT:
            raise ValueError(
                f"max_message_bytes must be between 1 and {_MAX_MESSAGE_LIMIT}, "
                f"not {max_message_bytes!r}"
            )
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, not {rate!r}")
        if isinstance(burst, bool) or burst < 1:
            raise ValueError(f"burst must be at least 1, not {burst!r}")
        self.max_message_bytes = max_message_bytes
        self.rate = rate
        self.burst = burst
        # Members by name, in the order they joined.
        self._members: dict[str, _Member] = {}

    @property
    def members(self) -> list[str]:
        """The names of the members now in the room, in the order they joined."""
        return list(self._members)

    def format_message(self, name: str, text: str) -> str:
        """How a member's message is shown to the others; override to change it."""
        return f"{name}: {text}"

    # -- the handler ----------------------------------------------------------

    async def handle(self, session: DTLSSession) -> None:
        """Serve one member from joining to leaving.

        Returns on ``/quit`` (the server then sends close_notify) and when the
        session ends (the peer's close_notify, idle timeout, server shutdown).
        Whatever way it ends, even by an exception or cancellation, the member
        is removed and the others are told.
        """
        outbox, inbox = trio.open_memory_channel[bytes](OUTBOX_SIZE)
        member = self._join(session, outbox)
        reason: str | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._deliver, member, inbox)
                reason = await self._converse(member)
                # Out of the room first, so that nothing more is queued for the
                # member and /who no longer lists it while its outbox drains.
                self._leave(member, reason)
                # Closing the outbox lets the sender task send what is queued
                # (the "* bye") and stop; the deadline bounds that for a peer
                # the kernel cannot send to fast enough.
                outbox.close()
                nursery.cancel_scope.deadline = trio.current_time() + DRAIN_TIMEOUT
        except Exception:
            if reason is None:
                reason = "error"
            raise
        finally:
            # Cancelled (e.g. the shutdown grace ran out) before a reason was
            # known: the session says why it ended.
            if reason is None:
                reason = _leave_reason(session.close_reason)
            self._leave(member, reason)
            outbox.close()

    # -- joining and leaving ------------------------------------------------

    def _join(self, session: DTLSSession, outbox: trio.MemorySendChannel[bytes]) -> _Member:
        base = _clean(session.identity or session.peer)[:MAX_NAME_CHARS]
        name, n = base, 1
        while name in self._members:
            n += 1
            name = f"{base}#{n}"
        member = _Member(name, session, outbox, _TokenBucket(self.rate, self.burst))
        self._broadcast(f"* {name} joined")
        self._members[name] = member
        member.reply(f"* welcome {name}; here now: {', '.join(self._members)}")
        logger.info("%s joined (session %s from %s)", name, session.session_id, session.peer)
        return member

    def _leave(self, member: _Member, reason: str) -> None:
        """Take ``member`` out of the room and tell the others (once)."""
        if self._members.get(member.name) is not member:
            return  # already left
        del self._members[member.name]
        self._broadcast(f"* {member.name} left ({reason})")
        logger.info("%s left (%s)", member.name, reason)

    # -- talking ----------------------------------------------------------------

    async def _converse(self, member: _Member) -> str:
        """Handle the member's datagrams until it leaves; return why it left."""
        session = member.session
        while True:
            try:
                datagram = await session.receive()
            except trio.EndOfChannel:
                return _leave_reason(session.close_reason)
            # The rate limit comes first: it is the cheapest check, and it bounds
            # the work (and the error replies) one member can cause.
            if not member.bucket.take():
                if not member.throttled:
                    member.throttled = True
                    member.reply(
                        f"! slow down: at most {self.rate:g} messages a second "
                        f"(bursts of {self.burst}); messages are being dropped"
                    )
                continue
            member.throttled = False
            if len(datagram) > self.max_message_bytes:
                member.reply(
                    f"! message too long ({len(datagram)} bytes, limit {self.max_message_bytes})"
                )
                continue
            try:
                text = datagram.decode("utf-8")
            except UnicodeDecodeError:
                member.reply("! message is not valid UTF-8; not sent")
                continue
            text = _clean(text.rstrip("\r\n"))
            if not text:
                continue  # an empty line says nothing
            if text.startswith("/"):
                if self._command(member, text):
                    return "quit"
                continue
            self._broadcast(self.format_message(member.name, text), exclude=member)

    def _command(self, member: _Member, text: str) -> bool:
        """Run a /command; True means the member quits."""
        command = text.split(maxsplit=1)[0].lower()
        if command == "/who":
            member.reply(f"* here now: {', '.join(self._members)}")
        elif command == "/quit":
            member.reply("* bye")
            return True
        else:
            member.reply(f"! unknown command {command}; try /who or /quit")
        return False

    def _broadcast(self, line: str, *, exclude: _Member | None = None) -> None:
        """Queue ``line`` for every member but ``exclude``; never waits."""
        data = line.encode()
        for member in list(self._members.values()):
            if member is not exclude:
                member.post(data)

    @staticmethod
    async def _deliver(member: _Member, inbox: trio.MemoryReceiveChannel[bytes]) -> None:
        """The member's sender task: send its outbox in order until it is closed."""
        async with inbox:
            async for data in inbox:
                try:
                    await member.session.send(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    # The session has ended (SessionClosed is a BrokenResourceError):
                    # nothing more can reach this member; the handler notices the
                    # end through receive() and leaves.
                    return


def _leave_reason(reason: CloseReason | None) -> str:
    if reason is None:
        return "disconnected"
    return _LEAVE_REASONS.get(reason, reason.value)
