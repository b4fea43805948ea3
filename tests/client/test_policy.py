"""The site policy: its file format, each bound, the default policy, the example file, and the refusal."""

from __future__ import annotations

import time
import tomllib
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from client.client_app import SiteError, make_client_app
from client.policy import (
    DEFAULT_SOURCE,
    LIMITS,
    RELEASE_KEYS,
    SECURE_KEY,
    WALL_TIME_KEY,
    Deadline,
    PolicyError,
    PolicyRefusal,
    ReleaseBounds,
    SitePolicy,
)
from common.config import RunConfig, SiteConfig, load_run_config
from server.strategy import short_reason

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "presets" / "site" / "policy.toml"
RUN_PRESETS = sorted(p for p in (ROOT / "presets").glob("*.toml") if p != EXAMPLE)


def write_policy(tmp_path: Path, text: str, name: str = "site-policy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_there_are_run_presets_to_check() -> None:
    assert {p.name for p in RUN_PRESETS} >= {"default.toml", "tiny.toml"}


@pytest.mark.parametrize("preset", RUN_PRESETS, ids=lambda p: p.name)
def test_the_example_and_the_default_policy_accept_every_preset(preset: Path) -> None:
    run = load_run_config(preset)
    assert SitePolicy.load(EXAMPLE).check(run) == []
    assert SitePolicy().check(run) == []


def test_the_example_and_the_default_accept_the_app_defaults() -> None:
    app_config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for policy in (SitePolicy.load(EXAMPLE), SitePolicy()):
        assert policy.check(app_config) == []
        assert policy.check(RunConfig()) == []


def test_the_example_sets_every_key() -> None:
    table = tomllib.loads(EXAMPLE.read_text())["limits"]
    assert set(table) == {*LIMITS, WALL_TIME_KEY, *RELEASE_KEYS, SECURE_KEY}
    policy = SitePolicy.load(EXAMPLE)
    assert policy.source == str(EXAMPLE) and policy.wall_time_s == table[WALL_TIME_KEY]
    assert policy.release == ReleaseBounds(table["min-release-hips"], table["max-release-bins"])


def test_default_policy_is_finite_and_named() -> None:
    for policy in (SitePolicy(), SitePolicy.load(None), SitePolicy.load("")):
        assert policy == SitePolicy()
        assert set(policy.limits) == set(LIMITS)
        assert all(0 < v < float("inf") for v in policy.limits.values())
        assert 0 < policy.wall_time_s < float("inf")
        assert policy.source == DEFAULT_SOURCE
        assert policy.release == ReleaseBounds(10, 20)
    (refused,) = SitePolicy().check(RunConfig(stage_epochs=1000))
    assert refused.key == "stage-epochs" and refused.bound == 50 and "built-in default" in str(refused)
    (single,) = SitePolicy().check(RunConfig(batch_size=1))
    assert single.key == "batch-size" and single.kind == "min"


@pytest.mark.parametrize("policy_key", sorted(LIMITS))
def test_each_bound(tmp_path: Path, policy_key: str) -> None:
    """Each bound refuses the value just past it, naming key, value, bound and file; lets its own value pass."""
    run_key, kind, _ = LIMITS[policy_key]
    path = write_policy(tmp_path, f"[limits]\n{policy_key} = 16\n")
    policy = SitePolicy.load(path)
    field = run_key.replace("-", "_")
    assert policy.check(RunConfig(**{field: 16})) == []
    past = 17 if kind == "max" else 15
    (violation,) = policy.check(RunConfig(**{field: past}))
    assert (violation.key, violation.requested, violation.bound, violation.source) == (
        run_key,
        past,
        16,
        path.name,
    )
    most = "at most" if kind == "max" else "at least"
    assert str(violation) == f"run-config {run_key} = {past}: its policy ({path.name}) allows {most} 16"


def test_keys_left_out_keep_the_defaults(tmp_path: Path) -> None:
    policy = SitePolicy.load(write_policy(tmp_path, "[limits]\nmax-stage-epochs = 5\n"))
    assert policy.limits["max-stage-epochs"] == 5
    defaults = SitePolicy()
    assert all(policy.limits[k] == defaults.limits[k] for k in LIMITS if k != "max-stage-epochs")
    assert policy.wall_time_s == defaults.wall_time_s
    assert SitePolicy.load(write_policy(tmp_path, "", "empty.toml")).limits == defaults.limits


def test_a_run_config_dict_is_checked_like_a_run_config(tmp_path: Path) -> None:
    policy = SitePolicy.load(write_policy(tmp_path, "[limits]\nmax-stage-epochs = 5\n"))
    (violation,) = policy.check({"stage-epochs": 50, "batch-size": "4"})
    assert violation.key == "stage-epochs" and violation.requested == 50


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[limits]\nmax-local-epochs = 5\n", "unknown key max-local-epochs in [limits]; known keys: max-"),
        ("max-stage-epochs = 5\n", "unknown key max-stage-epochs; the file holds one [limits] table"),
        ("[limit]\nmax-stage-epochs = 5\n", "unknown key limit"),
        ("limits = 5\n", "limits must be a table"),
        ("[limits\n", "is not valid TOML"),
        ("[limits]\nmax-stage-epochs = true\n", "max-stage-epochs = True is not a number"),
        ('[limits]\nmax-stage-epochs = "5"\n', "max-stage-epochs = '5' is not a number"),
        ("[limits]\nmax-stage-epochs = 2.5\n", "must be a whole number"),
        ("[limits]\nmax-hip-size = 0\n", "max-hip-size = 0 must be > 0"),
        ("[limits]\nmax-wall-time-s = -1\n", "max-wall-time-s = -1 must be > 0"),
        (
            "[limits]\nmin-batch-size = 64\nmax-batch-size = 32\n",
            "min-batch-size = 64 exceeds max-batch-size = 32",
        ),
        ("[limits]\nmax-batch-size = 8\n", "max-batch-size = 8 is below 16"),
        ("[limits]\nmax-release-bins = 1\n", "max-release-bins = 1 must be at least 2"),
        ("[limits]\nmin-release-hips = 0\n", "min-release-hips = 0 must be > 0"),
        ("[limits]\nmin-release-hips = 2.5\n", "must be a whole number"),
        (
            "[limits]\nmax-histogram-bins = 100\n",
            "max-histogram-bins is no longer a key; use max-release-bins",
        ),
    ],
)
def test_a_bad_file_is_refused_naming_file_and_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write_policy(tmp_path, text)
    with pytest.raises(PolicyError) as caught:
        SitePolicy.load(path)
    assert str(path) in str(caught.value) and expected in str(caught.value)


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found.*presets/site/policy.toml"):
        SitePolicy.load(tmp_path / "nope.toml")


