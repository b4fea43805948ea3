"""The federation's X.509 side: the CA, the SuperLink's TLS certificate, admin client certificates.

Every key is EC P-384 and every signature SHA-384. The CA signs two kinds of certificate: the
SuperLink's (server authentication, its address and the loopback names as subject alternative
names) and each administrator's (client authentication only, for a public key that arrived as a
certificate signing request: the CA never sees an administrator's private key).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.files import write_atomic

CA_DAYS = 3650  # ten years: the CA outlives server certificates, which are renewed
SERVER_DAYS = 397  # the longest lifetime public CAs still issue; renew yearly
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the SuperLink's own ServerApp dials it locally
ORGANIZATION = "onfh-fl federation"
ADMIN_UNIT = "onfh-fl admin"
PASSPHRASE_ENV = "ONFH_CA_PASSPHRASE"
PASSPHRASE_FIX = (
    "give its passphrase with --ca-passphrase-file FILE or the environment variable ONFH_CA_PASSPHRASE"
)


def _name(common_name: str, unit: str | None = None) -> x509.Name:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION)]
    if unit:
        attributes.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit))
    return x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        encipher_only=False,
        decipher_only=False,
    )


def create_ca(
    days: int = CA_DAYS, now: dt.datetime | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed P-384 CA valid ``days`` from ``now`` (UTC): (private key, certificate)."""
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("onfh-fl federation CA"))
        .issuer_name(_name("onfh-fl federation CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(signs_certificates=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    days: int,
    now: dt.datetime | None,
) -> x509.CertificateBuilder:
    """A certificate for ``public_key`` issued by the CA: not a CA itself, valid ``days`` from ``now``."""
    now = now or dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )


def issue_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    host: str,
    days: int = SERVER_DAYS,
    now: dt.datetime | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS key and certificate, signed by the CA, valid ``days`` from ``now``.

    The subject alternative names hold ``host`` (what sites and the admin dial) and the
    loopback names (the SuperLink's own ServerApp process dials it on this host).
    """
    key = ec.generate_private_key(ec.SECP384R1())
    names = [host] + [n for n in LOOPBACK_NAMES if n != host]
    cert = (
        _leaf(ca_key, ca_cert, _name(host), key.public_key(), days, now)
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def issue_admin_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    csr: x509.CertificateSigningRequest,
    days: int = SERVER_DAYS,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """An administrator's client certificate for the public key in ``csr`` (checked by the caller).

    Subject ``CN=name, OU=onfh-fl admin``, whatever else the request asks for; the only extended
    key usage is client authentication, so the certificate cannot serve TLS or sign certificates.
    """
    public_key = csr.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        raise ValueError(f"the certificate request for {name!r} is not for an EC key")
    return (
        _leaf(ca_key, ca_cert, _name(name, ADMIN_UNIT), public_key, days, now)
        .add_extension(_key_usage(signs_certificates=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )


def pem(cert: x509.Certificate) -> bytes:
    """``cert`` as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    """``key`` as PKCS8 PEM, encrypted with the best available cipher when ``passphrase`` is given."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def load_ca(
    folder: Path, passphrase: bytes | None = None
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The CA's key and certificate from ``folder`` (``ca.key``, ``ca.pem``); messages say what to fix."""
    key_path, cert_path = folder / "ca.key", folder / "ca.pem"
    for path in (key_path, cert_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: renewing and admin certificates need the CA that 'onfh provision' "
                f"wrote (bring {key_path} back from its offline storage into {folder})"
            )
    data = key_path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, passphrase or None)
    except TypeError:
        if passphrase:
            raise ValueError(f"{key_path} is not encrypted, yet a CA passphrase was given: drop it") from None
        raise ValueError(f"{key_path} is encrypted: {PASSPHRASE_FIX}") from None
    except ValueError:
        if passphrase:
            raise ValueError(f"the CA passphrase does not open {key_path}: check it and try again") from None
        raise ValueError(
            f"{key_path} is not a PEM private key: restore the CA's key from its backup"
        ) from None
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise ValueError(f"{key_path} is not the key of {cert_path}: restore the pair from the same backup")
    return key, cert


def save_ca(
    folder: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, passphrase: bytes | None
) -> None:
    """Write ``folder/ca.pem`` and ``folder/ca.key`` (0600; encrypted when ``passphrase`` is given)."""
    write_atomic(folder / "ca.pem", pem(cert), mode=0o644)
    write_atomic(folder / "ca.key", key_pem(key, passphrase), mode=0o600)


def read_passphrase(file: Path | None) -> bytes | None:
    """The CA passphrase: the first line of ``file``, else ``$ONFH_CA_PASSPHRASE``, else None."""
    if file is not None:
        if not file.is_file():
            raise FileNotFoundError(
                f"passphrase file {file} not found: pass the file holding the CA passphrase"
            )
        lines = file.read_bytes().splitlines()
        if not lines or not lines[0]:
            raise ValueError(f"passphrase file {file} is empty: write the passphrase on its first line")
        return lines[0]
    return os.environ.get(PASSPHRASE_ENV, "").encode() or None


def check_lifetime(days: int, ca_cert: x509.Certificate, now: dt.datetime | None = None) -> None:
    """Refuse a certificate lifetime under one day or past the CA's own expiry."""
    end = (now or dt.datetime.now(dt.UTC)) + dt.timedelta(days=days)
    if days < 1 or end > ca_cert.not_valid_after_utc:
        raise ValueError(
            f"--days {days} is not usable: the CA expires on {ca_cert.not_valid_after_utc:%Y-%m-%d}, so give "
            "a lifetime of at least 1 day that ends before then (or provision a new federation)"
        )
