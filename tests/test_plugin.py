"""The harness is a pytest plugin: an installed package brings its fixtures along."""

from __future__ import annotations

import pytest


def test_fixtures_reach_a_users_test_suite_through_the_entry_point(
    pytester: pytest.Pytester,
) -> None:
    # A separate pytest process with no conftest: only the pytest11 entry point
    # can provide these fixtures.
    pytester.makeini("[pytest]\ntrio_mode = true\n")
    pytester.makepyfile(
        """
        from trio_dtls_server.testing import Faults, exchange, wait_for_stats

        async def shout(session):
            async for datagram in session:
                await session.send(datagram.upper())

        async def test_handler(dtls_server, dtls_client):
            server = await dtls_server(shout)
            client = await dtls_client(server)
            assert await exchange(client, b"hi") == b"HI"
            await client.aclose()
            await wait_for_stats(server, sessions_closed=1, handler_errors=0)

        async def test_through_relay(dtls_pki, dtls_server, dtls_client, fault_relay):
            server = await dtls_server(shout)
            relay = await fault_relay(server, seed=3, client_to_server=Faults(duplicate=0.5))
            client = await dtls_client(relay.address)
            assert await exchange(client, b"dup") == b"DUP"
            assert relay.stats["c2s"].received > 0

        def test_pki(dtls_pki):
            assert dtls_pki.files.ca_cert.exists()
            assert set(dtls_pki.psk_identities) == {"device-1", "device-2"}
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)
