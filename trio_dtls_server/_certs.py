"""Development and test certificates.

DTLS, like TLS, needs a certificate before the first handshake can happen.
This module makes a tiny, self-contained PKI so that you can get started
without going through a real certificate authority:

* a throwaway certificate authority (``ca.pem`` / ``ca.key``),
* a server certificate for a list of host names and IP addresses
  (``server.pem`` / ``server.key``),
* a client certificate for mutual authentication (``client.pem`` /
  ``client.key``).

It backs the ``trio-dtls-server gen-certs`` command, the development
certificate that ``trio-dtls-server serve`` uses when it is given no
``--cert``/``--key``, and the test suite.

This is **not** a production PKI. The CA's private key sits unencrypted
next to the certificates it signed, nothing is revoked, and nothing is
rotated. Anyone who can read ``ca.key`` can mint certificates that every
peer trusting ``ca.pem`` will accept, so never add ``ca.pem`` to a system
or browser trust store, and use certificates from a real CA (or your
organisation's PKI) for anything that faces other people.

All keys are ECDSA P-256 and all signatures SHA-256, which every DTLS 1.2
implementation supports. The certificates follow the Web PKI profile
(``cryptography.x509.verification`` accepts them), and leaf certificates
last at most 825 days, the limit that Apple platforms enforce for TLS
server certificates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import ipaddress
import os
import re
import sys
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "DEFAULT_HOSTS",
    "CertificateFiles",
    "development_certificates",
    "generate_ca",
    "generate_pki",
    "issue_certificate",
    "parse_hosts",
    "write_certificate",
    "write_private_key",
]

#: The names the development certificate is valid for.
DEFAULT_HOSTS: Final = ("localhost", "127.0.0.1", "::1")

#: Environment variable naming the directory for the development certificate.
CERT_DIR_ENV: Final = "TRIO_DTLS_SERVER_CERT_DIR"

_DEFAULT_CA_NAME: Final = "trio-dtls-server development CA"
_ORGANIZATION: Final = "trio-dtls-server development"
_PROJECT_NAME: Final = "trio-dtls-server"

# Certificates start a little in the past so that a peer whose clock is
# slightly behind ours does not reject a certificate made a moment ago.
_CLOCK_SKEW: Final = datetime.timedelta(minutes=5)

# X.520 upper bound for commonName.
_MAX_COMMON_NAME: Final = 64

_CERT_MODE: Final = 0o644
_KEY_MODE: Final = 0o600
_DIR_MODE: Final = 0o700

# O_NOFOLLOW: never follow a symlink planted where a file should go, which
# could make us write (a private key!) outside the intended directory.
# O_BINARY: no newline translation on Windows.
_WRITE_FLAGS: Final = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_TRUNC
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)

_DNS_LABEL: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")


@dataclasses.dataclass(frozen=True)
class CertificateFiles:
    """Where :func:`generate_pki` put (or would put) the six PEM files."""

    directory: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def in_directory(cls, directory: Path | str) -> CertificateFiles:
        """The standard file names (``ca.pem``, ``server.key``, ...) in *directory*."""
        directory = Path(directory)
        return cls(
            directory=directory,
            ca_cert=directory / "ca.pem",
            ca_key=directory / "ca.key",
            server_cert=directory / "server.pem",
            server_key=directory / "server.key",
            client_cert=directory / "client.pem",
            client_key=directory / "client.key",
        )

    def all_files(self) -> tuple[Path, ...]:
        """The six file paths, CA first."""
        return (
            self.ca_cert,
            self.ca_key,
            self.server_cert,
            self.server_key,
            self.client_cert,
            self.client_key,
        )


# --------------------------------------------------------------------------
# Host names


def _host_problem(host: str) -> str | None:
    """Why *host* cannot go in a certificate, or None if it can."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
            return "scoped IPv6 addresses (with %zone) cannot be put in a certificate"
        return None
    if not host.isascii():
        return "non-ASCII names must be given in their IDNA form (xn--...)"
    name = host.removesuffix(".")
    if len(name) > 253:
        return "longer than 253 characters"
    labels = name.split(".")
    if labels[0] == "*" and len(labels) >= 3:
        labels = labels[1:]  # a wildcard is allowed as the whole leftmost label
    for label in labels:
        if not label:
            return "empty label (leading dot or '..')"
        if "*" in label:
            return "a wildcard must be the whole leftmost label of a name with 3+ labels"
        if len(label) > 63:
            return f"label {label!r} is longer than 63 characters"
        if not _DNS_LABEL.match(label):
            return (
                f"label {label!r} may only contain letters, digits and '-',"
                " and may not start or end with '-'"
            )
    if labels[-1].isdigit():
        return "not a valid IP address, and an all-numeric top-level label is not a host name"
    return None


def _normalize_host(host: str) -> str:
    """Check one host name or IP address and return its canonical form."""
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(
                f"invalid host {host!r}: brackets are only for IPv6 addresses"
            ) from None
        host = inner
    problem = _host_problem(host)
    if problem is not None:
        raise ValueError(f"invalid host {host!r}: {problem}")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.removesuffix(".")