def test_wall_time_may_be_fractional(tmp_path: Path) -> None:
    policy = SitePolicy.load(write_policy(tmp_path, "[limits]\nmax-wall-time-s = 90.5\n"))
    assert policy.wall_time_s == 90.5 and policy.deadline("north").seconds == 90.5


def test_refusal_names_site_key_value_bound_and_file(tmp_path: Path) -> None:
    path = write_policy(tmp_path, "[limits]\nmax-stage-epochs = 5\nmin-batch-size = 4\n")
    policy = SitePolicy.load(path)
    policy.enforce("site-01", RunConfig(stage_epochs=5, batch_size=4))  # in policy: nothing raised
    with pytest.raises(PolicyRefusal) as caught:
        policy.enforce("site-01", RunConfig(stage_epochs=50))
    assert (
        str(caught.value)
        == f"site site-01: refuses run-config stage-epochs = 50: its policy ({path.name}) allows at most 5"
    )
    assert str(tmp_path) not in str(caught.value)  # the file's folder stays at the site
    with pytest.raises(PolicyRefusal) as caught:
        policy.enforce("site-01", RunConfig(stage_epochs=50, batch_size=1))
    assert str(caught.value).endswith("allows at most 5; also batch-size = 1 (at least 4)")


def test_refusal_text_survives_the_servers_error_digest(tmp_path: Path) -> None:
    """Flower wraps the site's error as ``<class ...>:<'...'>``; the server keeps the site's line."""
    path = write_policy(tmp_path, "[limits]\nmax-stage-epochs = 5\nmin-batch-size = 4\n")
    with pytest.raises(PolicyRefusal) as caught:
        SitePolicy.load(path).enforce("site-01", RunConfig(stage_epochs=50, batch_size=1))
    text = str(caught.value)
    wrapped = f"<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: {text}'>"
    assert short_reason(wrapped) == text


