"""The typed run config: defaults match pyproject, bad values are named with the fix."""

import tomllib
from pathlib import Path

import pytest

from common.config import RunConfig, SiteConfig

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
