"""Certificates for MTop: a private CA and an ECDSA P-256 server certificate.

What the original README's openssl recipe did, done in Python with
``cryptography`` (already a dependency of pyOpenSSL).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPaths:
    ca_crt: str
    ca_key: str
    server_crt: str
    server_key: str


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: str, data: bytes, private: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if private:
        os.chmod(path, 0o600)


def _subject_alt_names(hosts: list[str], ips: list[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    for ip in ips:
        names.append(x509.IPAddress(ipaddress.ip_address(ip)))
    return names


def make_ca(common_name: str = "MTop private CA", days: int = 3650) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def make_server_cert(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    hosts: list[str],
    ips: list[str] = (),
    days: int = 825,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    if not hosts and not ips:
        raise ValueError("a server certificate needs at least one host name or IP address")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (list(hosts) + list(ips))[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(_subject_alt_names(list(hosts), list(ips))), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def init_certs(
    directory: str, hosts: list[str], ips: list[str] = (), force: bool = False, key_group: str | None = None
) -> CertPaths:
    """Write ``ca.crt``, ``ca.key``, ``server.crt`` and ``server.key`` in
    ``directory``.  An existing CA there is reused, so re-running for another
    host keeps clients' trust; existing server files are replaced only with
    ``force``.  Keys are readable by their owner only; with ``key_group``
    the server key is also readable by that group (mode 0640), for a server
    running as another user (the Debian package's ``mtop``)."""
    gid = None
    if key_group is not None:
        import grp

        try:
            gid = grp.getgrnam(key_group).gr_gid
        except KeyError:
            raise ValueError(f"--group {key_group}: no such group") from None
    os.makedirs(directory, exist_ok=True)
    paths = CertPaths(*(os.path.join(directory, n) for n in ("ca.crt", "ca.key", "server.crt", "server.key")))
    if not force and (os.path.exists(paths.server_crt) or os.path.exists(paths.server_key)):
        raise FileExistsError(f"{paths.server_crt} already exists; use --force to replace it")
    if os.path.exists(paths.ca_crt) and os.path.exists(paths.ca_key):
        with open(paths.ca_crt, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(paths.ca_key, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    else:
        ca_cert, ca_key = make_ca()
        _write(paths.ca_key, _key_pem(ca_key), private=True)
        _write(paths.ca_crt, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    cert, key = make_server_cert(ca_cert, ca_key, hosts, ips)
    _write(paths.server_key, _key_pem(key), private=True)
    if gid is not None:
        os.chown(paths.server_key, -1, gid)
        os.chmod(paths.server_key, 0o640)
    # The chain file holds the leaf then the CA, as server.crt expects.
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(paths.server_crt, chain, private=False)
    return paths
