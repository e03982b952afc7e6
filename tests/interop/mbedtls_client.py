"""A DTLS 1.2 client built on python-mbedtls (Mbed TLS), for the interop tests.

    python mbedtls_client.py HOST PORT [--ca PEM] [--cert PEM --key PEM]
        [--psk IDENTITY:HEXKEY] [--server-name NAME] [--timeout S] [--send TEXT]...

Completes a handshake, sends each TEXT as one datagram and waits for one
reply to each. Prints ``handshake <cipher> <version>``, then ``reply <hex>``
per reply, on stdout. Exits 0 once every datagram got a reply, 1 if the
handshake fails or a reply does not come within the timeout (the reason on
stderr). The tests compare the replies; this script only reports them.
"""

from __future__ import annotations

import argparse
import socket
import sys

from mbedtls import tls, x509
from mbedtls.exceptions import TLSError
from mbedtls.pk import ECC


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument(
        "--send", action="append", default=[], metavar="TEXT", help="a datagram to send"
    )
    parser.add_argument("--ca", help="verify the server with this CA certificate")
    parser.add_argument("--cert", help="client certificate")
    parser.add_argument("--key", help="client private key (ECDSA)")
    parser.add_argument("--psk", metavar="IDENTITY:HEXKEY", help="authenticate with a PSK")
    parser.add_argument("--server-name", help="name to verify (default: HOST)")
    parser.add_argument("--timeout", type=float, default=5.0)
    return parser.parse_args(argv)


def configuration(args: argparse.Namespace) -> tls.DTLSConfiguration:
    chain = None
    if args.cert is not None:
        chain = ((x509.CRT.from_file(args.cert),), ECC.from_file(args.key))
    psk = None
    ciphers = None
    if args.psk is not None:
        identity, _, hexkey = args.psk.rpartition(":")
        psk = (identity, bytes.fromhex(hexkey))
        ciphers = ("TLS-PSK-WITH-AES-128-GCM-SHA256",)
    trust = tls.TrustStore.from_pem_file(args.ca) if args.ca is not None else None
    return tls.DTLSConfiguration(
        validate_certificates=trust is not None,
        trust_store=trust,
        certificate_chain=chain,
        pre_shared_key=psk,
        ciphers=ciphers,
        lowest_supported_version=tls.DTLSVersion.DTLSv1_2,
        highest_supported_version=tls.DTLSVersion.DTLSv1_2,
    )


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    context = tls.ClientContext(configuration(args))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    raw = socket.socket(family, socket.SOCK_DGRAM)
    raw.settimeout(args.timeout)
    raw.connect((args.host, args.port))
    name = args.server_name or args.host
    conn = context.wrap_socket(raw, server_hostname=name if args.ca else None)
    try:
        try:
            conn.do_handshake()
        except (OSError, TLSError) as exc:
            print(f"handshake failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        cipher: object = conn.cipher()  # a str, whatever the stub says
        print(f"handshake {cipher} {conn.negotiated_tls_version()}", flush=True)
        for message in args.send:
            conn.send(message.encode())
            try:
                reply = conn.recv(65535)
            except (OSError, TLSError) as exc:
                print(f"no reply: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            print(f"reply {reply.hex()}", flush=True)
        return 0
    finally:
        conn.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
