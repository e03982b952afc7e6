"""Serve DTLS from trio as easily and safely as ``trio.serve_tcp`` serves TCP.

The whole public API is here::

    server = await nursery.start(partial(serve_dtls, handler, 4433, config=config))
    session = await connect_dtls("127.0.0.1", 4433, client_config)
"""

from ._client import connect_dtls
from ._config import (
    CERTIFICATE_CIPHERS,
    DEFAULT_CIPHERS,
    PSK_CIPHERS,
    DTLSClientConfig,
    DTLSServerConfig,
)
from ._errors import (
    ConfigError,
    DTLSError,
    HandshakeError,
    HandshakeTimeout,
    SessionClosed,
)
from ._server import DTLSServer, ServerStats, serve_dtls
from ._session import CloseReason, DTLSSession

__version__ = "0.1.0"

__all__ = [
    "CERTIFICATE_CIPHERS",
    "DEFAULT_CIPHERS",
    "PSK_CIPHERS",
    "CloseReason",
    "ConfigError",
    "DTLSClientConfig",
    "DTLSError",
    "DTLSServer",
    "DTLSServerConfig",
    "DTLSSession",
    "HandshakeError",
    "HandshakeTimeout",
    "ServerStats",
    "SessionClosed",
    "connect_dtls",
    "serve_dtls",
]
