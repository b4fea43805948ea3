"""``onfh provision``: the CA, the SuperLink's TLS certificate, and kits for the public keys the parties sent.

Keys are born where they are used; the provisioner never holds a hospital's or an administrator's
private key. The flow for a hospital:

1. the hospital runs ``onfh site keygen --kit DIR --name NAME``: ``DIR/site.key`` stays there;
2. it sends ``DIR/site.pub`` (never site.key) to the provisioner, who runs
   ``onfh provision OUT --server-address HOST:PORT --site NAME=PATH/site.pub``;
3. the provisioner sends ``OUT/sites/NAME/`` back (ca.pem, site.json: nothing secret); the
   hospital copies ca.pem and site.json into DIR beside site.key, and DIR is its site kit.

An administrator does the same with ``onfh run keygen --kit DIR --name NAME`` (admin.key stays,
admin.csr travels, ``--admin NAME=PATH/admin.csr``) and copies ca.pem, admin.pem and admin.json
from ``OUT/admin/NAME/`` into DIR beside admin.key.

Layout written under OUT (private keys 0600, kit folders 0700)::

    OUT/provision.json     address, ports, sites, admins, expiry dates (no secret)
    OUT/ca/                ca.pem + ca.key (encrypted with --ca-passphrase-file); keep ca.key offline
    OUT/server/            server kit: ca.pem, server.pem, server.key, server.json, site-keys/NAME.pub
    OUT/sites/NAME/        back to hospital NAME: ca.pem, site.json, site.pub (the key it sent)
    OUT/admin/NAME/        back to administrator NAME: ca.pem, admin.pem (client certificate), admin.json

``--add-site NAME=PUB`` and ``--add-admin NAME=CSR`` add one party to an existing OUT and change
nothing else (a running server accepts a new site after ``onfh server register --kit KIT``).
``--renew-server`` issues a new server key and certificate under the same CA; site and admin
kits stay valid, since they trust the CA. The CA passphrase comes from ``--ca-passphrase-file``
or the environment variable ``ONFH_CA_PASSPHRASE``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from common.cli import description
from common.deployment import split_address
from common.files import write_atomic
from common.keys import check_name, load_csr, load_site_public_key, site_public_line
from server.certificates import (
    CA_DAYS,
    PASSPHRASE_ENV,
    SERVER_DAYS,
    check_lifetime,
    create_ca,
    issue_admin_certificate,
    issue_server_certificate,
    key_pem,
    load_ca,
    pem,
    read_passphrase,
    save_ca,
)


@dataclass(frozen=True)
class Provisioned:
    """What one provisioning step wrote: kit folders and the certificates' expiry (UTC)."""

    out: Path
    kits: dict[str, Path]
    ca_expires: dt.datetime
    server_expires: dt.datetime


def _write_public(path: Path, data: bytes | str) -> None:
    write_atomic(path, data.encode() if isinstance(data, str) else data, mode=0o644)


def _kit_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _record(out: Path, flag: str) -> dict:
    if not (path := out / "provision.json").is_file():
        raise FileNotFoundError(f"{path} not found: {flag} needs the folder 'onfh provision' wrote")
    record = json.loads(path.read_text())
    record.setdefault("admin-port", split_address(record["server-address"])[1] + 1)  # older folders
    return record


def _save_record(out: Path, record: dict) -> None:
    _write_public(out / "provision.json", json.dumps(record, indent=2))


def _done(out: Path, record: dict, kits: dict[str, Path]) -> Provisioned:
    expiry = [dt.datetime.fromisoformat(record[k]) for k in ("ca-expires", "server-certificate-expires")]
    return Provisioned(out, kits, *expiry)


def _site_line(out: Path, site: str, public_key: Path, taken: dict[bytes, str]) -> bytes:
    """``site``'s checked public key as a site.pub line; refused when another site already has that key."""
    line = site_public_line(load_site_public_key(public_key, check_name(site)), site)
    if (kit := out / "sites" / site).exists():
        raise FileExistsError(
            f"{kit} already exists: site {site!r} was provisioned before; pick another name, or delete "
            f"that folder and server/site-keys/{site}.pub (and unregister its key) to re-issue it"
        )
    key = line.split()[1]
    if key in taken:
        raise ValueError(
            f"{public_key} holds the same key as site {taken[key]!r}: each hospital makes its own with "
            "'onfh site keygen'; ask this one for its own site.pub"
        )
    taken[key] = site
    return line


