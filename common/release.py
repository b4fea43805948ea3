"""The app bundle of a release: what ``onfh run submit`` stages and what a site approves.

``stage_app`` copies only the Python code of the project's packages and writes a generated
pyproject.toml whose ``[tool.flwr.app.config]`` lists every run setting with its default (so any
preset key is accepted by the SuperLink). The staged folder, and hence the bundle Flower builds
from it, depends on the release's code only: run settings travel beside the bundle
(``--run-config``), never inside it, so one release has one bundle digest whatever the preset.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path
from typing import Any

from common.config import RunConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def stage_app(source: Path, into: Path) -> Path:
    """Copy the app's Python packages from ``source`` into ``into`` and write its pyproject.toml.

    The generated ``[tool.flwr.app.config]`` is every ``RunConfig`` key with the source
    pyproject's values over the defaults, so every preset key is a known run-config key.
    Returns ``into``.
    """
    into.mkdir(parents=True, exist_ok=True)
    pyproject = tomllib.loads((source / "pyproject.toml").read_text())
    project, flwr_app = pyproject["project"], pyproject["tool"]["flwr"]["app"]
    packages = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["packages"]
    for package in packages:
        shutil.copytree(
            source / package,
            into / package,
            dirs_exist_ok=True,
            ignore=lambda folder, names: [
                n
                for n in names
                if not (n.endswith(".py") or (Path(folder) / n).is_dir()) or n == "__pycache__"
            ],
        )
    config = {**RunConfig().to_dict(), **flwr_app.get("config", {})}
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f"name = {json.dumps(project['name'])}",
        f"version = {json.dumps(project['version'])}",
        f"description = {json.dumps(project.get('description', project['name']))}",
        f"license = {json.dumps(project.get('license', 'Apache-2.0'))}",
        "dependencies = []  # installed at every site beforehand; runs never install anything",
        "",
        "[tool.hatch.build.targets.wheel]",
        f"packages = {json.dumps(packages)}",
        "",
        "[tool.flwr.app]",
        f"publisher = {json.dumps(flwr_app['publisher'])}",
        "",
        "[tool.flwr.app.components]",
        *(f"{k} = {json.dumps(v)}" for k, v in flwr_app["components"].items()),
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {toml_value(v)}" for k, v in config.items()),
        "",
    ]
    (into / "pyproject.toml").write_text("\n".join(lines))
    return into
