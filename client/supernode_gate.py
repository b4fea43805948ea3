"""``python -m client.supernode_gate --approved FILE -- ARGS``: ``flower-supernode`` that runs approved bundles only.

``onfh site`` starts the SuperNode through this gate. When a message of a new run arrives, the
SuperNode fetches the run's app bundle (FAB); the gate compares the sha256 of the bundle's bytes
with the digests in FILE (re-read for every new run, so an approval takes effect without a
restart). A bundle that is not approved is refused before anything of it is stored, installed or
imported: the server gets an error reply for this node ("The FAB could not be verified."), the
SuperNode log gets one line naming the run and the digest, and the bundle is saved (never run)
under ``--refused-dir`` for review. ``ARGS`` are ``flower-supernode``'s own arguments.

The gate also makes the idle SuperNode ask for work every ``--poll-interval`` seconds (0.5)
rather than Flower 1.42's fixed 3 s, so that a round's next message step starts promptly.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import sys
import time
from collections.abc import Callable
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

from client.approval import APPROVED_FILE, approved_digests, fab_digest
from common.files import write_atomic

# Set before Flower is imported: its telemetry reads the variable at import time.
QUIET_FLOWER = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


class Verdict(dict):
    """Flower's ``trusted_entities`` for one pulled message: truthy when the fetched bundle was refused.

    Flower tests it (``if trusted_entities:``) only after fetching the bundle, so the gate decides
    in ``get_fab`` and Flower's own refusal follows. Entities from ``--trusted-entities`` are kept:
    an approved bundle must then also carry their signature (both checks apply).
    """

    def __init__(self, entities: dict[str, str] | None) -> None:
        super().__init__(entities or {})
        self.refused = False

    def __bool__(self) -> bool:
        return self.refused or len(self) > 0


def refusal(content: bytes, run_id: int, approved: Path, refused_dir: Path | None) -> str | None:
    """Why the bundle ``content`` of run ``run_id`` may not run here (one log line), or None if approved."""
    digest = fab_digest(content)
    try:
        if digest in approved_digests(approved):
            return None
        why = "is not an approved release"
    except (OSError, ValueError) as exc:  # an unreadable list approves nothing
        why = f"cannot be checked ({exc})"
    review, saved = "review it", "BUNDLE.fab"
    if refused_dir is not None:
        path = refused_dir / f"{digest.split(':')[1]}.fab"
        try:
            write_atomic(path, content, mode=0o600)  # kept for review; nothing here runs it
            review, saved = f"review it (saved as {path})", str(path)
        except OSError as exc:
            review = f"review it (not saved: {exc})"
    where = f"--kit {approved.parent}" if approved.name == APPROVED_FILE else f"--approved {approved}"
    return f"refused run {run_id}: its bundle {digest} {why}; {review} and run 'onfh site approve {where} --fab {saved}'"


def gate(pull_and_store: Callable[..., Any], approved: Path, refused_dir: Path | None) -> Callable[..., Any]:
    """``pull_and_store`` (Flower's ``_pull_and_store_message``) with its ``get_fab`` checked against ``approved``."""
    from flwr.supercore.logger import log

    signature = inspect.signature(pull_and_store)

    @functools.wraps(pull_and_store)
    def gated(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs)
        fetch = call.arguments["get_fab"]
        verdict = Verdict(call.arguments["trusted_entities"])

        def checked_fetch(fab_hash: str, run_id: int) -> Any:
            fab = fetch(fab_hash, run_id)
            reason = refusal(fab.content, run_id, approved, refused_dir)
            if reason is not None:
                log(ERROR, reason)
                verdict.refused = True
                fab.verifications = {}  # no "valid_license": Flower's refusal path below runs
            return fab

        call.arguments["get_fab"] = checked_fetch
        call.arguments["trusted_entities"] = verdict
        return pull_and_store(*call.args, **call.kwargs)

    return gated


def prompt(pull_and_store: Callable[..., Any], interval: float, patience: float = 30.0) -> Callable[..., Any]:
    """``pull_and_store`` asked again every ``interval`` seconds while the SuperLink has nothing for
    this node, for up to ``patience`` seconds; only then does Flower's loop take its own 3-s sleep
    (the one thing it does when a pull comes back empty)."""

    @functools.wraps(pull_and_store)
    def pulled(*args: Any, **kwargs: Any) -> Any:
        give_up = time.monotonic() + patience
        while (run_id := pull_and_store(*args, **kwargs)) is None and time.monotonic() < give_up:
            time.sleep(interval)
        return run_id

    return pulled


def install(approved: Path, refused_dir: Path | None, poll_interval: float = 0.5) -> None:
    """Wrap Flower's ``_pull_and_store_message`` in this process so that every new run passes the gate.

    Why this hook: ``_pull_and_store_message`` is where the SuperNode sees a run's bundle for the
    first time (``get_fab``, once per new run) and, in the same function, Flower's own check of
    ``trusted_entities`` replies with an error and returns *before* the bundle is stored or a task
    is created, so no ClientApp process ever gets the bundle (which would put it first on
    ``sys.path``). Later hooks (the ClientApp, ``flower-superexec``) come too late; Flower's
    signature check covers only Flower Hub bundles. The same wrapper asks again every
    ``poll_interval`` seconds while nothing is due (:func:`prompt`). ``start_client_internal``
    looks the function up in its module at each call, so replacing the module attribute takes
    effect.
    tests/client/test_approval.py fails loudly if a Flower upgrade moves any of this.
    """
    import flwr.supernode.start_client_internal as supernode

    problem = flower_internals_problem()
    if problem is not None:
        raise SystemExit(
            f"onfh gate: cannot guard this Flower version, not starting the SuperNode: {problem}"
        )
    gated = gate(supernode._pull_and_store_message, approved, refused_dir)
    supernode._pull_and_store_message = prompt(gated, poll_interval)


def flower_internals_problem() -> str | None:
    """What of the Flower internals the gate relies on has changed (a Flower upgrade), or None."""
    import flwr.supernode.start_client_internal as supernode

    pull = getattr(supernode, "_pull_and_store_message", None)
    if pull is None:
        return "flwr.supernode.start_client_internal._pull_and_store_message is gone"
    missing = {"get_fab", "trusted_entities"} - set(inspect.signature(pull).parameters)
    if missing:
        return f"_pull_and_store_message no longer takes {', '.join(sorted(missing))}"
    if "_pull_and_store_message" not in supernode.start_client_internal.__code__.co_names:
        return "start_client_internal no longer calls _pull_and_store_message"
    return None


def _split(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("usage: python -m client.supernode_gate --approved FILE -- FLOWER_SUPERNODE_ARGS")
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m client.supernode_gate", description=__doc__)
    parser.add_argument("--approved", type=Path, required=True, help="the site's approved releases (JSON)")
    parser.add_argument(
        "--refused-dir", type=Path, default=None, help="where refused bundles are kept for review"
    )
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=0.5,
        help="seconds between an idle SuperNode's requests for work",
    )
    return parser.parse_args(argv[:cut]), argv[cut + 1 :]


def main(argv: list[str] | None = None) -> None:
    """Install the gate, then run Flower's ``flower-supernode`` with the arguments after ``--``."""
    args, flower_args = _split(sys.argv[1:] if argv is None else argv)
    os.environ.update(QUIET_FLOWER)
    approved = args.approved.absolute()
    refused_dir = args.refused_dir.absolute() if args.refused_dir else None
    if not args.poll_interval > 0:
        raise SystemExit(f"onfh gate: --poll-interval must be > 0 seconds, got {args.poll_interval}")
    install(approved, refused_dir, args.poll_interval)
    from flwr.supercore.logger import log
    from flwr.supernode.cli import flower_supernode

    try:
        pinned = sorted(approved_digests(approved))
        log(INFO, "onfh gate: runs only bundles approved in %s: %s", approved, ", ".join(pinned) or "none")
        if not pinned:
            log(WARNING, "onfh gate: no approved release: every run is refused until one is approved")
    except (OSError, ValueError) as exc:
        log(WARNING, "onfh gate: %s; every run is refused until this is fixed", exc)
    sys.argv = ["flower-supernode", *flower_args]  # Flower parses sys.argv; its messages name itself
    flower_supernode()


if __name__ == "__main__":
    main()
