"""Ready-made handlers: what ``trio-dtls-server serve --app NAME`` runs.

Each entry makes a fresh handler (apps such as chat keep state shared by the
sessions of one server).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from .._session import DTLSSession
from .ack import ack
from .echo import echo

Handler = Callable[[DTLSSession], Awaitable[object]]


def _chat() -> Handler:
    from .chat import ChatRoom

    return ChatRoom().handle


APPS: dict[str, Callable[[], Handler]] = {
    "echo": lambda: echo,
    "ack": lambda: ack,
    "chat": _chat,
}

__all__ = ["APPS", "Handler", "ack", "echo"]
