"""``onfh site keygen --kit DIR --name NAME``: the hospital makes its own site key; only the public half travels.

Writes ``DIR/site.key`` (private, mode 0600, never leaves DIR) and ``DIR/site.pub`` (one public
line). Send site.pub to the federation's provisioner; the kit that comes back (ca.pem,
site.json) goes into DIR beside site.key, and DIR is then the site kit ``onfh site --kit``
takes. An existing site.key is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import description
from common.keys import SITE_PUB, generate_site_key


def main(argv: list[str] | None = None) -> int:
    """Make the site key in ``--kit``; 0 when written, 2 when refused (the message says why)."""
    parser = argparse.ArgumentParser(
        prog="onfh site keygen",
        description=description(__doc__, full=True),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--kit", type=Path, required=True, help="this hospital's kit folder (created 0700)")
    parser.add_argument("--name", required=True, help="the site's name, as agreed with the provisioner")
    args = parser.parse_args(argv)
    try:
        key = generate_site_key(args.kit, args.name)
    except (ValueError, FileExistsError) as exc:
        print(f"onfh site keygen: {exc}", file=sys.stderr)
        return 2
    print(f"site key for {args.name} written to {key} (private: it never leaves {args.kit})")
    print(f"send {args.kit / SITE_PUB} (never site.key) to the federation's provisioner")
    print(
        f"then copy the ca.pem and site.json you get back into {args.kit}, and run 'onfh site --kit {args.kit}'"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
