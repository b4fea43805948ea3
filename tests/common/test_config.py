"""The typed run config: defaults match pyproject, bad values are named with the fix."""

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from common.config import (
    ENCODER_PRESET_NAMES,
    FUSION_NAMES,
    NORM_NAMES,
    RunConfig,
    SiteConfig,
    load_run_config,
)

ROOT = Path(__file__).resolve().parents[2]


def test_pyproject_config_is_valid_and_complete():
    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    cfg = RunConfig.from_dict(raw)
    # `flwr run --run-config` only overrides keys that pyproject declares: declare them all.
    assert set(raw) == set(RunConfig().to_dict())
    assert cfg.strategy == "fedavg" and cfg.model_preset == "cpu-small"
    for preset in (ROOT / "presets").glob("*.toml"):
        RunConfig.from_dict(tomllib.loads(preset.read_text()))


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"strategy": "fedfoo"}, "run config 'strategy' = 'fedfoo' is invalid"),
        ({"stage-epochs": 0}, "'stage-epochs' = 0 is invalid"),
        ({"no-such-key": 1}, "unknown run config key 'no-such-key'"),
        ({"update-dtype": "int8"}, "use 'float32' or 'float16'"),
        (
            {"pretrain-target": "ct-blind"},
            "'pretrain-target' = 'ct-blind' is invalid: use one of ct, mr-denoise",
        ),
        ({"split-fractions": "0.6,0.2"}, "'split-fractions' = '0.6,0.2' is invalid: give train,val,test"),
        ({"split-fractions": "0.5,0.5,0"}, "'split-fractions' = '0.5,0.5,0' is invalid"),
        ({"split-fractions": "a,b,c"}, "'split-fractions' = 'a,b,c' is invalid"),
    ],
)
def test_bad_values_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        RunConfig.from_dict(raw)


def test_site_config_from_deployment_and_simulation(tmp_path):
    cfg = RunConfig(data_root=str(tmp_path))
    site = SiteConfig.from_node_config({"data-dir": str(tmp_path / "h1"), "site-name": "north"}, cfg)
    assert (site.site_name, site.data_dir) == ("north", tmp_path / "h1")
    sim = SiteConfig.from_node_config({"partition-id": 3, "num-partitions": 4}, cfg)
    assert (sim.site_name, sim.data_dir) == ("site-03", tmp_path / "site-03")
    with pytest.raises(ValueError, match="data-dir"):
        SiteConfig.from_node_config({}, cfg)


def test_settings_import_no_torch():
    # Settings are read and validated before any network is built (CLI, server, presets).
    code = "import common.config, sys; assert 'torch' not in sys.modules, 'common.config imports torch'"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_model_names_equal_the_models_tables():
    from common.models.blocks import NORMS
    from common.models.encoder import ENCODER_PRESETS
    from common.models.staging import FUSIONS

    assert ENCODER_PRESET_NAMES == tuple(ENCODER_PRESETS)
    assert FUSION_NAMES == FUSIONS
    assert NORM_NAMES == NORMS


# Where a run writes and what it is called differ on purpose between the three.
PER_RUN_KEYS = {"run-name", "data-root", "cache-dir", "output-dir", "resume"}


def test_one_run_budget_flwr_run_preset_and_main_job_agree():
    from simulation.main_job import build_parser, simulate_config

    raw = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    flwr_run = RunConfig.from_dict(raw).to_dict()
    preset = load_run_config(ROOT / "presets" / "default.toml").to_dict()
    main_job = simulate_config(build_parser().parse_args([])).to_dict()
    defaults = RunConfig().to_dict()  # what `onfh train` and code that builds a RunConfig get
    for name, cfg in (("pyproject.toml", flwr_run), ("onfh simulate", main_job), ("RunConfig()", defaults)):
        differ = {k: (cfg[k], preset[k]) for k in preset if k not in PER_RUN_KEYS and cfg[k] != preset[k]}
        assert not differ, f"{name} differs from presets/default.toml: {differ}"


def test_ray_address_joins_a_cluster_without_local_resources():
    from simulation.main_job import backend_config

    local = backend_config(4)
    assert "address" not in local["init_args"] and local["init_args"]["num_cpus"] >= 1
    cluster = backend_config(4, "10.0.0.1:6379")
    # ray.init refuses num_cpus/num_gpus when it joins an existing cluster
    assert cluster["init_args"] == {"address": "10.0.0.1:6379"}
    assert cluster["client_resources"] == local["client_resources"]


def test_split_fractions_are_read_as_numbers():
    assert RunConfig().split == (0.6, 0.2, 0.2)
    assert RunConfig.from_dict({"split-fractions": "0.35,0.1,0.55"}).split == (0.35, 0.1, 0.55)


def test_cosine_schedule_decays_the_staging_rate_from_stage_lr_to_a_tenth():
    cfg = RunConfig(stage_lr_schedule="cosine", stage_rounds=8, stage_lr=1e-3)
    rates = [cfg.stage_training(0, r).lr for r in range(1, 9)]
    assert rates[0] == pytest.approx(1e-3) and rates[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert cfg.stage_training(0).lr == 1e-3  # centralized training: no rounds
    assert RunConfig(stage_lr_schedule="constant").stage_training(0, 8).lr == RunConfig().stage_lr
    with pytest.raises(ValueError, match="'stage-lr-schedule' = 'step' is invalid"):
        RunConfig(stage_lr_schedule="step")
