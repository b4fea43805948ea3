"""Provisioning: keys born at their owners, the certificate chain and SAN, add-site/-admin, renewal, the CA passphrase."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from client import keygen
from common.keys import generate_admin_key, generate_site_key, load_csr
from server import admin_keys, daemon, provision
from tests.deployment.kits import add_admin, add_site, make_federation, site_keygen

ADDRESS = "fl.example-hospital.org:9092"
SITES = ["north", "south", "east"]


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.fixture
def fed(tmp_path) -> dict:
    return make_federation(tmp_path / "fed", ADDRESS, SITES)


@pytest.fixture
def kits(tmp_path, capsys) -> tuple[Path, str]:
    """``onfh provision`` run from the command line on the site.pub files the hospitals sent."""
    inbox = tmp_path / "inbox"
    argv = [str(tmp_path / "kits"), "--server-address", ADDRESS]
    for site in SITES:
        generate_site_key(inbox / site, site)
        argv += ["--site", f"{site}={inbox / site / 'site.pub'}"]
    generate_admin_key(inbox / "alice", "alice")
    assert provision.main([*argv, "--admin", f"alice={inbox / 'alice' / 'admin.csr'}"]) == 0
    return tmp_path / "kits", capsys.readouterr().out


def test_chain_verifies_and_san_holds_the_address(fed):
    out = fed["provision"]
    ca = _cert(out / "ca" / "ca.pem")
    server = _cert(out / "server" / "server.pem")
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example-hospital.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # every kit carries the same CA
    for kit in [fed["server"], fed["admin"], *fed["sites"].values(), *(out / "sites").iterdir()]:
        assert (kit / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
    # the server key is the one the certificate was issued for
    key = serialization.load_pem_private_key((out / "server" / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()
    assert json.loads((out / "server" / "server.json").read_text()) == {
        "server-address": ADDRESS,
        "port": 9092,
        "admin-port": 9093,
    }


def test_site_keys_take_flowers_format_and_private_files_are_0600(fed):
    out = fed["provision"]
    for site in SITES:
        kit = fed["sites"][site]
        assert sorted(p.name for p in kit.iterdir()) == [
            "approved-releases.json",
            "ca.pem",
            "site.json",
            "site.key",
            "site.pub",
        ]
        private = serialization.load_ssh_private_key((kit / "site.key").read_bytes(), None)
        public = serialization.load_ssh_public_key((kit / "site.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            public, ec.EllipticCurvePublicKey
        )
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (kit / "site.pub").read_text().endswith(f" onfh-site-{site}\n")
        assert (out / "server" / "site-keys" / f"{site}.pub").read_bytes() == (kit / "site.pub").read_bytes()
        assert stat.S_IMODE((kit / "site.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(kit.stat().st_mode) == 0o700
        assert json.loads((kit / "site.json").read_text()) == {"site-name": site, "server-address": ADDRESS}
        # what goes back to the hospital holds no key of its own
        assert sorted(p.name for p in (out / "sites" / site).iterdir()) == ["ca.pem", "site.json", "site.pub"]
    for private in (out / "server" / "server.key", out / "ca" / "ca.key", fed["admin"] / "admin.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600


def test_no_site_private_key_outside_its_own_folder(fed, tmp_path):
    root = tmp_path / "fed"
    add_site(root, "west")
    add_admin(root, "bob")
    allowed = {Path("provision/ca/ca.key"), Path("provision/server/server.key")}
    allowed |= {Path("hospitals") / site / "site.key" for site in [*SITES, "west"]}
    allowed |= {Path("admins") / name / "admin.key" for name in ("admin", "bob")}
    holders = {
        path.relative_to(root)
        for path in root.rglob("*")
        if path.is_file() and b"PRIVATE KEY" in path.read_bytes()
    }
    assert holders == allowed
    assert not [p for p in holders if p.parts[:2] in (("provision", "sites"), ("provision", "admin"))]
    # nor the body of a site's or an admin's private key, under any other name
    bodies = [
        line
        for key in allowed
        if key.parts[0] != "provision"
        for line in (root / key).read_bytes().splitlines()[1:3]
    ]
    for path in (root / "provision").rglob("*"):
        if path.is_file():
            assert not [body for body in bodies if body in path.read_bytes()], path


def test_expiry_is_stated_and_printed(kits):
    out, printed = kits
    server = _cert(out / "server" / "server.pem")
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert abs(lifetime.days - provision.SERVER_DAYS) <= 1
    assert f"server certificate expires  {server.not_valid_after_utc:%Y-%m-%d}" in printed
    assert "CA certificate expires" in printed and "NOT encrypted" in printed
    record = json.loads((out / "provision.json").read_text())
    assert record["server-certificate-expires"].startswith(f"{server.not_valid_after_utc:%Y-%m-%d}")
    assert record["sites"] == SITES and record["admins"] == ["alice"]


def test_add_site_issues_only_that_sites_kit(kits, tmp_path, capsys):
    out, _ = kits
    public = site_keygen(tmp_path / "late", "west") / "site.pub"
    before = _tree_digest(out)
    assert provision.main([str(out), "--add-site", f"west={public}"]) == 0
    after = _tree_digest(out)
    changed = {k for k in before if before[k] != after.get(k)}
    added = set(after) - set(before)
    assert changed == {"provision.json"}
    assert added == {
        "sites/west/ca.pem",
        "sites/west/site.pub",
        "sites/west/site.json",
        "server/site-keys/west.pub",
    }
    assert (out / "server" / "site-keys" / "west.pub").read_bytes() == public.read_bytes()
    assert json.loads((out / "provision.json").read_text())["sites"] == [*SITES, "west"]
    assert "expires" in capsys.readouterr().out
    # issuing the same site twice is refused, naming the folder
    assert provision.main([str(out), "--add-site", f"west={public}"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_add_site_refuses_what_is_not_its_public_key(fed, tmp_path):
    out = fed["provision"]
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("ssh-rsa not-base64 someone\n")
    with pytest.raises(ValueError, match=f"{garbage} is not an OpenSSH public key.*onfh site keygen"):
        provision.add_site(out, "west", garbage)
    other_curve = tmp_path / "ed25519.pub"
    other_curve.write_bytes(
        ed25519.Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match=f"{other_curve} is not an EC P-384 key"):
        provision.add_site(out, "west", other_curve)
    with pytest.raises(ValueError, match="holds a PRIVATE key.*never leaves"):
        provision.add_site(out, "west", fed["sites"]["north"] / "site.key")
    with pytest.raises(ValueError, match="made for site 'north', not 'west'"):
        provision.add_site(out, "west", fed["sites"]["north"] / "site.pub")
    bare = tmp_path / "bare.pub"
    bare.write_bytes(b" ".join((fed["sites"]["north"] / "site.pub").read_bytes().split()[:2]))
    with pytest.raises(ValueError, match="same key as site 'north'"):
        provision.add_site(out, "west", bare)
    with pytest.raises(FileNotFoundError, match="missing.pub not found"):
        provision.add_site(out, "west", tmp_path / "missing.pub")
    assert not (out / "sites" / "west").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--server-address", "no-port"], "is not HOST:PORT"),
        (["--server-address", "h:9092", "--site", "Bad Name=x.pub"], "is not usable"),
        (["--server-address", "h:9092", "--site", "a=x.pub", "--site", "a=y.pub"], "repeat"),
        (["--server-address", "h:9092", "--site", "a"], "is not NAME=PATH"),
        (["--server-address", "h:9092", "--sites", "a,b"], "onfh site keygen"),
        (["--server-address", "h:9092", "--admin-port", "9092"], "admin port 9092 is not usable"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys, argv, expected):
    assert _exit_code([*argv, str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _exit_code(argv: list[str]) -> int:
    """``onfh provision ARGV``'s exit status, whether it returns or argparse exits."""
    try:
        return provision.main(argv)
    except SystemExit as exc:
        return int(exc.code)


