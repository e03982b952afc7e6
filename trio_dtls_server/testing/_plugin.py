"""pytest plugin: fixtures for testing DTLS programs.

Installed with the ``testing`` extra, it is registered through the ``pytest11``
entry point, so these fixtures are there in any test run (they need
pytest-trio, with ``trio_mode = true`` or ``@pytest.mark.trio``):

``dtls_pki``
    A :class:`TestPKI` made once per test session.
``dtls_server``
    ``await dtls_server(handler, config=None, host="127.0.0.1", **settings)``
    starts ``serve_dtls`` on an ephemeral port in the test's nursery and
    returns the :class:`DTLSServer`; it is shut down when the test ends.
``dtls_client``
    ``await dtls_client(target, config=None, **settings)``: a session to a
    server (or an address, such as a relay's), closed when the test ends.
``fault_relay``
    ``await fault_relay(target, seed=0, client_to_server=Faults(...), ...)``: a
    fault-injecting UDP relay in front of ``target``, closed when the test ends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

import pytest
import trio

from .._client import connect_dtls
from .._config import DTLSClientConfig, DTLSServerConfig
from .._server import DTLSServer, serve_dtls
from .._session import DTLSSession
from ._harness import TestPKI, echo_handler
from ._relay import FaultyRelay, open_fault_relay

Handler = Callable[[DTLSSession], Awaitable[object]]
ServerFactory = Callable[..., Awaitable[DTLSServer]]
ClientFactory = Callable[..., Awaitable[DTLSSession]]
RelayFactory = Callable[..., Awaitable[FaultyRelay]]


@pytest.fixture(scope="session")
def dtls_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPKI:
    """Certificates and PSK identities for this test session."""
    return TestPKI.create(tmp_path_factory.mktemp("dtls-pki"))


@pytest.fixture
async def dtls_server(dtls_pki: TestPKI, nursery: trio.Nursery) -> AsyncIterator[ServerFactory]:
    """Factory: start a DTLS server with a handler; it stops when the test ends."""
    servers: list[DTLSServer] = []

    async def start(
        handler: Handler = echo_handler,
        config: DTLSServerConfig | None = None,
        *,
        host: str = "127.0.0.1",
        **settings: Any,
    ) -> DTLSServer:
        if config is None:
            config = dtls_pki.server_config(**settings)
        elif settings:
            raise TypeError("give either config or settings, not both")
        server: DTLSServer = await nursery.start(
            partial(serve_dtls, handler, 0, config=config, host=host)
        )
        servers.append(server)
        return server

    yield start
    with trio.CancelScope(shield=True), trio.move_on_after(30):
        for server in servers:
            await server.aclose()


@pytest.fixture
async def dtls_client(dtls_pki: TestPKI) -> AsyncIterator[ClientFactory]:
    """Factory: connect a client session (test certificate by default); closed at the end."""
    sessions: list[DTLSSession] = []

    async def connect(
        target: DTLSServer | FaultyRelay | tuple[str, int],
        config: DTLSClientConfig | None = None,
        **settings: Any,
    ) -> DTLSSession:
        if config is None:
            config = dtls_pki.client_config(**settings)
        elif settings:
            raise TypeError("give either config or settings, not both")
        host, port = target if isinstance(target, tuple) else target.address[:2]
        session = await connect_dtls(host, port, config)
        sessions.append(session)
        return session

    yield connect
    with trio.CancelScope(shield=True):
        for session in sessions:
            await session.aclose()


@pytest.fixture
async def fault_relay(nursery: trio.Nursery) -> AsyncIterator[RelayFactory]:
    """Factory: a fault-injecting relay in front of a server; closed at the end."""
    stops: list[trio.CancelScope] = []

    async def run_relay(
        address: tuple[str, int],
        options: dict[str, Any],
        task_status: trio.TaskStatus[FaultyRelay],
    ) -> None:
        with trio.CancelScope() as scope:
            stops.append(scope)
            async with open_fault_relay(address, **options) as relay:
                task_status.started(relay)
                await trio.sleep_forever()

    async def open_relay(target: DTLSServer | tuple[str, int], **options: Any) -> FaultyRelay:
        address = target if isinstance(target, tuple) else target.address
        relay: FaultyRelay = await nursery.start(run_relay, address, options)
        return relay

    yield open_relay
    for scope in stops:
        scope.cancel()
