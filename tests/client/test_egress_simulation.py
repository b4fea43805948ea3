"""What leaves a site in a whole run: its egress ledger against what the server received, and a
scan of every value sent for anything that identifies a patient or a hip.

Two tiny simulated runs (both phases, the inventory, every evaluation and the final test), one
under secure aggregation (the default: every update and evaluation leaves masked) and one in the
clear (``secure-aggregation = false``: the site's release bounds are what protect its hips), each
with two sites: ``site-00`` releases from :data:`LOW_MIN` hips on (its policy file), ``site-01`` has
the built-in policy (10 hips: on the tiny federation it withholds every evaluation) and crashes
in pretraining with an exception text full of identifiers (a path, a name, a UID).

"No value identifies a hip" is checked as: every evaluation of fewer hips (pretraining: patients)
than the site's ``min-release-hips`` is a bare ``withheld`` mark; every histogram has at most
``max-release-bins`` bins (so a score is known only as one of that many bins); and no string or number sent
is a patient ID, name, DICOM UID, accession number, date, pseudonymous key or file path, or text
other than the known metric keys, the model's array names, the site's name and the error digests.
"""

from __future__ import annotations

import json
import re
import stat
import warnings
from pathlib import Path

import pydicom
import pytest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.simulation import run_simulation

from client import audit, ledger, tasks
from client.client_app import _guarded, handle_evaluate, handle_query, handle_train
from client.policy import ReleaseBounds, SitePolicy
from common.config import RunConfig, SiteConfig
from common.models.factory import build_staging, build_translation
from common.training.weights import get_shared_state
from server.server_app import make_server_app
from tests.server.test_federation import tiny_config

SITES = ("site-00", "site-01")
CRASHING = "site-01"
LOW_MIN = 2  # site-00's min-release-hips
BINS = 10  # site-00's max-release-bins
RELEASED = {
    "query": {"num-examples", "hips", "labelled-train", "labelled-val", "labelled-test", "pairs"},
    "train": {"num-examples", "loss", "train-seconds"},
    "stage": {"num-examples", "score-histogram", "confusion", "macro-auroc", "accuracy"},
    "pretrain": {"num-examples", "mae-hu", "psnr", "ssim"},
}
WITHHELD = {"num-examples", "withheld", "min-release-hips"}
DIGEST = re.compile(
    r"site (site-\d\d): (\w+ during (training|evaluation|inventory|secure aggregation); details are in the "
    r"site's log|refuses .*|stopped after .*)"
)


def egress_app(overrides: dict, policy: Path, crash_text: str) -> ClientApp:
    """The ClientApp's real handlers behind its real guard; site-00 gets ``policy``, and site-01's
    pretraining fails with an exception whose text is ``crash_text``."""
    app = ClientApp()

    def site(context: Context) -> str:
        if int(context.node_config["partition-id"]) == 0:
            context.node_config["policy-file"] = str(policy)
        return f"site-{int(context.node_config['partition-id']):02d}"

    def crash(msg: Message, context: Context, overrides: dict) -> Message:
        raise FileNotFoundError(crash_text)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        failing = site(context) == CRASHING and msg.content["config"]["phase"] == "pretrain"
        return _guarded("training", crash if failing else handle_train, msg, context, overrides)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        site(context)
        return _guarded("evaluation", handle_evaluate, msg, context, overrides)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        site(context)
        return _guarded("inventory", handle_query, msg, context, overrides)

    return app


def identifiers(federation: Path) -> set[str]:
    """Every identifier the synthetic federation holds: truth-file IDs and UIDs, DICOM header values."""
    found: set[str] = set()
    for truth in federation.glob("*.truth.json"):
        for patient in json.loads(truth.read_text()):
            found |= {
                patient["patient_id"],
                patient.get("mr_study_uid") or "",
                patient.get("ct_study_uid") or "",
            }
    for path in federation.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for tag in (
            "PatientID",
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "AccessionNumber",
        ):
            found.add(str(ds.get(tag, "")))
        found |= {part for part in re.split(r"\^", str(ds.get("PatientName", ""))) if len(part) > 2}
    return {f for f in found if f}


