"""Federations made as the real parties make them: keys at the hospitals and admins, kits back from the provisioner.

Layout under ``out``::

    out/hospitals/NAME/   site kit: site.key + site.pub (made there), ca.pem + site.json (from the provisioner)
    out/admins/NAME/      admin kit: admin.key + admin.csr (made there), ca.pem + admin.pem + admin.json
    out/provision/        what ``onfh provision`` wrote (ca/, server/, sites/, admin/, provision.json)
"""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from client import approval
from common.keys import generate_admin_key, generate_site_key
from common.release import PROJECT_ROOT
from server import provision

SITE_FILES = ("ca.pem", "site.json")
ADMIN_FILES = ("ca.pem", "admin.pem", "admin.json")


@functools.cache
def this_release() -> str:
    """The bundle digest of the checked-out release (what ``onfh run submit`` sends)."""
    return approval.release_digest(PROJECT_ROOT)


def _hand_back(source: Path, kit: Path, names: tuple[str, ...]) -> Path:
    """Copy the provisioner's files ``names`` from ``source`` into the party's own ``kit``.

    A site kit also gets this release approved, as the hospital's IT would after reviewing it.
    """
    for name in names:
        shutil.copy(source / name, kit / name)
    if (kit / "site.key").exists():
        approval.approve(approval.approved_file(kit), this_release(), "reviewed for the tests")
    return kit


def make_federation(
    out: Path, address: str, sites: list[str], admin: str = "admin", **provision_kwargs
) -> dict:
    """Keys made at each site and the admin, public halves provisioned, kits handed back.

    Returns ``{"provision": OUT/provision, "server": its server kit, "sites": {name: site kit},
    "admin": admin kit}``.
    """
    hospitals = {site: out / "hospitals" / site for site in sites}
    for site, kit in hospitals.items():
        generate_site_key(kit, site)
    admin_kit = out / "admins" / admin
    generate_admin_key(admin_kit, admin)
    provisioned = out / "provision"
    provision.provision(
        provisioned,
        address,
        {site: kit / "site.pub" for site, kit in hospitals.items()},
        {admin: admin_kit / "admin.csr"},
        **provision_kwargs,
    )
    return {
        "provision": provisioned,
        "server": provisioned / "server",
        "sites": {
            site: _hand_back(provisioned / "sites" / site, kit, SITE_FILES) for site, kit in hospitals.items()
        },
        "admin": _hand_back(provisioned / "admin" / admin, admin_kit, ADMIN_FILES),
    }


def site_keygen(out: Path, site: str) -> Path:
    """A hospital joining later makes its key: returns its kit folder ``out/hospitals/NAME`` (site.pub inside)."""
    kit = out / "hospitals" / site
    generate_site_key(kit, site)
    return kit


def hand_back_site(out: Path, site: str) -> Path:
    """Copy the provisioner's ca.pem and site.json for ``site`` into its hospital folder; returns the kit."""
    return _hand_back(out / "provision" / "sites" / site, out / "hospitals" / site, SITE_FILES)


def add_site(out: Path, site: str) -> Path:
    """A site added to the federation made by :func:`make_federation` in ``out``: keygen, --add-site, hand back."""
    kit = site_keygen(out, site)
    provision.add_site(out / "provision", site, kit / "site.pub")
    return hand_back_site(out, site)


def add_admin(out: Path, name: str, **kwargs) -> Path:
    """An administrator added to that federation: keygen, --add-admin, hand back; returns the admin kit."""
    kit = out / "admins" / name
    generate_admin_key(kit, name)
    provision.add_admin(out / "provision", name, kit / "admin.csr", **kwargs)
    return _hand_back(out / "provision" / "admin" / name, kit, ADMIN_FILES)