def _registered_keys(out: Path) -> dict[bytes, str]:
    """Key (base64 field of the OpenSSH line) -> site, for every key in the server kit's site-keys/."""
    return {p.read_bytes().split()[1]: p.stem for p in (out / "server" / "site-keys").glob("*.pub")}


def _write_site_kit(out: Path, site: str, line: bytes, address: str, ca_pem: bytes) -> Path:
    kit = _kit_dir(out / "sites" / site)
    _write_public(kit / "ca.pem", ca_pem)
    _write_public(kit / "site.pub", line)
    _write_public(kit / "site.json", json.dumps({"site-name": site, "server-address": address}, indent=2))
    _write_public(out / "server" / "site-keys" / f"{site}.pub", line)
    return kit


def _admin_request(out: Path, name: str, csr_path: Path) -> x509.CertificateSigningRequest:
    csr = load_csr(csr_path, check_name(name, "admin"))
    if (kit := out / "admin" / name).exists():
        raise FileExistsError(
            f"{kit} already exists: admin {name!r} was provisioned before; pick another name, or delete "
            "that folder to re-issue it"
        )
    return csr


def _write_admin_kit(
    out: Path, name: str, cert: x509.Certificate, ca_cert: x509.Certificate, record: dict
) -> Path:
    host, _ = split_address(record["server-address"])
    settings = {
        "server-address": record["server-address"],
        "admin-address": _address(host, int(record["admin-port"])),
        "admin-name": name,
    }
    kit = _kit_dir(out / "admin" / name)
    _write_public(kit / "ca.pem", pem(ca_cert))
    _write_public(kit / "admin.pem", pem(cert))
    _write_public(kit / "admin.json", json.dumps(settings, indent=2))
    return kit


def _write_server_kit(out: Path, ca_pem: bytes, key: ec.EllipticCurvePrivateKey, cert, record: dict) -> Path:
    """``out/server``: the CA, the server's key and certificate (``cert``), server.json, site-keys/."""
    server = _kit_dir(out / "server")
    _kit_dir(server / "site-keys")
    _write_public(server / "ca.pem", ca_pem)
    _write_public(server / "server.pem", pem(cert))
    write_atomic(server / "server.key", key_pem(key), mode=0o600)
    _, port = split_address(record["server-address"])
    settings = {"server-address": record["server-address"], "port": port, "admin-port": record["admin-port"]}
    _write_public(server / "server.json", json.dumps(settings, indent=2))
    return server


def provision(
    out: Path,
    server_address: str,
    sites: dict[str, Path],
    admins: dict[str, Path] | None = None,
    server_days: int = SERVER_DAYS,
    ca_days: int = CA_DAYS,
    now: dt.datetime | None = None,
    ca_passphrase: bytes | None = None,
    admin_port: int | None = None,
) -> Provisioned:
    """Create the CA and the server, site and admin kits under ``out`` (which must not hold a federation yet).

    Args:
        out: the folder to write (created).
        server_address: ``HOST:PORT`` the sites dial.
        sites: site name -> the ``site.pub`` that hospital sent (``onfh site keygen``).
        admins: admin name -> the ``admin.csr`` that administrator sent (``onfh run keygen``).
        server_days, ca_days: certificate lifetimes in days (admin certificates: ``server_days``).
        now: the validity start (UTC); a past date issues an already expired certificate (tests).
        ca_passphrase: encrypts ``ca.key`` when given.
        admin_port: where the SuperLink's admin (Control API) listens; default the port after the sites'.
    """
    host, port = split_address(server_address)
    admin_port = port + 1 if admin_port is None else admin_port
    if not 0 < admin_port < 65536 or admin_port == port:
        raise ValueError(f"admin port {admin_port} is not usable: give one in 1-65535 other than {port}")
    if (out / "provision.json").exists():
        raise FileExistsError(
            f"{out} already holds a federation (provision.json): use --add-site NAME=PUB to add a site, "
            "or choose an empty folder"
        )
    taken: dict[bytes, str] = {}  # everything is checked before anything is written
    lines = {site: _site_line(out, site, path, taken) for site, path in sites.items()}
    requests = {name: _admin_request(out, name, path) for name, path in (admins or {}).items()}
    ca_key, ca_cert = create_ca(ca_days, now)
    check_lifetime(server_days, ca_cert, now)
    server_key, server_cert = issue_server_certificate(ca_key, ca_cert, host, server_days, now)
    record = {
        "server-address": server_address,
        "admin-port": admin_port,
        "sites": list(lines),
        "admins": list(requests),
        "ca-expires": ca_cert.not_valid_after_utc.isoformat(),
        "server-certificate-expires": server_cert.not_valid_after_utc.isoformat(),
    }

    save_ca(_kit_dir(out / "ca"), ca_key, ca_cert, ca_passphrase)
    kits = {"server": _write_server_kit(out, pem(ca_cert), server_key, server_cert, record)}
    for site, line in lines.items():
        kits[f"site {site}"] = _write_site_kit(out, site, line, server_address, pem(ca_cert))
    for name, csr in requests.items():
        cert = issue_admin_certificate(ca_key, ca_cert, name, csr, server_days, now)
        kits[f"admin {name}"] = _write_admin_kit(out, name, cert, ca_cert, record)
    _save_record(out, record)
    return _done(out, record, kits)


