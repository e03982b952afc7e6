"""A DTLS 1.2 client built on Qt's QDtls (PySide6), for the interop tests.

    python qt_client.py HOST PORT [--psk IDENTITY:HEXKEY] [--verify-none]
        [--ca PEM] [--cert PEM --key PEM] [--peer-name NAME] [--timeout S] [--send TEXT]...

It works like Qt's ``secureudpclient`` example (association.cpp): a QUdpSocket
connected to the server, a client-mode QDtls with
``QSslConfiguration.defaultDtlsConfiguration()``, the handshake driven from
``readyRead``, ``handshakeTimeout`` answered with ``handleTimeout`` and the PSK
given from ``pskRequired``. With ``--psk "Alice (clone number 1)":1a2b3c4d5e6f
--verify-none`` it is that example's client. Run it with
``QT_QPA_PLATFORM=offscreen``: it needs no display (QCoreApplication only).

On stdout: ``local HOST:PORT`` (the client's own address) once bound,
``handshake <cipher> <protocol>`` once encrypted, then ``reply <hex>`` for each
reply. Each TEXT is sent as one datagram after the previous one got its reply.
Exits 0 once every datagram got a reply, 1 on a handshake error, a shutdown
alert or the overall timeout (the reason on stderr).
"""

from __future__ import annotations

import argparse
import sys

from PySide6.QtCore import QByteArray, QCoreApplication, QTimer
from PySide6.QtNetwork import (
    QAbstractSocket,
    QDtls,
    QDtlsError,
    QHostAddress,
    QSsl,
    QSslCertificate,
    QSslConfiguration,
    QSslKey,
    QSslPreSharedKeyAuthenticator,
    QSslSocket,
    QUdpSocket,
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--psk", metavar="IDENTITY:HEXKEY", help="answer pskRequired with this")
    parser.add_argument(
        "--verify-none", action="store_true", help="do not verify the server (as the example)"
    )
    parser.add_argument("--ca", help="verify the server with this CA certificate")
    parser.add_argument("--cert", help="client certificate")
    parser.add_argument("--key", help="client private key (EC)")
    parser.add_argument("--peer-name", default="", help="setPeerVerificationName (default: HOST)")
    parser.add_argument("--timeout", type=float, default=10.0, help="bound on the whole run")
    parser.add_argument(
        "--send", action="append", default=[], metavar="TEXT", help="a datagram to send"
    )
    return parser.parse_args(argv)


def fail(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
    QCoreApplication.exit(1)


class Association:
    """One client association, the shape of the example's ``DtlsAssociation``."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.pending = [text.encode() for text in args.send]
        self.socket = QUdpSocket()
        self.crypto = QDtls(QSslSocket.SslMode.SslClientMode)
        address = QHostAddress(args.host)
        if not self.socket.bind(
            QHostAddress(
                QHostAddress.SpecialAddress.AnyIPv6
                if address.protocol() == QAbstractSocket.NetworkLayerProtocol.IPv6Protocol
                else QHostAddress.SpecialAddress.AnyIPv4
            )
        ):
            raise SystemExit(f"bind: {self.socket.errorString()}")
        self.crypto.setPeer(address, args.port, args.peer_name or args.host)
        self.crypto.pskRequired.connect(self.psk_required)
        self.crypto.handshakeTimeout.connect(self.handshake_timeout)
        self.socket.readyRead.connect(self.ready_read)
        self.socket.connected.connect(self.start_handshake)

        configuration = QSslConfiguration.defaultDtlsConfiguration()
        if args.verify_none:
            configuration.setPeerVerifyMode(QSslSocket.PeerVerifyMode.VerifyNone)
        else:
            configuration.setPeerVerifyMode(QSslSocket.PeerVerifyMode.VerifyPeer)
        if args.ca is not None:
            configuration.setCaCertificates(QSslCertificate.fromPath(args.ca))
        if args.cert is not None:
            configuration.setLocalCertificateChain(QSslCertificate.fromPath(args.cert))
            with open(args.key, "rb") as file:
                key = QSslKey(QByteArray(file.read()), QSsl.KeyAlgorithm.Ec)
            if key.isNull():
                raise SystemExit(f"cannot read the EC key {args.key}")
            configuration.setPrivateKey(key)
        if not self.crypto.setDtlsConfiguration(configuration):
            raise SystemExit(f"setDtlsConfiguration: {self.crypto.dtlsErrorString()}")
        self.socket.connectToHost(args.host, args.port)

    def start_handshake(self) -> None:
        print(
            f"local {self.socket.localAddress().toString()}:{self.socket.localPort()}",
            flush=True,
        )
        if not self.crypto.doHandshake(self.socket):
            fail(f"failed to start a handshake: {self.crypto.dtlsErrorString()}")

    def ready_read(self) -> None:
        while self.socket.hasPendingDatagrams():
            size = self.socket.pendingDatagramSize()
            datagram = self.socket.read(max(size, 0))
            if self.crypto.isConnectionEncrypted():
                self.decrypt(datagram)
            elif not self.crypto.doHandshake(self.socket, datagram):
                fail(f"handshake error: {self.crypto.dtlsErrorString()}")
                return
            elif self.crypto.isConnectionEncrypted():
                cipher = self.crypto.sessionCipher().name()
                print(f"handshake {cipher} {self.crypto.sessionProtocol().name}", flush=True)
                self.send_next()

    def decrypt(self, datagram: QByteArray) -> None:
        plain = self.crypto.decryptDatagram(self.socket, datagram)
        if plain.size():
            print(f"reply {plain.data().hex()}", flush=True)
            self.send_next()
        elif self.crypto.dtlsError() == QDtlsError.RemoteClosedConnectionError:
            fail("shutdown alert received")
        else:
            print(
                f"empty or undecryptable datagram: {self.crypto.dtlsErrorString()}",
                file=sys.stderr,
                flush=True,
            )

    def send_next(self) -> None:
        if not self.pending:
            self.crypto.shutdown(self.socket)
            QCoreApplication.exit(0)
            return
        written = self.crypto.writeDatagramEncrypted(self.socket, self.pending.pop(0))
        if written <= 0:
            fail(f"failed to send: {self.crypto.dtlsErrorString()}")

    def handshake_timeout(self) -> None:
        print("handshake timeout, re-transmitting", file=sys.stderr, flush=True)
        if not self.crypto.handleTimeout(self.socket):
            fail(f"failed to re-transmit: {self.crypto.dtlsErrorString()}")

    def psk_required(self, authenticator: QSslPreSharedKeyAuthenticator) -> None:
        if self.args.psk is None:
            fail("the server asked for a PSK and none was given")
            return
        identity, _, hexkey = self.args.psk.rpartition(":")
        authenticator.setIdentity(QByteArray(identity.encode("latin-1")))
        authenticator.setPreSharedKey(QByteArray(bytes.fromhex(hexkey)))


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    app = QCoreApplication([sys.argv[0]])
    if not QSslSocket.supportsSsl():
        print("Qt has no TLS backend", file=sys.stderr)
        return 1
    association = Association(args)
    QTimer.singleShot(
        round(args.timeout * 1000), lambda: fail(f"timed out after {args.timeout} s")
    )
    status = app.exec()
    del association
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
