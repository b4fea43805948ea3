"""What ``onfh run submit`` bundles: only code and a pyproject listing every run setting; never a key."""

from __future__ import annotations

import io
import shutil
import tomllib
import zipfile
from pathlib import Path

import pytest
from flwr.cli.build import build_fab_from_disk

from common import release
from common.config import RunConfig
from server import runs
from tests.deployment.kits import make_federation

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture
def app_with_kits_inside(tmp_path) -> Path:
    """A copy of the project's app whose folders also hold a full set of kits (the worst case)."""
    app = tmp_path / "app"
    app.mkdir()
    shutil.copy(PROJECT / "pyproject.toml", app / "pyproject.toml")
    for package in ("common", "client", "server", "simulation"):
        shutil.copytree(PROJECT / package, app / package, ignore=shutil.ignore_patterns("__pycache__"))
    make_federation(app / "kits", "127.0.0.1:9092", ["site-a", "site-b"])
    make_federation(app / "server" / "kits", "127.0.0.1:9092", ["site-c"])
    return app


def test_bundle_holds_no_private_key(app_with_kits_inside, tmp_path):
    staged = release.stage_app(app_with_kits_inside, tmp_path / "staged")
    fab = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(staged)))
    names = fab.namelist()
    assert "server/server_app.py" in names and "client/client_app.py" in names
    assert not [n for n in names if "kits" in n or n.endswith((".key", ".pem", ".pub"))]
    keys = [p.read_bytes() for p in app_with_kits_inside.rglob("*.key")]
    assert len(keys) == 9  # 2 CA keys, 2 server keys, 3 site keys, 2 admin keys
    for name in names:
        content = fab.read(name)
        assert b"PRIVATE KEY" not in content, name
        for key in keys:
            body = key.splitlines()[1]  # first line of the base64 body
            assert body not in content, name


def test_staged_pyproject_accepts_every_preset_key(tmp_path):
    staged = release.stage_app(PROJECT, tmp_path / "staged")
    pyproject = tomllib.loads((staged / "pyproject.toml").read_text())
    config = pyproject["tool"]["flwr"]["app"]["config"]
    assert set(config) == set(RunConfig().to_dict())
    assert config["run-name"] == "run"  # the project's pyproject wins over dataclass defaults
    assert pyproject["tool"]["flwr"]["app"]["components"]["serverapp"] == "server.server_app:app"
    assert pyproject["project"]["dependencies"] == []
    for preset in (PROJECT / "presets").glob("*.toml"):
        assert set(tomllib.loads(preset.read_text())) <= set(config), preset.name


def test_run_config_is_checked_before_submitting(tmp_path):
    merged = runs.merged_run_config([PROJECT / "presets" / "tiny.toml"], ["run-name='x' min-sites=2"])
    assert merged["hip-size"] == 32 and merged["min-sites"] == 2 and merged["run-name"] == "x"
    with pytest.raises(ValueError, match="unknown run config key 'hip-sizes'"):
        runs.merged_run_config([], ["hip-sizes=3"])
    with pytest.raises(FileNotFoundError, match="preset"):
        runs.merged_run_config([tmp_path / "missing.toml"], [])