def add_site(out: Path, site: str, public_key: Path, ca_passphrase: bytes | None = None) -> Provisioned:
    """Add ``site`` (its ``site.pub`` at ``public_key``) to the federation in ``out``.

    Writes ``sites/NAME/`` and the server kit's ``site-keys/NAME.pub`` and adds the name to
    provision.json; nothing else changes. A site kit holds no certificate, so the CA key is not
    opened (``ca_passphrase`` is accepted so that every ``--add-*`` takes the same options).
    """
    del ca_passphrase
    record = _record(out, "--add-site")
    line = _site_line(out, site, public_key, _registered_keys(out))
    kit = _write_site_kit(out, site, line, record["server-address"], (out / "ca" / "ca.pem").read_bytes())
    record["sites"] = [*record["sites"], site]
    _save_record(out, record)
    return _done(out, record, {f"site {site}": kit})


def add_admin(
    out: Path, name: str, csr: Path, ca_passphrase: bytes | None = None, days: int = SERVER_DAYS
) -> Provisioned:
    """Certify administrator ``name``'s key (the request ``csr``) for ``days``: writes ``admin/NAME/`` only."""
    record = _record(out, "--add-admin")
    request = _admin_request(out, name, csr)
    ca_key, ca_cert = load_ca(out / "ca", ca_passphrase)
    check_lifetime(days, ca_cert, None)
    cert = issue_admin_certificate(ca_key, ca_cert, name, request, days)
    kit = _write_admin_kit(out, name, cert, ca_cert, record)
    record["admins"] = [*record.get("admins", []), name]
    _save_record(out, record)
    return _done(out, record, {f"admin {name}": kit})


def renew_server(
    out: Path, days: int = SERVER_DAYS, ca_passphrase: bytes | None = None, now: dt.datetime | None = None
) -> Provisioned:
    """A new server key and certificate under the same CA, written into ``out/server``; nothing else changes."""
    record = _record(out, "--renew-server")
    ca_key, ca_cert = load_ca(out / "ca", ca_passphrase)
    check_lifetime(days, ca_cert, now)
    host, _ = split_address(record["server-address"])
    key, cert = issue_server_certificate(ca_key, ca_cert, host, days, now)
    server = _write_server_kit(out, pem(ca_cert), key, cert, record)
    record["server-certificate-expires"] = cert.not_valid_after_utc.isoformat()
    _save_record(out, record)
    return _done(out, record, {"server": server})


