"""Code approval at the site: the approvals file, release digests, the SuperNode gate around Flower's own code."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import stat
import sys
import time
import types
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, Metadata, RecordDict
from flwr.cli.build import build_fab_from_disk
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree
from flwr.supercore.object_store import ObjectStoreFactory
from flwr.supercore.run import Run
from flwr.supernode import start_client_internal as flower_supernode
from flwr.supernode.nodestate import NodeStateFactory

from client import approval, daemon, site_kit, supernode_gate
from common.release import PROJECT_ROOT, stage_app

DIGEST = "sha256:" + "ab" * 32


def test_digests_are_normalised_and_checked():
    assert approval.parse_digest("AB" * 32) == DIGEST
    assert approval.parse_digest(f" {DIGEST.upper().replace('SHA256', 'sha256')} ") == DIGEST
    for bad in ("sha256:abc", "md5:" + "ab" * 32, "", "zz" * 32):
        with pytest.raises(ValueError, match="not a bundle digest"):
            approval.parse_digest(bad)
    assert approval.fab_digest(b"x") == "sha256:" + hashlib.sha256(b"x").hexdigest()


def test_approve_list_revoke(tmp_path):
    path = approval.approved_file(tmp_path)
    assert approval.load_approvals(path) == []
    approval.approve(path, DIGEST, "release 1.2, IT ticket 42", "/opt/onfh-fl")
    other = "sha256:" + "cd" * 32
    approval.approve(path, other, "second")
    approval.approve(path, DIGEST, "re-reviewed")  # a re-approval replaces the entry
    approvals = approval.load_approvals(path)
    assert [a.digest for a in approvals] == [other, DIGEST]
    assert approvals[1].note == "re-reviewed" and approvals[1].approved[:4].isdigit()
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert json.loads(path.read_text())["approved"][0]["digest"] == other  # a file people can read and diff
    assert approval.revoke(path, DIGEST) and not approval.revoke(path, DIGEST)
    assert approval.approved_digests(path) == {other}


def test_an_approvals_file_others_can_change_or_a_broken_one_is_refused(tmp_path):
    path = approval.approved_file(tmp_path)
    approval.approve(path, DIGEST)
    path.chmod(0o666)
    with pytest.raises(ValueError, match="chmod 644"):
        approval.approved_digests(path)
    path.chmod(0o600)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a list of approved releases"):
        approval.approved_digests(path)


def test_release_digest_is_the_bundle_flwr_run_builds_from_the_staged_app(tmp_path):
    first = approval.release_digest(PROJECT_ROOT)
    assert first == approval.release_digest(PROJECT_ROOT)  # the build is deterministic
    staged = stage_app(PROJECT_ROOT, tmp_path / "elsewhere")  # what 'onfh run submit' hands to 'flwr run'
    fab = build_fab_from_disk(staged)  # what 'flwr run' sends; Flower names it sha256(bytes)
    assert first == approval.fab_digest(fab)
    (tmp_path / "release.fab").write_bytes(fab)
    assert approval.release_digest(tmp_path / "release.fab") == first
    with pytest.raises(FileNotFoundError, match="neither a release folder"):
        approval.release_digest(tmp_path / "elsewhere" / "client")


def test_the_gate_still_fits_flowers_supernode():
    """Fails loudly when a Flower upgrade moves what the gate hooks (see client.supernode_gate.install)."""
    assert supernode_gate.flower_internals_problem() is None
    params = inspect.signature(flower_supernode._pull_and_store_message).parameters
    assert {"get_fab", "trusted_entities"} <= set(params)
    # In the function, the bundle is fetched, then trusted_entities decide, and only then is anything
    # of the bundle stored or a task created (which is what starts a ClientApp process).
    source = inspect.getsource(flower_supernode._pull_and_store_message)
    order = ["get_fab(", "if trusted_entities:", 'fab.verifications.get("valid_license"', "return run_id"]
    order += ["state.store_fab(fab)", "state.create_task("]
    positions = [source.find(marker) for marker in order]
    assert -1 not in positions and positions == sorted(positions), dict(zip(order, positions, strict=True))


def _message(run_id: int) -> Message:
    metadata = Metadata(
        run_id=run_id, message_id="", src_node_id=1, dst_node_id=7, reply_to_message_id="", group_id="",
        created_at=time.time(), ttl=3600.0, message_type="train",
    )  # fmt: skip
    message = Message(RecordDict({"config": ConfigRecord({"x": 1})}), metadata=metadata)
    message.metadata.__dict__["_message_id"] = message.object_id  # as the SuperLink sets it
    return message


def _pull_once(pull, content: bytes, run_id: int = 42):
    """One message of a new run through Flower's real ``_pull_and_store_message`` (wrapped or not)."""
    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objectstore_factory=objects).state(), objects.store()
    state.set_node_id(7)
    message = _message(run_id)
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    run = Run.create_empty(run_id)
    run.fab_hash = fab.hash_str
    nested = {k: v.deflate() for k, v in get_all_nested_objects(message).items()}
    pull(
        state=state, object_store=store, node_config={}, receive=lambda: (message, get_object_tree(message)),
        get_run=lambda _: run, get_fab=lambda _hash, _run: fab, pull_object=lambda _run, oid: nested[oid],
        confirm_message_received=lambda _run, _id: None, trusted_entities=None,
    )  # fmt: skip
    return state, fab


