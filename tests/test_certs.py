"""Tests for trio_dtls_server._certs (development/test certificate generation)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import DNSName, IPAddress
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from trio_dtls_server import _certs
from trio_dtls_server._certs import (
    DEFAULT_HOSTS,
    CertificateFiles,
    development_certificates,
    generate_ca,
    generate_pki,
    issue_certificate,
    parse_hosts,
    write_certificate,
    write_private_key,
)

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def sans(cert: x509.Certificate) -> list[x509.GeneralName]:
    return list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> CertificateFiles:
    return generate_pki(tmp_path_factory.mktemp("pki") / "certs")


# --------------------------------------------------------------------------
# Chain and policy


def test_leaves_are_directly_issued_by_ca(pki: CertificateFiles) -> None:
    ca = load_cert(pki.ca_cert)
    ca.verify_directly_issued_by(ca)  # self-signed
    load_cert(pki.server_cert).verify_directly_issued_by(ca)
    load_cert(pki.client_cert).verify_directly_issued_by(ca)


@pytest.mark.parametrize(
    "subject",
    [
        DNSName("localhost"),
        IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        IPAddress(ipaddress.IPv6Address("::1")),
    ],
    ids=["localhost", "127.0.0.1", "::1"],
)
def test_server_chain_verifies(pki: CertificateFiles, subject: DNSName | IPAddress) -> None:
    ca = load_cert(pki.ca_cert)
    server = load_cert(pki.server_cert)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    assert verifier.verify(server, []) == [server, ca]


def test_server_chain_rejects_other_names(pki: CertificateFiles) -> None:
    store = Store([load_cert(pki.ca_cert)])
    server = load_cert(pki.server_cert)
    for subject in (DNSName("example.com"), IPAddress(ipaddress.IPv4Address("127.0.0.2"))):
        verifier = PolicyBuilder().store(store).build_server_verifier(subject)
        with pytest.raises(VerificationError):
            verifier.verify(server, [])


def test_client_chain_verifies(pki: CertificateFiles) -> None:
    ca = load_cert(pki.ca_cert)
    client = load_cert(pki.client_cert)
    verified = PolicyBuilder().store(Store([ca])).build_client_verifier().verify(client, [])
    assert verified.chain == [client, ca]
    assert verified.subjects == [x509.DNSName("client")]


def test_usages_are_not_interchangeable(pki: CertificateFiles) -> None:
    """The EKUs are checked: a client cert can't serve and a server cert can't be a client."""
    store = Store([load_cert(pki.ca_cert)])
    client = load_cert(pki.client_cert)
    server = load_cert(pki.server_cert)
    # Give the client cert the server's name so that only the EKU is wrong.
    named_client, _ = issue_certificate(
        load_cert(pki.ca_cert),
        load_key(pki.ca_key),
        "localhost",
        hosts=["localhost"],
        usage="client",
    )
    for cert in (client, named_client):
        with pytest.raises(VerificationError):
            PolicyBuilder().store(store).build_server_verifier(DNSName("localhost")).verify(
                cert, []
            )
    with pytest.raises(VerificationError):
        PolicyBuilder().store(store).build_client_verifier().verify(server, [])


def test_untrusted_ca_is_rejected(pki: CertificateFiles) -> None:
    other_ca, _ = generate_ca()
    verifier = PolicyBuilder().store(Store([other_ca])).build_server_verifier(DNSName("localhost"))
    with pytest.raises(VerificationError):
        verifier.verify(load_cert(pki.server_cert), [])


def test_extensions(pki: CertificateFiles) -> None:
    ca = load_cert(pki.ca_cert)
    bc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical
    assert bc.value.ca
    assert bc.value.path_length == 0
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.key_cert_sign
    assert ku.value.crl_sign
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    for path, eku in (
        (pki.server_cert, ExtendedKeyUsageOID.SERVER_AUTH),
        (pki.client_cert, ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        leaf = load_cert(path)
        assert leaf.version is x509.Version.v3
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical
        assert not bc.value.ca
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical
        assert ku.value.digital_signature
        assert not ku.value.key_encipherment
        assert not ku.value.key_cert_sign
        assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski.digest
        ski = leaf.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        key = load_key(path.with_suffix(".key"))
        assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    assert isinstance(ca.signature_hash_algorithm, hashes.SHA256)


def test_common_names(pki: CertificateFiles) -> None:
    def cn(cert: x509.Certificate) -> str | bytes:
        return cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value

    assert cn(load_cert(pki.server_cert)) == "localhost"
    assert cn(load_cert(pki.client_cert)) == "client"
    ca = load_cert(pki.ca_cert)
    assert cn(ca) == "trio-dtls-server development CA"
    assert ca.issuer == ca.subject


def test_serial_numbers_are_random_and_distinct(pki: CertificateFiles) -> None:
    serials = {load_cert(path).serial_number for path in (pki.ca_cert, pki.server_cert)}
    serials.add(load_cert(pki.client_cert).serial_number)
    serials.add(generate_ca()[0].serial_number)
    assert len(serials) == 4
    assert all(0 < serial < 2**159 for serial in serials)


# --------------------------------------------------------------------------
# Keys and files


@posix_only
def test_file_modes(tmp_path: Path) -> None:
    files = generate_pki(tmp_path / "new" / "certs")
    assert mode(files.directory) == 0o700
    for key in (files.ca_key, files.server_key, files.client_key):
        assert mode(key) == 0o600
    for cert in (files.ca_cert, files.server_cert, files.client_cert):
        assert mode(cert) == 0o644
    assert sorted(p.name for p in files.directory.iterdir()) == sorted(
        ["ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


@posix_only
def test_file_modes_ignore_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        files = generate_pki(tmp_path / "certs")
    finally:
        os.umask(old)
    assert mode(files.ca_cert) == 0o644
    assert mode(files.ca_key) == 0o600
    assert mode(files.directory) == 0o700


@posix_only
def test_existing_directory_mode_is_kept(tmp_path: Path) -> None:
    tmp_path.chmod(0o755)
    files = generate_pki(tmp_path)
    assert files.directory == tmp_path
    assert mode(tmp_path) == 0o755
    assert mode(files.server_key) == 0o600


@posix_only
def test_existing_key_file_becomes_private(tmp_path: Path) -> None:
    path = tmp_path / "server.key"
    path.write_text("old, world-readable\n")
    path.chmod(0o666)
    key = ec.generate_private_key(ec.SECP256R1())
    write_private_key(path, key)
    assert mode(path) == 0o600
    assert load_key(path).private_numbers() == key.private_numbers()


@posix_only
def test_writers_refuse_symlinks(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("untouched")
    link = tmp_path / "server.key"
    link.symlink_to(target)
    cert, key = generate_ca()
    with pytest.raises(OSError):  # noqa: PT011 - ELOOP; the message is the OS's
        write_private_key(link, key)
    with pytest.raises(OSError):  # noqa: PT011
        write_certificate(link, cert)
    assert target.read_text() == "untouched"


def test_keys_are_p256_and_match_certs(pki: CertificateFiles) -> None:
    for cert_path, key_path in (
        (pki.ca_cert, pki.ca_key),
        (pki.server_cert, pki.server_key),
        (pki.client_cert, pki.client_key),
    ):
        key = load_key(key_path)
        assert isinstance(key.curve, ec.SECP256R1)
        assert key.public_key() == load_cert(cert_path).public_key()
        assert b"ENCRYPTED" not in key_path.read_bytes()
        assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    keys = {load_key(p).private_numbers().private_value for p in (pki.ca_key, pki.server_key)}
    keys.add(load_key(pki.client_key).private_numbers().private_value)
    assert len(keys) == 3


def test_generate_pki_accepts_str_and_overwrites(tmp_path: Path) -> None:
    first = generate_pki(str(tmp_path))
    before = first.server_key.read_bytes()
    second = generate_pki(str(tmp_path))
    assert second == first
    assert second.server_key.read_bytes() != before
    load_cert(second.server_cert).verify_directly_issued_by(load_cert(second.ca_cert))


# --------------------------------------------------------------------------
# Hosts


def test_sans_match_hosts(tmp_path: Path) -> None:
    hosts = parse_hosts("dtls.example.test, localhost,10.1.2.3 ,[fe80::1],::1")
    assert hosts == ["dtls.example.test", "localhost", "10.1.2.3", "fe80::1", "::1"]
    files = generate_pki(tmp_path, hosts=hosts, client_name="sensor-7")
    server = load_cert(files.server_cert)
    assert sans(server) == [
        x509.DNSName("dtls.example.test"),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("10.1.2.3")),
        x509.IPAddress(ipaddress.IPv6Address("fe80::1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]
    cn = server.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "dtls.example.test"
    assert sans(load_cert(files.client_cert)) == [x509.DNSName("sensor-7")]


def test_default_hosts(pki: CertificateFiles) -> None:
    assert DEFAULT_HOSTS == ("localhost", "127.0.0.1", "::1")
    assert sans(load_cert(pki.server_cert)) == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]


def test_ip_server_cn(tmp_path: Path) -> None:
    files = generate_pki(tmp_path, hosts=["::1"])
    server = load_cert(files.server_cert)
    assert server.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value == "::1"
    verifier = (
        PolicyBuilder()
        .store(Store([load_cert(files.ca_cert)]))
        .build_server_verifier(IPAddress(ipaddress.IPv6Address("::1")))
    )
    verifier.verify(server, [])


def test_client_name_that_is_not_a_dns_name_gets_no_san(tmp_path: Path) -> None:
    files = generate_pki(tmp_path, client_name="Alice's laptop")
    client = load_cert(files.client_cert)
    cn = client.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    assert cn == "Alice's laptop"
    with pytest.raises(x509.ExtensionNotFound):
        client.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ca = load_cert(files.ca_cert)
    client.verify_directly_issued_by(ca)
    # cryptography's Web PKI profile insists on a SAN even for clients (OpenSSL,
    # which does the DTLS handshake, does not); with only that relaxed, the
    # certificate passes, so everything else about it (EKU, key usage) is right.
    builder = PolicyBuilder().store(Store([ca]))
    with pytest.raises(VerificationError, match=r"2\.5\.29\.17"):
        builder.build_client_verifier().verify(client, [])
    ee_policy = ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, Criticality.AGNOSTIC, None
    )
    relaxed = builder.extension_policies(
        ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee_policy
    )
    verified = relaxed.build_client_verifier().verify(client, [])
    assert verified.subjects is None
    assert verified.chain == [client, ca]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost,127.0.0.1,::1", ["localhost", "127.0.0.1", "::1"]),
        ("  localhost  ", ["localhost"]),
        ("example.com.", ["example.com"]),
        ("[::1]", ["::1"]),
        ("0:0::1", ["::1"]),
        ("*.example.com", ["*.example.com"]),
        ("xn--bcher-kva.example", ["xn--bcher-kva.example"]),
        ("a-b.c1", ["a-b.c1"]),
        ("localhost,LOCALHOST,::1,0::1", ["localhost", "::1"]),
    ],
)
def test_parse_hosts(text: str, expected: list[str]) -> None:
    assert parse_hosts(text) == expected


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("", "entry 1 of 1"),
        ("   ", "entry 1 of 1"),
        ("localhost,", "entry 2 of 2"),
        (",localhost", "entry 1 of 2"),
        ("localhost,, ::1", "entry 2 of 3"),
    ],
)
def test_parse_hosts_empty_entry(text: str, position: str) -> None:
    with pytest.raises(ValueError, match="empty entry") as info:
        parse_hosts(text)
    assert position in str(info.value)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        "bad_name",
        "-leading.example",
        "trailing-.example",
        "a..b",
        ".example.com",
        "exa mple.com",
        "x" * 64 + ".example",
        ".".join(["a" * 60] * 5),
        "300.1.1.1",
        "127.1",
        "bücher.example",
        "*.com",
        "foo.*.example.com",
        "f*o.example.com",
        "fe80::1%eth0",
        "[localhost]",
        "[127.0.0.1]",
        "http://localhost",
        "localhost:4433",
    ],
)
def test_parse_hosts_rejects_bad_names(bad: str) -> None:
    with pytest.raises(ValueError, match="invalid host") as info:
        parse_hosts(f"localhost, {bad} ,::1")
    assert repr(bad) in str(info.value)


def test_hosts_must_not_be_a_string(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="parse_hosts"):
        generate_pki(tmp_path, hosts="localhost")
    assert list(tmp_path.iterdir()) == []


def test_bad_hosts_write_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="bad_name"):
        generate_pki(tmp_path / "certs", hosts=["localhost", "bad_name"])
    with pytest.raises(ValueError, match="at least one host"):
        generate_pki(tmp_path / "certs", hosts=[])
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# Validity


def test_validity(pki: CertificateFiles) -> None:
    now = datetime.datetime.now(datetime.UTC)
    ca = load_cert(pki.ca_cert)
    for path in (pki.server_cert, pki.client_cert):
        leaf = load_cert(path)
        assert leaf.not_valid_before_utc < now
        assert leaf.not_valid_before_utc > now - datetime.timedelta(hours=1)
        lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert datetime.timedelta(days=824) < lifetime <= datetime.timedelta(days=825)
        assert ca.not_valid_before_utc <= leaf.not_valid_before_utc
        assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    assert ca.not_valid_before_utc < now
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == datetime.timedelta(days=3650)


def test_custom_days() -> None:
    ca, ca_key = generate_ca(days=30)
    cert, _ = issue_certificate(
        ca, ca_key, "localhost", hosts=["localhost"], usage="server", days=7
    )
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(days=7)
    # A leaf never outlives its CA.
    cert, _ = issue_certificate(ca, ca_key, "c", usage="client", days=825)
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


@pytest.mark.parametrize("days", [0, -1])
def test_bad_days(days: int) -> None:
    with pytest.raises(ValueError, match="days"):
        generate_ca(days=days)
    ca, ca_key = generate_ca()
    with pytest.raises(ValueError, match="days"):
        issue_certificate(ca, ca_key, "c", usage="client", days=days)


def test_issue_certificate_checks_arguments() -> None:
    ca, ca_key = generate_ca()
    _, other_key = generate_ca()
    with pytest.raises(ValueError, match="not the private key"):
        issue_certificate(ca, other_key, "localhost", hosts=["localhost"], usage="server")
    with pytest.raises(ValueError, match="at least one host"):
        issue_certificate(ca, ca_key, "localhost", usage="server")
    with pytest.raises(ValueError, match="usage"):
        issue_certificate(ca, ca_key, "x", usage="both")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="common name"):
        issue_certificate(ca, ca_key, "x" * 65, usage="client")


# --------------------------------------------------------------------------
# Development certificates


def test_development_certificates_created_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "dev-certs"
    monkeypatch.setenv("TRIO_DTLS_SERVER_CERT_DIR", str(directory))

    files, created = development_certificates(create=False)
    assert files == CertificateFiles.in_directory(directory)
    assert not created
    assert not directory.exists()

    files, created = development_certificates()
    assert created
    assert files.directory == directory
    contents = {path: path.read_bytes() for path in files.all_files()}
    assert sans(load_cert(files.server_cert)) == [
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")),
        x509.IPAddress(ipaddress.IPv6Address("::1")),
    ]

    again, created = development_certificates()
    assert not created
    assert again == files
    assert {path: path.read_bytes() for path in again.all_files()} == contents


def test_development_certificates_regenerated_when_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_DTLS_SERVER_CERT_DIR", str(tmp_path))
    files, created = development_certificates()
    assert created
    old_ca = files.ca_cert.read_bytes()
    files.client_key.unlink()
    files, created = development_certificates()
    assert created
    assert files.client_key.exists()
    assert files.ca_cert.read_bytes() != old_ca  # a whole new, consistent set
    load_cert(files.client_cert).verify_directly_issued_by(load_cert(files.ca_cert))


def test_development_certificates_regenerated_when_expired(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIO_DTLS_SERVER_CERT_DIR", str(tmp_path))
    files, _ = development_certificates()
    ca, ca_key = load_cert(files.ca_cert), load_key(files.ca_key)
    key = load_key(files.server_key)
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=10)
    expired = (
        x509.CertificateBuilder()
        .subject_name(ca.subject)
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    write_certificate(files.server_cert, expired)
    files, created = development_certificates()
    assert created
    assert load_cert(files.server_cert).not_valid_after_utc > datetime.datetime.now(datetime.UTC)


def test_development_directory_location(tmp_path: Path) -> None:
    # A source checkout of this project: <checkout>/certs.
    checkout = tmp_path / "checkout"
    (checkout / "trio_dtls_server").mkdir(parents=True)
    (checkout / "certs").mkdir()
    (checkout / "pyproject.toml").write_text('[project]\nname = "trio-dtls-server"\n')
    package = checkout / "trio_dtls_server"
    assert _certs._development_directory(package, {}) == checkout / "certs"
    # The environment variable wins.
    env = {"TRIO_DTLS_SERVER_CERT_DIR": str(tmp_path / "override")}
    assert _certs._development_directory(package, env) == tmp_path / "override"

    # Installed (site-packages has no pyproject.toml): the per-user data directory.
    installed = tmp_path / "site-packages" / "trio_dtls_server"
    installed.mkdir(parents=True)
    data = tmp_path / "data"
    expected = data / "trio-dtls-server" / "certs"
    assert _certs._development_directory(installed, {"XDG_DATA_HOME": str(data)}) == expected
    home_default = Path.home() / ".local" / "share" / "trio-dtls-server" / "certs"
    assert _certs._development_directory(installed, {}) == home_default
    # Relative XDG_DATA_HOME is ignored, as the XDG spec says.
    assert _certs._development_directory(installed, {"XDG_DATA_HOME": "rel"}) == home_default

    # Some other project's checkout, or one without certs/, is not ours.
    (checkout / "pyproject.toml").write_text('[project]\nname = "something-else"\n')
    assert _certs._development_directory(package, {}) == home_default
    (checkout / "pyproject.toml").write_text('[project]\nname = "trio-dtls-server"\n')
    (checkout / "certs").rmdir()
    assert _certs._development_directory(package, {}) == home_default


def test_development_directory_in_this_checkout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_DTLS_SERVER_CERT_DIR", raising=False)
    package = Path(_certs.__file__).resolve().parent
    if not (package.parent / "pyproject.toml").is_file():
        pytest.skip("not running from a source checkout")
    files, created = development_certificates(create=False)  # writes nothing
    assert not created
    assert files.directory == package.parent / "certs"