def test_provisioning_twice_into_one_folder_is_refused(kits, capsys):
    out, _ = kits
    assert provision.main(["--server-address", "h:1", str(out)]) == 2
    assert "--add-site" in capsys.readouterr().err


def test_add_site_says_how_the_running_server_admits_it(kits, tmp_path, capsys):
    out, _ = kits
    public = site_keygen(tmp_path / "late", "west") / "site.pub"
    assert provision.main([str(out), "--add-site", f"west={public}"]) == 0
    printed = capsys.readouterr().out
    assert "onfh server register --kit" in printed and "no restart" in printed
    assert str(out / "sites" / "west") in printed and "next round" in printed and "beside site.key" in printed


def test_register_without_a_running_server_says_to_start_it(fed, capsys):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["register", "--kit", str(fed["server"]), "--host", "127.0.0.1", "--port", str(port)]
    assert daemon.main([*argv, "--work", str(fed["provision"] / "work")]) == 2
    err = capsys.readouterr().err
    assert f"start 'onfh server --kit {fed['server']}'" in err  # what to do, for the kit provisioned


def test_admin_certificate_is_for_client_authentication_only(fed):
    out, kit = fed["provision"], fed["admin"]
    cert = _cert(kit / "admin.pem")
    cert.verify_directly_issued_by(_cert(out / "ca" / "ca.pem"))
    key = serialization.load_pem_private_key((kit / "admin.key").read_bytes(), None)
    assert cert.public_key() == key.public_key()  # the key the administrator made, never seen by the CA
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "admin"
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "onfh-fl admin"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime.days - provision.SERVER_DAYS) <= 1
    assert sorted(p.name for p in kit.iterdir()) == [
        "admin.csr",
        "admin.json",
        "admin.key",
        "admin.pem",
        "ca.pem",
    ]
    assert json.loads((kit / "admin.json").read_text()) == {
        "server-address": ADDRESS,
        "admin-address": "fl.example-hospital.org:9093",
        "admin-name": "admin",
    }


