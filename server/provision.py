"""``onfh provision``: the CA, the SuperLink's TLS certificate, one key pair per site, and one kit per party.

Layout written under OUT (every private key 0600, every kit folder 0700)::

    OUT/provision.json        address, sites, expiry dates (no secret)
    OUT/ca/                   ca.pem + ca.key: the federation's CA; keep ca.key offline
    OUT/server/               server kit: ca.pem, server.pem, server.key, server.json, site-keys/NAME.pub
    OUT/admin/                admin kit: ca.pem, admin.json (what ``flwr`` needs to reach the SuperLink)
    OUT/sites/NAME/           site kit: ca.pem, site.key, site.pub, site.json

Sites authenticate with an EC P-384 key pair in OpenSSH format (what ``flwr supernode register``
and ``flower-supernode --auth-supernode-private-key`` take); the server authenticates with a
certificate for its address signed by the CA. ``--add-site NAME`` issues only NAME's kit and
puts its public key into the server kit; nothing else is re-issued. A server that is already
running accepts the new key after ``onfh server register --kit KIT``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.cli import description
from common.deployment import split_address
from common.files import write_atomic

CA_DAYS = 3650  # ten years: the CA outlives server certificates, which are renewed
SERVER_DAYS = 397  # the longest lifetime public CAs still issue; renew yearly
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")  # the SuperLink's own ServerApp dials it locally
SITE_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")


@dataclass(frozen=True)
class Provisioned:
    """What one provisioning step wrote: kit folders and the certificates' expiry (UTC)."""

    out: Path
    kits: dict[str, Path]
    ca_expires: dt.datetime
    server_expires: dt.datetime


def check_site_name(name: str) -> str:
    """A site name is a folder name and a node label: lowercase letters, digits, '-' and '_'."""
    if not name or not set(name) <= SITE_NAME_CHARS or name in ("server", "admin", "ca"):
        raise ValueError(
            f"site name {name!r} is not usable: use lowercase letters, digits, '-' and '_' "
            "(e.g. --sites hospital-a,hospital-b)"
        )
    return name


def _write_private(path: Path, data: bytes) -> None:
    """Write ``path`` with mode 0600 from the start (never readable by others, not even briefly)."""
    write_atomic(path, data, mode=0o600)


