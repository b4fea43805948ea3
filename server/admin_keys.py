"""``onfh run keygen --kit DIR --name NAME``: an administrator makes their own key and certificate request.

Writes ``DIR/admin.key`` (private, mode 0600, never leaves DIR) and ``DIR/admin.csr`` (a
certificate signing request for that key, common name NAME). Send admin.csr to the federation's
provisioner; the kit that comes back (ca.pem, admin.pem, admin.json) goes into DIR beside
admin.key, and DIR is then the admin kit ``onfh run --kit`` takes. An existing admin.key is
never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import description
from common.keys import ADMIN_CSR, generate_admin_key


def main(argv: list[str] | None = None) -> int:
    """Make the admin key and request in ``--kit``; 0 when written, 2 when refused (the message says why)."""
    parser = argparse.ArgumentParser(
        prog="onfh run keygen",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kit", type=Path, required=True, help="your admin kit folder (created 0700)")
    parser.add_argument("--name", required=True, help="your admin name, as agreed with the provisioner")
    args = parser.parse_args(argv)
    try:
        key = generate_admin_key(args.kit, args.name)
    except (ValueError, FileExistsError) as exc:
        print(f"onfh run keygen: {exc}", file=sys.stderr)
        return 2
    print(f"admin key for {args.name} written to {key} (private: it never leaves {args.kit})")
    print(f"send {args.kit / ADMIN_CSR} (never admin.key) to the federation's provisioner")
    print(f"then copy the ca.pem, admin.pem and admin.json you get back into {args.kit}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
