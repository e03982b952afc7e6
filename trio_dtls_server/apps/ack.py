"""Ack: answer each datagram as Qt's secureudpserver example does.

Qt's server replies ``to (ADDR:PORT): ACK`` (its ``QHostAddress`` and port), so
its example client, secureudpclient, can talk to this server unchanged.
"""

from __future__ import annotations

from .._session import DTLSSession


async def ack(session: DTLSSession) -> None:
    host, port = session.peer_address[0], session.peer_address[1]
    reply = f"to ({host}:{port}): ACK".encode()
    async for _datagram in session:
        await session.send(reply)