def test_deadline_stops_a_task_that_ran_too_long() -> None:
    Deadline("north", 60.0, "p.toml").check("staging epoch 1/4: loss 1.0")  # within: nothing raised
    late = Deadline("north", 60.0, "p.toml", started=time.monotonic() - 61)
    with pytest.raises(PolicyRefusal) as caught:
        late.check("staging epoch 2/4: loss 0.9 acc 0.500")
    text = str(caught.value)
    assert text.startswith("site north: stopped after staging epoch 2/4: the task ran 61 s")
    assert "60 s its policy (p.toml) allows (max-wall-time-s)" in text and "loss" not in text


def test_site_config_reads_policy_file(tmp_path: Path) -> None:
    run = RunConfig()
    deployed = SiteConfig.from_node_config({"data-dir": str(tmp_path), "policy-file": "/etc/p.toml"}, run)
    assert deployed.policy_file == Path("/etc/p.toml")
    simulated = SiteConfig.from_node_config({"partition-id": 1, "policy-file": "p.toml"}, run)
    assert simulated.policy_file == Path("p.toml")
    for node_config in ({"data-dir": str(tmp_path), "policy-file": ""}, {"partition-id": 0}):
        assert SiteConfig.from_node_config(node_config, run).policy_file is None


def _train_message() -> Message:
    content = RecordDict({"config": ConfigRecord({"phase": "stage", "phase-round": 1})})
    metadata = Metadata(
        run_id=1,
        message_id="m1",
        src_node_id=0,
        dst_node_id=1,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=60.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content, metadata=metadata)


def _context(tmp_path: Path, policy: Path) -> Context:
    node = {"data-dir": str(tmp_path / "no-such-site"), "site-name": "north", "policy-file": str(policy)}
    return Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})


def test_client_app_refuses_before_touching_data(tmp_path: Path) -> None:
    """The refusal reaches the server as its own text; the site never looked for its data."""
    policy = write_policy(tmp_path, "[limits]\nmax-stage-epochs = 5\n")
    app = make_client_app({"stage-epochs": 50})
    with pytest.raises(SiteError) as caught:
        app(_train_message(), _context(tmp_path, policy))
    assert str(caught.value) == (
        f"site north: refuses run-config stage-epochs = 50: its policy ({policy.name}) allows at most 5"
    )


def test_client_app_reports_a_bad_policy_file(tmp_path: Path) -> None:
    policy = write_policy(tmp_path, "[limits]\nmax-epochs = 5\n")
    with pytest.raises(SiteError) as caught:
        make_client_app()(_train_message(), _context(tmp_path, policy))
    assert str(caught.value).startswith(
        f"site north: refuses every task: site policy {policy.name}: unknown key max-epochs"
    )
    assert str(tmp_path) not in str(caught.value)


def test_release_bounds_coarsen_and_withhold(tmp_path: Path) -> None:
    """The release bounds are applied at the site, never refused: any histogram-bins is accepted."""
    policy = SitePolicy.load(write_policy(tmp_path, "[limits]\nmin-release-hips = 4\nmax-release-bins = 8\n"))
    assert policy.release == ReleaseBounds(min_hips=4, max_bins=8)
    assert policy.check(RunConfig(histogram_bins=100_000)) == []
    assert [policy.release.bins(b) for b in (2, 8, 9, 1000)] == [2, 8, 8, 8]
    assert [policy.release.withholds(n) for n in (0, 3, 4, 40)] == [True, True, False, False]


def test_a_site_that_requires_secure_aggregation_refuses_a_plain_request(tmp_path: Path) -> None:
    """The server cannot switch masking off for a site that requires it: the plain request is
    refused before any data are read, naming the policy file by its name only."""
    policy = write_policy(tmp_path, "[limits]\nrequire-secure-aggregation = true\n")
    assert SitePolicy.load(policy).require_secure_aggregation
    with pytest.raises(SiteError) as caught:
        make_client_app({"secure-aggregation": False})(_train_message(), _context(tmp_path, policy))
    assert str(caught.value) == (
        f"site north: refuses training without secure aggregation (require-secure-aggregation in "
        f"{policy.name}); run with secure-aggregation = true"
    )
    bad = write_policy(tmp_path, "[limits]\nrequire-secure-aggregation = 1\n", name="bad.toml")
    with pytest.raises(PolicyError, match="must be true or false"):
        SitePolicy.load(bad)
