"""The ServerApp: a thin Flower shell over :func:`server.federation.run_federation`."""

from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from common.config import RunConfig
from server.federation import run_federation
from server.prompt_grid import PromptGrid

log = logging.getLogger("onfh.server")


def make_server_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    """A ServerApp whose run config is pyproject's ``[tool.flwr.app.config]`` plus ``overrides``."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        logging.getLogger("onfh").setLevel(logging.INFO)
        cfg = RunConfig.from_dict({**dict(context.run_config), **(overrides or {})})
        try:
            run_federation(PromptGrid(grid), cfg)  # replies every 0.1 s, not Flower's 3 s
        except Exception:
            log.exception("the federated run stopped")  # Flower's runtime would otherwise hide it
            raise

    return app


app = make_server_app()