def parse_hosts(text: str) -> list[str]:
    """Parse a comma-separated list of host names and IP addresses.

    ``"localhost, 127.0.0.1,::1"`` gives ``["localhost", "127.0.0.1", "::1"]``.
    Spaces around entries are ignored, IPv6 addresses may be bracketed
    (``[::1]``), IP addresses are put in canonical form, a trailing dot on a
    DNS name is dropped, and duplicates are removed (first one wins).

    Raises :class:`ValueError`, naming the offending entry, for an empty entry
    (``"a,,b"``, a trailing comma, or an empty string) or an entry that is
    neither an IP address nor a valid DNS name.
    """
    entries = text.split(",")
    hosts: list[str] = []
    seen: set[str] = set()
    for position, raw in enumerate(entries, start=1):
        entry = raw.strip()
        if not entry:
            raise ValueError(
                f"empty entry {position} of {len(entries)} in host list {text!r};"
                " expected comma-separated names such as 'localhost,127.0.0.1,::1'"
            )
        host = _normalize_host(entry)
        if host.lower() not in seen:
            seen.add(host.lower())
            hosts.append(host)
    return hosts


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


# --------------------------------------------------------------------------
# Certificates


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise ValueError(f"days must be a positive whole number, not {days!r}")


def _name(common_name: str) -> x509.Name:
    if not 1 <= len(common_name) <= _MAX_COMMON_NAME:
        raise ValueError(
            f"common name {common_name!r} must be 1 to {_MAX_COMMON_NAME} characters long"
        )
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def generate_ca(
    common_name: str = _DEFAULT_CA_NAME, *, days: int = 3650
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a new self-signed CA certificate and its P-256 private key.

    The CA may sign end-entity certificates only (``path_length=0``) and is
    valid from five minutes ago for *days* days.
    """
    _check_days(days)
    key = ec.generate_private_key(ec.SECP256R1())
    name = _name(common_name)
    not_before = _now() - _CLOCK_SKEW
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue_certificate(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    *,
    hosts: Sequence[str] = (),
    usage: Literal["server", "client"],
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Make a new P-256 key and a certificate for it signed by the CA.

    *hosts* become subjectAltName entries (iPAddress for IP literals,
    dNSName otherwise); a server certificate needs at least one. *usage*
    selects the extended key usage: TLS server or TLS client authentication.
    The certificate is valid from five minutes ago for *days* days, but never
    beyond the CA certificate's own validity.
    """
    if usage not in ("server", "client"):
        raise ValueError(f"usage must be 'server' or 'client', not {usage!r}")
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of names, not a str; see parse_hosts()")
    _check_days(days)
    if ca_cert.public_key() != ca_key.public_key():
        raise ValueError("ca_key is not the private key of ca_cert")
    names: list[str] = []
    for host in hosts:
        normalized = _normalize_host(host)
        if normalized.lower() not in (name.lower() for name in names):
            names.append(normalized)
    if usage == "server" and not names:
        raise ValueError("a server certificate needs at least one host name or IP address")

    key = ec.generate_private_key(ec.SECP256R1())
    not_before = max(_now() - _CLOCK_SKEW, ca_cert.not_valid_before_utc)
    not_after = min(not_before + datetime.timedelta(days=days), ca_cert.not_valid_after_utc)
    if not_after <= not_before:
        raise ValueError("the CA certificate has expired")

    try:
        ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    else:
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if usage == "server" else ExtendedKeyUsageOID.CLIENT_AUTH

    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            # ECDSA keys sign the handshake; they never encipher keys.
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(aki, critical=False)
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]),
            critical=False,
        )
    return builder.sign(ca_key, hashes.SHA256()), key


# --------------------------------------------------------------------------
# Files


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, _WRITE_FLAGS, mode)
    try:
        if sys.platform != "win32":
            # The mode given to os.open only applies to a new file, and is
            # reduced by the umask; set it exactly, before writing any data.
            os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def write_certificate(path: Path, cert: x509.Certificate) -> None:
    """Write *cert* to *path* as PEM, with mode 0644.

    Refuses (``OSError``) to write through a symlink.
    """
    _write_file(Path(path), cert.public_bytes(serialization.Encoding.PEM), _CERT_MODE)


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Write *key* to *path* as unencrypted PKCS#8 PEM, with mode 0600.

    A new file is created with mode 0600; an existing file is truncated and
    set to 0600 before the key is written, so the key is never readable by
    other users, not even briefly. Refuses (``OSError``) to write through a
    symlink.
    """
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_file(Path(path), data, _KEY_MODE)


def _ensure_directory(directory: Path) -> None:
    """Create *directory* (mode 0700) if it is missing; leave an existing one alone."""
    try:
        directory.mkdir(mode=_DIR_MODE, parents=True)
    except FileExistsError:
        if not directory.is_dir():
            raise NotADirectoryError(f"{directory} exists and is not a directory") from None
    else:
        if sys.platform != "win32":
            os.chmod(directory, _DIR_MODE)  # in case the umask took bits away


def _client_hosts(client_name: str) -> tuple[str, ...]:
    """The client's name as a SAN, if it is a plain DNS name."""
    try:
        ipaddress.ip_address(client_name)
    except ValueError:
        if "*" not in client_name and _host_problem(client_name) is None:
            return (client_name.removesuffix("."),)
    return ()


