"""Echo: every datagram goes back to its sender unchanged."""

from __future__ import annotations

from .._session import DTLSSession


async def echo(session: DTLSSession) -> None:
    async for datagram in session:
        await session.send(datagram)
