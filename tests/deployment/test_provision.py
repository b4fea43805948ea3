"""Provisioning: the certificate chain, the SAN, key formats and modes, add-site, expiry printed."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server import daemon, provision


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def kits(tmp_path, capsys) -> tuple[Path, str]:
    out = tmp_path / "kits"
    code = provision.main(
        ["--server-address", "fl.example-hospital.org:9092", "--sites", "north,south,east", str(out)]
    )
    assert code == 0
    return out, capsys.readouterr().out


def test_chain_verifies_and_san_holds_the_address(kits):
    out, _ = kits
    ca = x509.load_pem_x509_certificate((out / "ca" / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((out / "server" / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)  # raises when the signature or issuer does not match
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "fl.example-hospital.org" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    # every kit carries the same CA
    for kit in ("server", "admin", "sites/north", "sites/south", "sites/east"):
        assert (out / kit / "ca.pem").read_bytes() == (out / "ca" / "ca.pem").read_bytes()
    # the server key is the one the certificate was issued for
    key = serialization.load_pem_private_key((out / "server" / "server.key").read_bytes(), None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_site_keys_take_flowers_format_and_private_files_are_0600(kits):
    out, _ = kits
    for site in ("north", "south", "east"):
        kit = out / "sites" / site
        private = serialization.load_ssh_private_key((kit / "site.key").read_bytes(), None)
        public = serialization.load_ssh_public_key((kit / "site.pub").read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(
            public, ec.EllipticCurvePublicKey
        )
        assert private.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (out / "server" / "site-keys" / f"{site}.pub").read_bytes() == (kit / "site.pub").read_bytes()
        assert stat.S_IMODE((kit / "site.key").stat().st_mode) == 0o600
        assert stat.S_IMODE(kit.stat().st_mode) == 0o700
        assert json.loads((kit / "site.json").read_text()) == {
            "site-name": site,
            "server-address": "fl.example-hospital.org:9092",
        }
    for private in (out / "server" / "server.key", out / "ca" / "ca.key"):
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    # no private key material outside the files meant to hold it
    holders = {out / "server" / "server.key", out / "ca" / "ca.key"} | set(out.glob("sites/*/site.key"))
    for path in out.rglob("*"):
        if path.is_file() and path not in holders:
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_expiry_is_stated_and_printed(kits):
    out, printed = kits
    server = x509.load_pem_x509_certificate((out / "server" / "server.pem").read_bytes())
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert abs(lifetime.days - provision.SERVER_DAYS) <= 1
    assert f"server certificate expires  {server.not_valid_after_utc:%Y-%m-%d}" in printed
    assert "CA certificate expires" in printed
    record = json.loads((out / "provision.json").read_text())
    assert record["server-certificate-expires"].startswith(f"{server.not_valid_after_utc:%Y-%m-%d}")


def test_add_site_issues_only_that_sites_kit(kits, capsys):
    out, _ = kits
    before = _tree_digest(out)
    assert provision.main(["--add-site", "west", str(out)]) == 0
    after = _tree_digest(out)
    changed = {k for k in before if before[k] != after.get(k)}
    added = set(after) - set(before)
    assert changed == {"provision.json"}
    assert added == {
        "sites/west/ca.pem",
        "sites/west/site.key",
        "sites/west/site.pub",
        "sites/west/site.json",
        "server/site-keys/west.pub",
    }
    assert json.loads((out / "provision.json").read_text())["sites"] == ["north", "south", "east", "west"]
    assert "expires" in capsys.readouterr().out
    # issuing the same site twice is refused, naming the folder
    assert provision.main(["--add-site", "west", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--server-address", "no-port", "--sites", "a"], "is not HOST:PORT"),
        (["--server-address", "h:9092", "--sites", "Bad Name"], "is not usable"),
        (["--server-address", "h:9092", "--sites", "a,a"], "repeat"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(tmp_path, capsys, argv, expected):
    assert provision.main([*argv, str(tmp_path / "out")]) == 2
    assert expected in capsys.readouterr().err


def test_provisioning_twice_into_one_folder_is_refused(kits, capsys):
    out, _ = kits
    assert provision.main(["--server-address", "h:1", "--sites", "a", str(out)]) == 2
    assert "--add-site" in capsys.readouterr().err


def test_add_site_says_how_the_running_server_admits_it(kits, capsys):
    out, _ = kits
    assert provision.main(["--add-site", "west", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "onfh server register --kit" in printed and "no restart" in printed
    assert str(out / "sites" / "west") in printed and "next round" in printed


def test_register_without_a_running_server_says_to_start_it(kits, capsys):
    out, _ = kits
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["register", "--kit", str(out / "server"), "--host", "127.0.0.1", "--port", str(port)]
    assert daemon.main([*argv, "--work", str(out / "work")]) == 2
    err = capsys.readouterr().err
    assert f"no SuperLink answers on 127.0.0.1:{port}" in err and "onfh server --kit" in err