def add_site_next_steps(out: Path, site: str) -> str:
    """What to do after ``--add-site``: hand the kit back, register the key with the running server."""
    return (
        f"added site {site}. Next:\n"
        f"  1. send {out / 'sites' / site}/ back to hospital {site} (no secret inside); it copies ca.pem and "
        "site.json into its kit folder, beside site.key\n"
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
    print(f"server certificate expires  {done.server_expires:%Y-%m-%d %H:%M} UTC (renew with --renew-server)")
    print(
        "site keys do not expire; revoke a site for good with 'onfh server revoke SITE --kit KIT' on the central host"
    )
    if [p for p in done.kits if p.startswith(("site ", "admin "))]:
        print("send each sites/NAME/ and admin/NAME/ back to its owner: they copy its files beside their key")
    ca_key = done.out / "ca" / "ca.key"
    if ca_key.is_file():
        kind = (
            "encrypted"
            if b"ENCRYPTED" in ca_key.read_bytes()[:64]
            else "NOT encrypted; see --ca-passphrase-file"
        )
        print(f"keep {ca_key} offline ({kind}): it signs server renewals and admin certificates")


def _named_path(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=PATH (e.g. north=inbox/north/site.pub)")
    return name, Path(path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onfh provision",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("out", type=Path, help="folder the CA and kits are written into")
    parser.add_argument("--server-address", help="HOST:PORT the hospitals dial")
    repeat = {"type": _named_path, "action": "append", "default": []}
    parser.add_argument("--site", metavar="NAME=PUB", help="a hospital and the site.pub it sent", **repeat)
    parser.add_argument("--admin", metavar="NAME=CSR", help="an admin and the admin.csr they sent", **repeat)
    parser.add_argument("--admin-port", type=int, help="the SuperLink's admin port (default: PORT+1)")
    parser.add_argument("--sites", help=argparse.SUPPRESS)  # the old flow, refused with the new one
    verbs = parser.add_mutually_exclusive_group()
    verbs.add_argument("--add-site", type=_named_path, metavar="NAME=PUB", help="add one hospital to OUT")
    verbs.add_argument("--add-admin", type=_named_path, metavar="NAME=CSR", help="add one admin to OUT")
    verbs.add_argument("--renew-server", action="store_true", help="new server key and certificate, same CA")
    days = "lifetime in days of the {} certificate (default {})"
    parser.add_argument(
        "--days", type=int, default=SERVER_DAYS, help=days.format("server/admin", SERVER_DAYS)
    )
    parser.add_argument("--ca-days", type=int, default=CA_DAYS, help=days.format("CA", CA_DAYS))
    phrase = f"a file whose first line is the CA key's passphrase (or ${PASSPHRASE_ENV})"
    parser.add_argument("--ca-passphrase-file", type=Path, metavar="FILE", help=phrase)
    return parser


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Provisioned:
    passphrase = read_passphrase(args.ca_passphrase_file)
    if args.add_site:
        done = add_site(args.out, *args.add_site, ca_passphrase=passphrase)
        print(add_site_next_steps(args.out, args.add_site[0]))
        return done
    if args.add_admin:
        done = add_admin(args.out, *args.add_admin, ca_passphrase=passphrase, days=args.days)
        print(f"added admin {args.add_admin[0]}: send {args.out / 'admin' / args.add_admin[0]}/ back to them")
        return done
    if args.renew_server:
        done = renew_server(args.out, args.days, passphrase)
        steps = "into the central host's server kit and restart 'onfh server'; site and admin kits stay valid"
        print(
            f"renewed the server certificate: copy server.pem and server.key from {done.kits['server']} {steps}"
        )
        return done
    if args.sites is not None:
        parser.error(
            "--sites is gone: each hospital makes its own key ('onfh site keygen --kit DIR --name NAME') "
            "and sends DIR/site.pub; pass --site NAME=PATH/site.pub once per hospital"
        )
    if not args.server_address:
        parser.error("--server-address HOST:PORT is required (or --add-site, --add-admin, --renew-server)")
    if args.days < 1 or args.ca_days <= args.days:
        parser.error("--days must be >= 1 and --ca-days longer than --days")
    sites, admins = dict(args.site), dict(args.admin)
    if len(sites) != len(args.site) or len(admins) != len(args.admin):
        parser.error("a name repeats in --site/--admin: give each hospital and administrator its own")
    done = provision(
        args.out, args.server_address, sites, admins, args.days, args.ca_days,
        ca_passphrase=passphrase, admin_port=args.admin_port,
    )  # fmt: skip
    print(f"provisioned a federation for {args.server_address} in {args.out}")
    return done


def main(argv: list[str] | None = None) -> int:
    """``onfh provision OUT --server-address HOST:PORT --site NAME=PUB ...``, or one of ``--add-site``,
    ``--add-admin``, ``--renew-server`` on an existing OUT."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        done = _run(args, parser)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        print(f"onfh provision: {exc}", file=sys.stderr)
        return 2
    _print_summary(done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