def test_an_unapproved_bundle_is_refused_before_anything_of_it_is_stored(tmp_path, caplog):
    approved, refused = approval.approved_file(tmp_path), tmp_path / "refused"
    content = build_fab_from_disk(
        stage_app(PROJECT_ROOT, tmp_path / "app")
    )  # a real bundle (Flower unzips it)
    gated = supernode_gate.gate(flower_supernode._pull_and_store_message, approved, refused)
    with caplog.at_level(logging.INFO, logger="flwr"):
        state, fab = _pull_once(gated, content)
    # No run, no bundle stored: nothing a ClientApp process could be started with.
    assert state.get_run(42) is None and state.get_fab(fab.hash_str) is None
    [reply] = state.get_messages_legacy(is_reply=True)
    assert reply.has_error() and "could not be verified" in reply.error.reason  # the server hears a refusal
    digest = approval.fab_digest(content)
    line = next(r.getMessage() for r in caplog.records if "refused run 42" in r.getMessage())
    assert f"its bundle {digest} is not an approved release" in line
    saved = refused / f"{digest.split(':')[1]}.fab"
    assert f"--kit {tmp_path.absolute()} --fab {saved}" in line
    assert saved.read_bytes() == content and stat.S_IMODE(saved.stat().st_mode) == 0o600

    approval.approve(approved, digest)  # approved while the SuperNode runs: the next run is accepted
    state, fab = _pull_once(gated, content)
    assert state.get_run(42) is not None and state.get_fab(fab.hash_str) is not None
    assert not state.get_messages_legacy(is_reply=True)


def test_the_gate_fails_closed_and_keeps_signature_checks(tmp_path):
    seen = {}

    def pull(state, object_store, node_config, receive, get_run, get_fab, pull_object, confirm_message_received,
             trusted_entities):  # fmt: skip
        fab = get_fab("hash", 5)
        seen.update(
            truthy=bool(trusted_entities), entities=dict(trusted_entities), verifications=fab.verifications
        )

    def fetch(_hash, _run):
        return Fab("hash", b"bundle", {"valid_license": "yes"})

    approved = tmp_path / "approvals.json"
    approved.write_text("broken")
    args = dict(state=None, object_store=None, node_config={}, receive=None, get_run=None, pull_object=None)
    supernode_gate.gate(pull, approved, None)(
        **args, get_fab=fetch, confirm_message_received=None, trusted_entities=None
    )
    assert seen == {"truthy": True, "entities": {}, "verifications": {}}  # unreadable list: refused
    approval.approve(approved.with_name("ok.json"), approval.fab_digest(b"bundle"))
    gated = supernode_gate.gate(pull, approved.with_name("ok.json"), None)
    gated(**args, get_fab=fetch, confirm_message_received=None, trusted_entities=None)
    assert seen["truthy"] is False and seen["verifications"] == {"valid_license": "yes"}
    gated(**args, get_fab=fetch, confirm_message_received=None, trusted_entities={"key": "ssh-ed25519 X"})
    assert seen["truthy"] is True and seen["entities"] == {"key": "ssh-ed25519 X"}  # Flower still checks them