def run_with_egress_app(tiny_federation, tmp_path_factory, secure: bool):
    out = tmp_path_factory.mktemp("egress")
    cfg = tiny_config(tiny_federation, out, run_name="egress", secure_aggregation=secure)
    policy = out / "site-00-policy.toml"
    policy.write_text(f"[limits]\nmin-release-hips = {LOW_MIN}\nmax-release-bins = {BINS}\n")
    truth = json.loads((tiny_federation / f"{CRASHING}.truth.json").read_text())[0]
    crash_text = f"{tiny_federation}/{CRASHING}/{truth['patient_id']}/{truth['mr_study_uid']}/KIM^MINJUN.dcm"
    overrides = cfg.to_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            make_server_app(overrides),
            egress_app(overrides, policy, crash_text),
            num_supernodes=2,
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
        )
    results = json.loads((cfg.run_dir / "results.json").read_text())
    paths = {s: ledger.default_ledger_path(Path(cfg.cache_dir) / s, s) for s in SITES}
    policies = {"site-00": SitePolicy.load(policy).release, "site-01": SitePolicy().release}
    return cfg, results, paths, policies, crash_text


@pytest.fixture(scope="module")
def egress_run(tiny_federation, tmp_path_factory):
    """The run in the clear."""
    return run_with_egress_app(tiny_federation, tmp_path_factory, secure=False)


@pytest.fixture(scope="module")
def secure_egress_run(tiny_federation, tmp_path_factory):
    """The run under secure aggregation (two sites: the threshold is both, so the pretraining
    round in which site-01 crashes reveals nothing and keeps the global weights)."""
    return run_with_egress_app(tiny_federation, tmp_path_factory, secure=True)


def sent_by_server_record(results: dict, site: str) -> list[tuple]:
    """``(phase, round, kind, withheld)`` of each reply the server recorded from ``site``, in run order:
    content replies from the rounds' byte tallies, error replies from the failures."""
    errors = {
        (f["phase"], f["round"], f["step"])
        for f in results["failures"]
        if f["site"] == site and f["reason"].startswith("error at the site")
    }
    record = [("inventory", None, "query", False)] if site in results["history"]["inventory"] else []
    for phase in ("pretrain", "stage"):
        for entry in results["history"][phase]:
            for step in ("train", "evaluate"):
                withheld = site in entry["withheld"].get(f"{step}-received", [])
                if site in entry["bytes"].get(f"{step}-received", {}):
                    record.append((phase, entry["round"], step, withheld))
                elif (phase, entry["round"], step) in errors:
                    record.append((phase, entry["round"], "error", False))
    return record


def ledger_record(entries: list[dict]) -> list[tuple]:
    """The same tuples from a site's ledger (validation rounds only; evaluations take their round
    from the training line before them: the server's evaluate message carries no round)."""
    record, last_round = [], None
    for e in entries:
        if e.get("split") == "test" or e["phase"] == "deliver":  # after the rounds (the server's own record)
            continue
        last_round = (
            e["round"] if e["kind"] in ("train", "error") and e["phase"] != "inventory" else last_round
        )
        round_no = None if e["kind"] == "query" else (e["round"] if e["kind"] != "evaluate" else last_round)
        record.append((e["phase"], round_no, e["kind"], bool(e["metrics"].get("withheld"))))
    return record


@pytest.mark.slow
def test_each_site_ledger_lists_every_reply_the_server_received(egress_run) -> None:
    cfg, results, paths, _, _ = egress_run
    for site, path in paths.items():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        entries = ledger.read(path)
        assert {e["site"] for e in entries} == {site}
        assert ledger_record(entries) == sent_by_server_record(results, site), site
        tests = [e for e in entries if e.get("split") == "test"]
        assert len(tests) == 1  # the final test: released ones are the sites the server pooled
        assert (site in results["test"]["sites"]) == (not tests[0]["metrics"].get("withheld"))
        received = {(p, r["round"]): r["bytes"].get("train-received", {}) for p in ("pretrain", "stage")
                    for r in results["history"][p]}  # fmt: skip
        for e in entries:
            if e["kind"] == "train":
                assert e["array-bytes"] == received[(e["phase"], e["round"])][site] > 0
    assert results["test"]["n-hips"] == sum(s["num-examples"] for s in results["test"]["sites"].values())
    assert CRASHING not in results["test"]["sites"]  # it withheld its test evaluation


