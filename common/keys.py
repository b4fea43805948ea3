"""Key pairs born where they are used: a hospital's site key and an administrator's key, made by their owner.

A private key never leaves the folder it is generated in. What travels to the federation's
provisioner is public: a site's ``site.pub`` (an OpenSSH line, what ``flower-supernode
--auth-supernode-private-key`` pairs with) or an administrator's ``admin.csr`` (a certificate
signing request the CA answers with ``admin.pem``). Both keys are EC P-384. Plain Python and
``cryptography``: the site, the server and the provisioner share these checks.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.files import write_atomic

SITE_KEY, SITE_PUB = "site.key", "site.pub"
ADMIN_KEY, ADMIN_CSR = "admin.key", "admin.csr"
SITE_COMMENT = "onfh-site-"  # the comment of a site.pub line: onfh-site-NAME
NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_")
RESERVED_SITE_NAMES = ("server", "admin", "ca")


def private_key_problem(path: Path) -> str | None:
    """Why the private key file ``path`` is unsafe (readable by other users), with the fix; None if it is not."""
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        return f"{path} can be read by other users (mode {mode:o}): run 'chmod 600 {path}'"
    return None


def check_name(name: str, role: str = "site") -> str:
    """A site or admin name is a folder name and a label: lowercase letters, digits, '-' and '_'."""
    reserved = RESERVED_SITE_NAMES if role == "site" else ()
    if not name or not set(name) <= NAME_CHARS or name in reserved:
        raise ValueError(
            f"{role} name {name!r} is not usable: use lowercase letters, digits, '-' and '_' "
            f"(e.g. --name {'hospital-a' if role == 'site' else 'alice'})"
        )
    return name


def _private_folder(folder: Path) -> Path:
    """Create ``folder`` with mode 0700 (an existing folder keeps its mode: the key file itself is 0600)."""
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700)
        os.chmod(folder, 0o700)  # mkdir's mode is filtered by the umask
    return folder


def _refuse_overwrite(path: Path, public: str) -> None:
    if path.exists():
        raise FileExistsError(
            f"{path} already exists: this folder already holds a key, and replacing it would lock this "
            f"party out of the federation. Keep it (its {public} is beside it), or move it away first "
            "to make a new one (then the provisioner needs the new public file)"
        )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def generate_site_key(folder: Path, site: str) -> Path:
    """Write ``folder/site.key`` (OpenSSH private key, 0600) and ``folder/site.pub``; return site.key's path.

    ``folder`` is created with mode 0700. An existing ``site.key`` is never overwritten.
    """
    site = check_name(site)
    key_path, pub_path = folder / SITE_KEY, folder / SITE_PUB
    _refuse_overwrite(key_path, SITE_PUB)
    _private_folder(folder)
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    write_atomic(key_path, private, mode=0o600)
    write_atomic(pub_path, site_public_line(key.public_key(), site), mode=0o644)
    return key_path


def generate_admin_key(folder: Path, name: str) -> Path:
    """Write ``folder/admin.key`` (PKCS8 PEM, 0600) and ``folder/admin.csr`` (CN = ``name``); return admin.key's path.

    ``folder`` is created with mode 0700. An existing ``admin.key`` is never overwritten.
    """
    name = check_name(name, "admin")
    key_path, csr_path = folder / ADMIN_KEY, folder / ADMIN_CSR
    _refuse_overwrite(key_path, ADMIN_CSR)
    _private_folder(folder)
    key = _new_key()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA384())
    )
    write_atomic(key_path, private, mode=0o600)
    write_atomic(csr_path, csr.public_bytes(serialization.Encoding.PEM), mode=0o644)
    return key_path


def site_public_line(key: ec.EllipticCurvePublicKey, site: str) -> bytes:
    """The ``site.pub`` line for ``key``: ``ecdsa-sha2-nistp384 AAAA... onfh-site-NAME``."""
    public = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return public + f" {SITE_COMMENT}{site}\n".encode()


def _read(path: Path, what: str, command: str) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass the {what} that '{command}' wrote")
    data = path.read_bytes()
    # A PEM or OpenSSH private key; matched by pattern because the app bundle (these sources) is
    # checked to hold no private-key marker at all.
    if re.match(rb"\s*-----BEGIN [A-Z ]*PRIVATE", data):
        raise ValueError(
            f"{path} holds a PRIVATE key: pass the {what} beside it instead; a private key never leaves "
            f"its folder, so make a new one with '{command}' if this one did"
        )
    return data


def load_site_public_key(path: Path, site: str | None = None) -> ec.EllipticCurvePublicKey:
    """The EC P-384 public key in the OpenSSH file ``path`` (a site.pub), or a ValueError naming the file.

    With ``site``, a comment naming another site (``onfh-site-OTHER``) is refused: files mixed up.
    """
    line = (_read(path, SITE_PUB, "onfh site keygen").strip().splitlines() or [b""])[0]
    fix = "ask the hospital for the site.pub that 'onfh site keygen' wrote (one line, 'ecdsa-sha2-nistp384 ...')"
    try:
        key = serialization.load_ssh_public_key(line)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"{path} is not an OpenSSH public key: {fix}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError(f"{path} is not an EC P-384 key (Flower's node authentication needs one): {fix}")
    comment = line.split()[2].decode(errors="replace") if len(line.split()) > 2 else ""
    if site is not None and comment.startswith(SITE_COMMENT) and comment != f"{SITE_COMMENT}{site}":
        raise ValueError(
            f"{path} was made for site {comment.removeprefix(SITE_COMMENT)!r}, not {site!r}: "
            "check which hospital sent it (files mixed up?)"
        )
    return key


def load_csr(path: Path, name: str | None = None) -> x509.CertificateSigningRequest:
    """The EC P-384 certificate signing request in ``path`` (an admin.csr), its signature checked.

    With ``name``, a request made for another common name is refused: files mixed up.
    """
    data = _read(path, ADMIN_CSR, "onfh run keygen")
    fix = "ask the administrator for the admin.csr that 'onfh run keygen' wrote"
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise ValueError(f"{path} is not a PEM certificate signing request: {fix}") from None
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError(f"{path} does not request a certificate for an EC P-384 key: {fix}")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise ValueError(f"{path} has a broken signature (damaged or edited?): {fix}")
    names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if name is not None and names != [name]:
        raise ValueError(f"{path} was made for {names[0] if names else 'no name'!r}, not {name!r}: {fix}")
    return csr