def test_an_idle_supernode_asks_again_promptly_and_flowers_loop_only_sleeps_when_nothing_came(tmp_path):
    # Flower's real pull, with a SuperLink that has nothing twice and then a message: the prompt
    # wrapper hands Flower the message after two short waits, not after two of Flower's 3-s sleeps.
    asked = []
    real = flower_supernode._pull_and_store_message

    def pull(**kwargs):
        receive = kwargs["receive"]
        kwargs["receive"] = lambda: asked.append(time.monotonic()) or (receive() if len(asked) > 2 else None)
        return real(**kwargs)

    bundle = build_fab_from_disk(stage_app(PROJECT_ROOT, tmp_path / "app"))
    t0 = time.monotonic()
    state, _ = _pull_once(supernode_gate.prompt(pull, interval=0.05), bundle)
    assert len(asked) == 3 and time.monotonic() - t0 < 1.0
    assert state.get_run(42) is not None  # the message of run 42 was stored as Flower stores it
    idle = supernode_gate.prompt(lambda: None, interval=0.05, patience=0.2)
    t0 = time.monotonic()
    assert idle() is None and 0.2 <= time.monotonic() - t0 < 1.0  # then Flower's own sleep takes over
    # What the wrapper relies on: an empty pull makes Flower's loop sleep and pull again, nothing else.
    loop = inspect.getsource(flower_supernode.start_client_internal)
    assert (
        "if run_id is None:" in loop
        and loop.split("if run_id is None:")[1].split("continue")[0].count("\n") <= 4
        and "time.sleep(3)" in loop.split("if run_id is None:")[1].split("continue")[0]
    )


def _kit(root: Path) -> Path:
    kit = root / "kit"
    kit.mkdir()
    (kit / "ca.pem").write_text("not read before the server is dialled")
    (kit / "site.key").write_text("-")
    (kit / "site.key").chmod(0o600)
    (kit / "site.json").write_text(json.dumps({"site-name": "site-a", "server-address": "127.0.0.1:9"}))
    return kit


def test_site_refuses_to_start_without_an_approved_release(tmp_path, capsys):
    kit = _kit(tmp_path)
    argv = ["--kit", str(kit), "--data", str(tmp_path), "--skip-check", "--log", str(tmp_path / "s.log")]
    assert daemon.main(argv) == daemon.EXIT_REFUSED
    err = capsys.readouterr().err
    assert "no release is approved" in err and f"onfh site approve --kit {kit.absolute()} --release" in err


def test_site_cli_approves_lists_and_revokes(tmp_path, capsys):
    kit = _kit(tmp_path)
    assert daemon.main(["approve", "--kit", str(kit), "--digest", DIGEST, "--note", "IT ticket 42"]) == 0
    assert daemon.main(["approved", "--kit", str(kit)]) == 0
    assert DIGEST in capsys.readouterr().out
    (tmp_path / "b.fab").write_bytes(b"bundle")
    assert daemon.main(["approve", "--kit", str(kit), "--fab", str(tmp_path / "b.fab")]) == 0
    assert approval.fab_digest(b"bundle") in approval.approved_digests(approval.approved_file(kit))
    assert daemon.main(["revoke", "--kit", str(kit), "--digest", DIGEST]) == 0
    assert daemon.main(["approve", "--kit", str(kit), "--digest", "sha256:12"]) == 1
    assert "not a bundle digest" in capsys.readouterr().err


def test_site_dispatches_keygen(monkeypatch):
    calls = []
    monkeypatch.setitem(
        sys.modules, "client.keygen", types.SimpleNamespace(main=lambda argv: calls.append(argv) or 0)
    )
    monkeypatch.setattr(sys.modules["client"], "keygen", sys.modules["client.keygen"], raising=False)
    assert daemon.main(["keygen", "--kit", "K"]) == 0
    assert calls == [["--kit", "K"]]


def test_supernode_runs_behind_the_gate_with_the_sites_settings(tmp_path, monkeypatch):
    kit = site_kit.SiteKit(tmp_path, "site-a", "fl.example.org:9092")
    config = site_kit.node_config("site-a", tmp_path / "d", tmp_path / "c", "cpu", Path("policy.toml"))
    assert f'policy-file="{Path("policy.toml").absolute()}"' in config
    command = daemon.supernode_command(kit, config, 9094, tmp_path / "approved.json", tmp_path / "refused")
    cut = command.index("--")
    assert command[:cut] == [
        sys.executable, "-P", "-m", "client.supernode_gate", "--approved", str(tmp_path / "approved.json"),
        "--refused-dir", str(tmp_path / "refused"),
    ]  # fmt: skip
    assert command[cut + 1 : cut + 3] == ["--superlink", "fl.example.org:9092"] and config in command
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    home = site_kit.site_home("site-a")
    assert home == tmp_path / "xdg" / "onfh" / "site-a"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700 == stat.S_IMODE(home.parent.stat().st_mode)
    assert os.access(home, os.W_OK)