@pytest.mark.slow
def test_the_audit_summary_matches_the_ledger_and_the_server(egress_run, capsys) -> None:
    cfg, results, paths, _, _ = egress_run
    for site, path in paths.items():
        summary = audit.summarise(ledger.read(path))
        server = sent_by_server_record(results, site)
        delivered = int(site in results["delivery"]["sites"])  # the model's acknowledgement
        assert summary["messages"] == len(server) + 1 + delivered  # + the final test
        assert summary["errors"] == sum(1 for r in server if r[2] == "error")
        by_kind: dict[tuple, int] = {}
        for phase, _, kind, _ in server:
            by_kind[(phase, kind)] = by_kind.get((phase, kind), 0) + 1
        by_kind[("stage", "evaluate")] += 1  # the final test is a stage evaluation
        if delivered:
            by_kind[("deliver", "query")] = 1
        assert {(r["phase"], r["kind"]): r["messages"] for r in summary["rows"]} == by_kind
        assert {r["run-id"] for r in summary["rows"]} != {None}
        assert audit.main(["--ledger", str(path)]) == 0
        assert f"messages: {summary['messages']}" in capsys.readouterr().out
    crashed = audit.summarise(ledger.read(paths[CRASHING]))
    assert crashed["errors"] == 1 and crashed["withheld"] >= 3  # pretrain val, stage val, test


def string_values(entry: dict) -> list[str]:
    """Every string the message carried (not the ledger's own time, site, run or request fields)."""
    values = [a["name"] for a in entry["arrays"]] + list(entry["metrics"]) + list(entry["config"])
    values += [v for v in entry["config"].values() if isinstance(v, str)]
    values += [v for v in entry["metrics"].values() if isinstance(v, str)]
    return values + ([entry["error"]] if entry["error"] else [])


def check_release(entry: dict, release: ReleaseBounds, units: int) -> None:
    """An evaluation reply is a bare withheld mark below the bound, else within the release bounds."""
    metrics = entry["metrics"]
    if units < release.min_hips:
        assert metrics == {"num-examples": 0, "withheld": 1, "min-release-hips": release.min_hips}
        return
    assert set(metrics) == RELEASED[entry["phase"]], metrics
    if entry["phase"] == "stage":
        assert metrics["num-examples"] == units >= release.min_hips
        bins = len(metrics["score-histogram"]) // 8
        assert 2 <= bins <= release.max_bins and len(metrics["score-histogram"]) == 8 * bins
        assert sum(metrics["score-histogram"]) == 4 * units and sum(metrics["confusion"]) == units


@pytest.mark.slow
def test_nothing_a_site_sent_identifies_a_hip(egress_run, tiny_federation) -> None:
    cfg, results, paths, policies, crash_text = egress_run
    names = set(get_shared_state(build_staging(cfg.model), False, "float32"))
    names |= set(get_shared_state(build_translation(cfg.model), False, "float32"))
    secrets = identifiers(tiny_federation) | {crash_text, str(tiny_federation)}
    uid, date = re.compile(r"\d+(\.\d+){3,}"), re.compile(r"(19|20)\d\d-?[01]\d-?[0-3]\d")
    kinds_seen, released_seen, withheld_seen = set(), 0, 0
    for site, path in paths.items():
        data = tasks.site_data(SiteConfig.from_node_config({"partition-id": int(site[-2:])}, cfg), cfg)
        secrets |= {str(k) for k in data.patient_keys}
        run = RunConfig.from_dict(cfg.to_dict())
        for entry in ledger.read(path):
            kinds_seen.add(entry["kind"])
            assert entry["masked"] is False
            assert {a["name"] for a in entry["arrays"]} <= names
            assert entry["config"] in ({"site-name": site}, {})
            for text in string_values(entry):
                assert not any(s.lower() in text.lower() for s in secrets if len(s) > 3), text
                assert not uid.search(text) and not date.search(text) and "/" not in text and "\\" not in text
            if entry["kind"] == "error":
                assert DIGEST.fullmatch(entry["error"]) and DIGEST.fullmatch(entry["error"]).group(1) == site
                continue
            for key, value in entry["metrics"].items():
                numbers = value if isinstance(value, list) else [value]
                assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers), key
            if entry["kind"] == "query" and entry["phase"] == "deliver":
                assert entry["metrics"] == {"delivered": 1}
            elif entry["kind"] == "query":
                assert set(entry["metrics"]) == RELEASED["query"]
            elif entry["kind"] == "train":
                assert set(entry["metrics"]) == RELEASED["train"]
            else:
                split = entry.get("split", "val")
                if entry["phase"] == "pretrain":
                    units = len({str(k) for k in data.pair_keys if data.split.get(str(k)) == split})
                else:
                    units = len(data.staging_set(split)[2])
                check_release(entry, policies[site], units)
                withheld = bool(entry["metrics"].get("withheld"))
                withheld_seen, released_seen = withheld_seen + withheld, released_seen + (not withheld)
    assert run.histogram_bins > BINS  # the run asked for finer histograms than site-00 released
    assert kinds_seen == {"query", "train", "evaluate", "error"}
    assert released_seen >= 1 and withheld_seen >= 3


