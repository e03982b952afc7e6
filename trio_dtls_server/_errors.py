"""The exceptions this library raises. No raw ``OpenSSL.SSL`` exception reaches user code."""

from __future__ import annotations

import trio


class DTLSError(Exception):
    """Base class of this library's errors."""


class ConfigError(DTLSError, ValueError):
    """A setting is invalid; the message names the setting and what is wrong with it."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class HandshakeError(DTLSError):
    """The handshake failed: a fatal alert, a refused credential, or a protocol error."""


class HandshakeTimeout(HandshakeError, trio.TooSlowError):
    """The handshake did not finish within ``handshake_timeout`` seconds."""


class SessionClosed(DTLSError, trio.BrokenResourceError):
    """The session has ended (``reason`` says why), so nothing more can be sent.

    A handler that lets this escape for its own session (the peer closed while
    a reply was on its way, say) ends normally: it is not a handler error.
    """

    def __init__(self, reason: str, session: object = None) -> None:
        super().__init__(f"the session has ended: {reason}")
        self.reason = reason
        #: The session that had ended.
        self.session = session
