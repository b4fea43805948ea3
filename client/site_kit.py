"""What ``onfh site`` checks before it joins: the kit, the data, the server's identity; and where it keeps its files.

A site's own files (preprocessed cache, log, the SuperNode's Flower home, refused bundles) live
in a per-user folder, ``$XDG_CACHE_HOME/onfh/SITE`` (else ``~/.cache/onfh/SITE``), mode 0700:
never beside the DICOM export, which may be read-only or shared.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from common.deployment import split_address
from common.files import user_cache_dir
from common.keys import private_key_problem
from common.sitedata.load import load_site
from common.sitedata.settings import PreprocessSettings


class SiteRefused(RuntimeError):
    """A problem retrying cannot fix; the message says what the hospital's IT team should do."""


class KeyUnknown(SiteRefused):
    """The server does not (yet) know this site's key: it may be registering it right now."""


class DataUnusable(SiteRefused):
    """The site's data folder gives nothing to train on."""


@dataclass(frozen=True)
class SiteKit:
    """A site kit folder as ``onfh provision`` writes it."""

    kit: Path
    site_name: str
    address: str

    @classmethod
    def load(cls, kit: Path) -> SiteKit:
        missing = [n for n in ("ca.pem", "site.key", "site.json") if not (kit / n).is_file()]
        if missing:
            raise SiteRefused(
                f"{kit} is not a site kit ({', '.join(missing)} missing): pass the folder where you ran "
                "'onfh site keygen', with the ca.pem and site.json the provisioner sent back copied into it"
            )
        if problem := private_key_problem(kit / "site.key"):
            raise SiteRefused(problem)
        settings = json.loads((kit / "site.json").read_text())
        return cls(kit.absolute(), str(settings["site-name"]), str(settings["server-address"]))


def site_home(site_name: str) -> Path:
    """This user's folder for the site's own files, created with mode 0700."""
    return user_cache_dir(site_name)


def check_data(data: Path, cache: Path, settings: PreprocessSettings) -> str:
    """Load the site as training will (building the cache); a one-line summary, or SiteRefused."""
    if not data.is_dir():
        raise DataUnusable(f"data folder {data} does not exist: pass the folder holding the DICOM export")
    try:
        site = load_site(data, cache, settings, progress=lambda line: print(line, file=sys.stderr))
    except (ValueError, OSError) as exc:
        raise DataUnusable(f"the site data cannot be read: {exc}") from None
    hips, labelled, pairs = len(site.stages), int((site.stages > 0).sum()), len(site.pairs_mr)
    errors = site.problems.counts()["error"]
    if hips == 0:
        raise DataUnusable(
            f"no usable hip in {data} ({errors} errors): run 'onfh check {data}' and fix what it lists "
            "(a coronal T1 series per patient and labels.csv are the minimum); not joining the federation"
        )
    return f"{hips} hips ({labelled} labelled), {pairs} MR-CT pairs, {errors} data errors (see 'onfh check')"


def check_server(address: str, ca: Path, timeout_s: float = 5.0) -> str | None:
    """TLS handshake with the server, verified against ``ca`` and the server's name.

    Returns None when the server is trustworthy, or a reason when it cannot be reached (worth
    retrying). Raises SiteRefused for what retrying cannot fix.
    """
    host, port = split_address(address)
    context = ssl.create_default_context(cafile=str(ca))
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    try:
        with context.wrap_socket(raw, server_hostname=host):
            return None
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            raise SiteRefused(
                f"the server {address} presents an expired certificate: ask the central host to renew it "
                "('onfh provision' with the federation's CA) and restart 'onfh server'; do not disable TLS"
            ) from None
        if exc.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
            raise SiteRefused(
                f"the server's certificate is not for {host}: check server-address in {ca.parent / 'site.json'} "
                "against the address the central host was provisioned with"
            ) from None
        raise SiteRefused(
            f"the server {address} is not signed by this federation's CA ({ca}): {exc.verify_message}. "
            "Either this kit belongs to another federation (ask the central host for this site's kit) or "
            "something between this hospital and the server intercepts TLS (ask your network team to "
            f"allow a direct TLS connection to {address})"
        ) from None
    except (ssl.SSLError, ConnectionResetError) as exc:
        raise SiteRefused(
            f"the server {address} does not speak TLS ({type(exc).__name__}: {exc}): this is not the onfh "
            "server, or it runs without encryption; the site never joins without TLS"
        ) from None
    except OSError as exc:
        return f"{type(exc).__name__}: {exc.strerror or exc}"
    finally:
        raw.close()


def node_config(site: str, data: Path, cache: Path, device: str, policy: Path | None = None) -> str:
    """The ``--node-config`` string (TOML values) the ClientApp reads through ``SiteConfig``.

    ``policy`` (the site's policy file, ``policy-file``) is passed as an absolute path when given.
    """
    values = {
        "data-dir": str(data.absolute()),
        "site-name": site,
        "cache-dir": str(cache.absolute()),
        "device": device,
    }
    if policy is not None:
        values["policy-file"] = str(policy.absolute())
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())