def test_admin_port_is_written_to_server_and_admin_kits(tmp_path):
    made = make_federation(tmp_path / "fed", "[::1]:9092", ["north"], admin_port=7000)
    assert json.loads((made["server"] / "server.json").read_text())["admin-port"] == 7000
    assert json.loads((made["admin"] / "admin.json").read_text())["admin-address"] == "[::1]:7000"


def test_add_admin_refuses_a_request_that_is_not_theirs(fed, tmp_path):
    out = fed["provision"]
    with pytest.raises(ValueError, match="made for 'admin', not 'carol'"):
        provision.add_admin(out, "carol", fed["admin"] / "admin.csr")
    generate_admin_key(tmp_path / "carol", "carol")
    csr = tmp_path / "carol" / "admin.csr"
    der = bytearray(load_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # one bit of the signature
    broken = tmp_path / "broken.csr"
    broken.write_text(
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(ValueError, match=f"{broken} has a broken signature"):
        provision.add_admin(out, "carol", broken)
    with pytest.raises(ValueError, match=f"{fed['sites']['north'] / 'site.pub'} is not a PEM certificate"):
        provision.add_admin(out, "carol", fed["sites"]["north"] / "site.pub")
    assert not (out / "admin" / "carol").exists()
    provision.add_admin(out, "carol", csr)
    assert json.loads((out / "provision.json").read_text())["admins"] == ["admin", "carol"]


def test_encrypted_ca_key_needs_its_passphrase(tmp_path, capsys, monkeypatch):
    made = make_federation(tmp_path / "fed", ADDRESS, ["north"], ca_passphrase=b"correct horse")
    out = made["provision"]
    assert (out / "ca" / "ca.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(
        ValueError, match="ca.key is encrypted: give its passphrase with --ca-passphrase-file"
    ):
        provision.renew_server(out)
    with pytest.raises(ValueError, match="the CA passphrase does not open .*ca.key"):
        provision.renew_server(out, ca_passphrase=b"wrong")
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("wrong\n")
    generate_admin_key(tmp_path / "bob", "bob")
    request = f"bob={tmp_path / 'bob' / 'admin.csr'}"
    assert provision.main([str(out), "--add-admin", request, "--ca-passphrase-file", str(wrong)]) == 2
    assert "does not open" in capsys.readouterr().err
    monkeypatch.setenv("ONFH_CA_PASSPHRASE", "correct horse")
    assert provision.main([str(out), "--add-admin", request]) == 0
    printed = capsys.readouterr()
    assert "added admin bob" in printed.out and "(encrypted)" in printed.out, printed.err
    right = tmp_path / "right.txt"
    right.write_text("correct horse\n")
    monkeypatch.delenv("ONFH_CA_PASSPHRASE")
    assert provision.main([str(out), "--renew-server", "--ca-passphrase-file", str(right)]) == 0


def test_renewed_server_certificate_keeps_the_ca_and_every_kit(fed, tmp_path):
    out = fed["provision"]
    before = _tree_digest(tmp_path / "fed")
    old_key = (out / "server" / "server.key").read_bytes()
    done = provision.renew_server(out, days=30)
    server = _cert(out / "server" / "server.pem")
    for kit in [*fed["sites"].values(), fed["admin"]]:  # what the hospitals and the admin trust
        server.verify_directly_issued_by(_cert(kit / "ca.pem"))
    assert (out / "server" / "server.key").read_bytes() != old_key
    key = serialization.load_pem_private_key((out / "server" / "server.key").read_bytes(), None)
    assert key.public_key() == server.public_key()
    assert stat.S_IMODE((out / "server" / "server.key").stat().st_mode) == 0o600
    assert done.server_expires == server.not_valid_after_utc
    assert abs((server.not_valid_after_utc - server.not_valid_before_utc).days - 30) <= 1
    after = _tree_digest(tmp_path / "fed")
    changed = {k for k in before if before[k] != after.get(k)}
    assert changed == {
        "provision/provision.json",
        "provision/server/server.pem",
        "provision/server/server.key",
    }
    with pytest.raises(ValueError, match="the CA expires on"):
        provision.renew_server(out, days=provision.CA_DAYS + 1)


def test_keygen_commands_keep_the_key_and_name_what_to_send(tmp_path, capsys):
    site = tmp_path / "north-kit"
    assert keygen.main(["--kit", str(site), "--name", "north"]) == 0
    printed = capsys.readouterr().out
    assert f"send {site / 'site.pub'} (never site.key) to the federation's provisioner" in printed
    assert (
        stat.S_IMODE((site / "site.key").stat().st_mode) == 0o600
        and stat.S_IMODE(site.stat().st_mode) == 0o700
    )
    key = (site / "site.key").read_bytes()
    assert keygen.main(["--kit", str(site), "--name", "north"]) == 2
    assert f"{site / 'site.key'} already exists" in capsys.readouterr().err
    assert (site / "site.key").read_bytes() == key  # never overwritten
    assert keygen.main(["--kit", str(tmp_path / "x"), "--name", "Bad Name"]) == 2

    admin = tmp_path / "alice-kit"
    assert admin_keys.main(["--kit", str(admin), "--name", "alice"]) == 0
    assert f"send {admin / 'admin.csr'} (never admin.key)" in capsys.readouterr().out
    assert stat.S_IMODE((admin / "admin.key").stat().st_mode) == 0o600
    assert load_csr(admin / "admin.csr", "alice").subject.rfc4514_string() == "CN=alice"
    assert admin_keys.main(["--kit", str(admin), "--name", "alice"]) == 2
    assert f"{admin / 'admin.key'} already exists" in capsys.readouterr().err