# -- under secure aggregation ----------------------------------------------------------------------
SECAGG_KEYS = {  # the config keys of the keys, shares and unmask replies (client/secagg.py)
    "c-pk", "s-pk-train", "s-pk-evaluate", "to", "ciphertexts", "b-ids", "b-shares", "sk-ids", "sk-shares",
}  # fmt: skip
BYTES = re.compile(r"<\d+ bytes>")


def received_by_server(results: dict, site: str) -> int:
    """Messages with content the server recorded from ``site`` in the rounds (every step's byte
    tally: one message per site and key), its inventory, and its error replies."""
    count = 1 if site in results["history"]["inventory"] else 0
    for phase in ("pretrain", "stage"):
        for entry in results["history"][phase]:
            count += sum(
                1 for key, by_site in entry["bytes"].items() if key.endswith("-received") and site in by_site
            )
    errors = [
        f for f in results["failures"] if f["site"] == site and f["reason"].startswith("error at the site")
    ]
    return count + len(errors)


@pytest.mark.slow
def test_secure_ledger_counts_every_message_and_everything_else_is_masked(
    secure_egress_run, tiny_federation
) -> None:
    cfg, results, paths, _, crash_text = secure_egress_run
    assert cfg.secure_aggregation and results["test"]["secure-aggregation"]["sites"] == list(SITES)
    refused = [f for f in results["failures"] if f["site"] == "secure-aggregation"]
    assert [(f["phase"], f["step"]) for f in refused] == [("pretrain", "train")]  # site-01 crashed there
    secrets = identifiers(tiny_federation) | {crash_text, str(tiny_federation)}
    masked_seen = 0
    for site, path in paths.items():
        entries = ledger.read(path)
        # The final test is a session of its own (keys, shares, evaluation, unmask), outside the rounds.
        delivered = int(site in results["delivery"]["sites"])  # the model's acknowledgement, after the test
        assert len(entries) == received_by_server(results, site) + 4 + delivered, site
        summary = audit.summarise(entries)
        assert summary["messages"] == len(entries) and summary["masked"] == sum(e["masked"] for e in entries)
        for entry in entries:
            for text in string_values(entry):
                assert not any(s.lower() in text.lower() for s in secrets if len(s) > 3), text
            if entry["kind"] == "error":
                assert DIGEST.fullmatch(entry["error"]).group(1) == site
            elif entry["kind"] in ("train", "evaluate"):
                # Weights and evaluations leave only as one masked uint32 vector each.
                assert entry["masked"] is True
                assert [(a["name"], a["dtype"]) for a in entry["arrays"]] == [("masked", "uint32")]
                allowed = {"num-examples", "train-seconds"} if entry["kind"] == "train" else {"num-examples"}
                assert set(entry["metrics"]) <= allowed
                masked_seen += 1
            elif entry["phase"].startswith("secagg-"):
                assert entry["masked"] is False and entry["metrics"] == {} and entry["arrays"] == []
                assert set(entry["config"]) <= SECAGG_KEYS | {"site-name"}
                for key, value in entry["config"].items():
                    values = value if isinstance(value, list) else [value]
                    if key.endswith("-ids") or key == "to":
                        assert all(isinstance(v, int) for v in values), key
                    elif key != "site-name":
                        assert all(BYTES.fullmatch(v) for v in values), key
            elif entry["phase"] == "deliver":
                assert entry["metrics"] == {"delivered": 1}
            else:
                assert set(entry["metrics"]) == RELEASED["query"]  # the inventory
    assert (
        masked_seen == 2 * (2 + 2 + 1) - 1
    )  # 2 sites x (train, evaluate) x 2 rounds + the test, less the crash