def generate_pki(
    directory: Path | str,
    *,
    hosts: Sequence[str] = DEFAULT_HOSTS,
    client_name: str = "client",
    ca_name: str = _DEFAULT_CA_NAME,
    days: int = 825,
) -> CertificateFiles:
    """Create a CA, a server and a client certificate, and write them to *directory*.

    Writes ``ca.pem``, ``ca.key``, ``server.pem``, ``server.key``,
    ``client.pem`` and ``client.key``, replacing any files of those names,
    and nothing else. *directory* is created with mode 0700 if it does not
    exist. The server certificate is for *hosts* (its common name is the
    first host); the client certificate's common name is *client_name*. Both
    are valid for *days* days, and the CA for ten years or *days*, whichever
    is longer.
    """
    if isinstance(hosts, str):
        raise TypeError("hosts must be a sequence of names, not a str; see parse_hosts()")
    names = [_normalize_host(host) for host in hosts]
    if not names:
        raise ValueError("the server certificate needs at least one host name or IP address")
    _check_days(days)
    first = names[0]
    server_name = first if len(first) <= _MAX_COMMON_NAME else "trio-dtls-server"

    ca_cert, ca_key = generate_ca(ca_name, days=max(days, 3650))
    server_cert, server_key = issue_certificate(
        ca_cert, ca_key, server_name, hosts=names, usage="server", days=days
    )
    client_cert, client_key = issue_certificate(
        ca_cert,
        ca_key,
        client_name,
        hosts=_client_hosts(client_name),
        usage="client",
        days=days,
    )

    files = CertificateFiles.in_directory(directory)
    _ensure_directory(files.directory)
    write_private_key(files.ca_key, ca_key)
    write_certificate(files.ca_cert, ca_cert)
    write_private_key(files.server_key, server_key)
    write_certificate(files.server_cert, server_cert)
    write_private_key(files.client_key, client_key)
    write_certificate(files.client_cert, client_cert)
    return files


# --------------------------------------------------------------------------
# The development certificate


def _source_checkout(package_dir: Path) -> Path | None:
    """The project checkout *package_dir* lives in, if it is one."""
    root = package_dir.parent
    try:
        with open(root / "pyproject.toml", "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    if not isinstance(project, dict) or project.get("name") != _PROJECT_NAME:
        return None
    if not (root / "certs").is_dir():
        return None
    return root


def _development_directory(
    package_dir: Path | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    env = os.environ if environ is None else environ
    override = env.get(CERT_DIR_ENV)
    if override:
        return Path(override).expanduser()
    checkout = _source_checkout(
        Path(__file__).resolve().parent if package_dir is None else package_dir
    )
    if checkout is not None:
        return checkout / "certs"
    data_home = env.get("XDG_DATA_HOME")
    # The XDG spec says to ignore relative paths here.
    base = Path(data_home) if data_home and os.path.isabs(data_home) else None
    if base is None:
        base = Path.home() / ".local" / "share"
    return base / _PROJECT_NAME / "certs"


def _reusable(files: CertificateFiles) -> bool:
    """Whether all six files exist and the certificates are still valid."""
    if not all(path.is_file() for path in files.all_files()):
        return False
    now = _now()
    for path in (files.ca_cert, files.server_cert):
        try:
            cert = x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return False
        if cert.not_valid_after_utc <= now:
            return False
    return True


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on *directory*, so concurrent processes don't
    generate certificates at the same time and end up with a mismatched set.
    Locks the directory itself, so no lock file is left behind."""
    if sys.platform == "win32":
        yield
        return
    import fcntl

    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # also releases the lock


def development_certificates(*, create: bool = True) -> tuple[CertificateFiles, bool]:
    """The server's default development certificates, generated on first use.

    Returns ``(files, created_now)``. The directory is, in order of
    preference:

    1. ``$TRIO_DTLS_SERVER_CERT_DIR``, if set;
    2. ``<checkout>/certs`` when running from a source checkout of this
       project (the directory above the package holds this project's
       ``pyproject.toml`` and a ``certs/`` directory);
    3. ``$XDG_DATA_HOME/trio-dtls-server/certs``, by default
       ``~/.local/share/trio-dtls-server/certs``.

    If all six files exist there (and the CA and server certificates have
    not expired) they are reused and ``created_now`` is False. Otherwise, if
    *create* is true, a fresh set is generated for :data:`DEFAULT_HOSTS` and
    ``created_now`` is True; if *create* is false, nothing is written and the
    returned paths may not exist.

    This blocks (file I/O, key generation, and a lock against concurrent
    generation by another process); from async code, run it in a thread.
    """
    files = CertificateFiles.in_directory(_development_directory())
    if _reusable(files) or not create:
        return files, False
    _ensure_directory(files.directory)
    with _locked(files.directory):
        if _reusable(files):  # another process made them while we waited
            return files, False
        generate_pki(files.directory, hosts=DEFAULT_HOSTS)
    return files, True
