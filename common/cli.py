"""The ``onfh`` command: one prefix and a verb; each verb lives in the module that owns it."""

from __future__ import annotations

import importlib
import sys

# verb -> (module with a ``main(argv) -> int``, one-line help)
VERBS: dict[str, tuple[str, str]] = {
    "synth": ("simulation.synth", "write synthetic hospitals as DICOM + labels CSV"),
    "check": ("common.sitedata.check", "check a site's data folder and print a report"),
    "simulate": ("simulation.main_job", "run the federation of synthetic hospitals (main job)"),
    "train": ("common.training.centralized", "train centrally (pooled sites) or locally (one site)"),
    "predict": ("common.predict", "stage the hips of a study folder with a saved model"),
    "provision": ("server.provision", "create the CA, server certificate and one kit per site and admin"),
    "server": ("server.daemon", "run the central SuperLink (TLS, site authentication) from a server kit"),
    "site": ("client.daemon", "check a site's data, then join the federation with a site kit"),
    "run": ("server.runs", "submit a federated run, follow its status and logs (admin kit)"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"onfh: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: onfh <command> [options]\n\ncommands:")
        for verb, (_, text) in VERBS.items():
            print(f"  {verb:<10} {text}")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(VERBS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