def _write_public(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    os.chmod(path, 0o644)


def _kit_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "onfh-fl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
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
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _san_entry(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


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
    now = now or dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP384R1())
    names = [host] + [n for n in LOOPBACK_NAMES if n != host]
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san_entry(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def site_key_pair(site: str) -> tuple[bytes, bytes]:
    """A new P-384 key pair for SuperNode authentication: (OpenSSH private key, OpenSSH public key line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + f" onfh-site-{site}\n".encode()


def _write_site_kit(out: Path, site: str, ca_pem: bytes, address: str) -> Path:
    kit = out / "sites" / site
    if kit.exists():
        raise FileExistsError(
            f"{kit} already exists: site {site!r} was provisioned before; pick another name, or "
            "delete that folder (and unregister its key) to re-issue it"
        )
    _kit_dir(kit)
    private, public = site_key_pair(site)
    _write_public(kit / "ca.pem", ca_pem)
    _write_private(kit / "site.key", private)
    _write_public(kit / "site.pub", public)
    _write_public(kit / "site.json", json.dumps({"site-name": site, "server-address": address}, indent=2))
    _write_public(out / "server" / "site-keys" / f"{site}.pub", public)
    return kit


def _expiry(cert: x509.Certificate) -> dt.datetime:
    return cert.not_valid_after_utc


def provision(
    out: Path,
    server_address: str,
    sites: list[str],
    server_days: int = SERVER_DAYS,
    ca_days: int = CA_DAYS,
    now: dt.datetime | None = None,
) -> Provisioned:
    """Create the CA, the server, admin and site kits under ``out`` (which must not hold a federation yet).

    Args:
        out: the folder to write (created).
        server_address: ``HOST:PORT`` the sites and the admin will dial.
        sites: site names (lowercase letters, digits, '-', '_').
        server_days, ca_days: certificate lifetimes in days.
        now: the validity start (UTC); a past date issues an already expired certificate (tests).
    """
    host, port = split_address(server_address)
    sites = [check_site_name(s) for s in sites]
    if len(set(sites)) != len(sites):
        raise ValueError(f"site names repeat in {sites}: give each hospital its own name")
    if (out / "provision.json").exists():
        raise FileExistsError(
            f"{out} already holds a federation (provision.json): use --add-site NAME to add a site, "
            "or choose an empty folder"
        )
    ca_key, ca_cert = create_ca(ca_days, now)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, host, server_days, now)
    ca_pem = _pem(ca_cert)

    _kit_dir(out / "ca")
    _write_public(out / "ca" / "ca.pem", ca_pem)
    _write_private(out / "ca" / "ca.key", _key_pem(ca_key))

    server = _kit_dir(out / "server")
    _kit_dir(server / "site-keys")
    _write_public(server / "ca.pem", ca_pem)
    _write_public(server / "server.pem", _pem(server_cert))
    _write_private(server / "server.key", _key_pem(server_key))
    _write_public(
        server / "server.json", json.dumps({"server-address": server_address, "port": port}, indent=2)
    )

    admin = _kit_dir(out / "admin")
    _write_public(admin / "ca.pem", ca_pem)
    _write_public(admin / "admin.json", json.dumps({"server-address": server_address}, indent=2))

    kits = {"server": server, "admin": admin}
    for site in sites:
        kits[f"site {site}"] = _write_site_kit(out, site, ca_pem, server_address)
    record = {
        "server-address": server_address,
        "sites": sites,
        "ca-expires": _expiry(ca_cert).isoformat(),
        "server-certificate-expires": _expiry(server_cert).isoformat(),
    }
    _write_public(out / "provision.json", json.dumps(record, indent=2))
    return Provisioned(out, kits, _expiry(ca_cert), _expiry(server_cert))


def add_site(out: Path, site: str) -> Provisioned:
    """Issue only ``site``'s kit (a new key pair) in an existing federation ``out``; nothing else changes
    except the new public key in the server kit's ``site-keys/`` and the site list in provision.json."""
    record_path = out / "provision.json"
    if not record_path.exists():
        raise FileNotFoundError(
            f"{record_path} not found: --add-site needs the folder an earlier 'onfh provision' wrote"
        )
    record = json.loads(record_path.read_text())
    site = check_site_name(site)
    ca_pem = (out / "ca" / "ca.pem").read_bytes()
    kit = _write_site_kit(out, site, ca_pem, record["server-address"])
    record["sites"] = [*record["sites"], site]
    _write_public(record_path, json.dumps(record, indent=2))
    return Provisioned(
        out,
        {f"site {site}": kit},
        dt.datetime.fromisoformat(record["ca-expires"]),
        dt.datetime.fromisoformat(record["server-certificate-expires"]),
    )


def add_site_next_steps(out: Path, site: str) -> str:
    """What to do after ``--add-site``: hand over the kit, put the key on the central host, register it."""
    return (
        f"added site {site}. Next:\n"
        f"  1. give {out / 'sites' / site}/ to hospital {site} only (it holds site.key)\n"
        f"  2. on the central host, put {site}.pub into the server kit's site-keys/ (already there when "
        f"the server runs from {out / 'server'})\n"
        "  3. there, run 'onfh server register --kit KIT' (with the --host/--port/--work the server runs "
        "with): the running server accepts the site; no restart\n"
        f"  4. hospital {site} starts 'onfh site'; a run in progress asks it from its next round on"
    )


def _print_summary(done: Provisioned) -> None:
    for party, kit in done.kits.items():
        print(f"  {party:<18} {kit}")
    print(f"CA certificate expires      {done.ca_expires:%Y-%m-%d %H:%M} UTC")
    print(f"server certificate expires  {done.server_expires:%Y-%m-%d %H:%M} UTC (renew before then)")
    print("site keys do not expire; revoke one with 'flwr supernode unregister' from the admin kit")
    print(f"keep {done.out / 'ca' / 'ca.key'} offline: it is needed only to renew the server certificate")


def main(argv: list[str] | None = None) -> int:
    """``onfh provision --server-address HOST:PORT --sites a,b,c OUT`` or ``onfh provision --add-site NAME OUT``."""
    parser = argparse.ArgumentParser(
        prog="onfh provision",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder to write the CA and kits into")
    parser.add_argument("--server-address", help="HOST:PORT the hospitals and the admin dial")
    parser.add_argument("--sites", default="", help="comma-separated site names, e.g. hospital-a,hospital-b")
    parser.add_argument("--add-site", metavar="NAME", help="issue one more site's kit in an existing OUT")
    parser.add_argument(
        "--days", type=int, default=SERVER_DAYS, help=f"server certificate lifetime (default {SERVER_DAYS})"
    )
    parser.add_argument(
        "--ca-days", type=int, default=CA_DAYS, help=f"CA certificate lifetime (default {CA_DAYS})"
    )
    args = parser.parse_args(argv)
    try:
        if args.add_site:
            done = add_site(args.out, args.add_site)
            print(add_site_next_steps(args.out, args.add_site))
        else:
            if not args.server_address:
                parser.error("--server-address HOST:PORT is required (or --add-site NAME)")
            sites = [s.strip() for s in args.sites.split(",") if s.strip()]
            if args.days < 1 or args.ca_days <= args.days:
                parser.error("--days must be >= 1 and --ca-days longer than --days")
            done = provision(args.out, args.server_address, sites, args.days, args.ca_days)
            print(f"provisioned a federation for {args.server_address} in {args.out}")
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"onfh provision: {exc}", file=sys.stderr)
        return 2
    _print_summary(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
