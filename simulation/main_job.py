"""``onfh simulate``: the main job. A federation of synthetic hospitals, in one command.

1. writes (or reuses) the synthetic hospitals as DICOM + labels CSV,
2. preprocesses every site into its cache (each site's own data only),
3. runs both federated phases in Flower's simulation runtime (Ray backend),
4. trains the centralized (pooled) and local-only baselines on the same splits,
and prints per-site and pooled test macro AUROC side by side, written as JSON, Markdown and a
PNG beside the run's results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

from common.config import RunConfig, load_run_config  # noqa: E402
from common.progress import progress_bar  # noqa: E402
from simulation.baselines import run_baselines  # noqa: E402
from simulation.comparison import pooled_intervals, report  # noqa: E402
from simulation.phantom.difficulty import add_difficulty_option  # noqa: E402

log = logging.getLogger("onfh.simulate")
PRESET = Path(__file__).resolve().parent.parent / "presets" / "default.toml"


class _NoRunSimulationNotice(logging.Filter):
    """Drops Flower's notice that ``run_simulation`` is deprecated (Flower 1.42 has no in-process
    successor; ``flwr run`` needs a SuperLink). Every other Flower record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            str(record.msg).startswith("DEPRECATED FEATURE")
            and any("`run_simulation`" in str(arg) for arg in record.args or ())
        )


@contextmanager
def _quiet_third_party() -> Iterator[None]:
    """Silence the two notices a user cannot act on, precisely: Flower's deprecation of
    ``run_simulation`` (a log record) and Ray's FutureWarnings from ``ray.init``."""
    notice = _NoRunSimulationNotice()
    flower = logging.getLogger("flwr")
    flower.addFilter(notice)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"ray\._private\.worker")
            yield
    finally:
        flower.removeFilter(notice)


def backend_config(n_sites: int, ray_address: str | None = None) -> dict:
    """Flower's Ray backend settings; ``init_args`` are passed to ``ray.init`` as they are."""
    import torch

    # One CPU per simulated site; with a GPU, two sites share it (training uses AMP there).
    resources = {"num_cpus": 1, "num_gpus": 0.5 if torch.cuda.is_available() else 0.0}
    if ray_address:
        # Ray refuses num_cpus when joining a cluster: the cluster's own resources apply.
        return {"client_resources": resources, "init_args": {"address": ray_address}}
    return {"client_resources": resources, "init_args": {"num_cpus": min(os.cpu_count() or 1, n_sites)}}


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for _ in path.open())
    except OSError:
        return 0


@contextmanager
def _rounds_bar(cfg: RunConfig) -> Iterator[None]:
    """A bar over the run's rounds, advanced as the server appends them to ``metrics.jsonl``."""
    total = (cfg.pretrain_rounds if cfg.pretrained else 0) + cfg.stage_rounds
    metrics, stop = cfg.run_dir / "metrics.jsonl", threading.Event()
    with progress_bar("federated rounds", total) as bar:
        seen = _count_lines(metrics)  # a resumed run keeps its earlier lines

        def watch() -> None:
            nonlocal seen
            while not stop.wait(1.0):
                now = _count_lines(metrics)
                bar.advance(now - seen)
                seen = now

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            yield
        finally:
            stop.set()
            watcher.join()


def run_federated(
    cfg: RunConfig, n_sites: int, ray_address: str | None = None, site_policy: str | Path | None = None
) -> dict:
    """Both phases in Flower's simulation runtime; returns the server's results.json content.

    ``ray_address`` joins an existing Ray cluster (``ray start --head`` on one machine, ``ray
    start --address`` on the others) instead of starting Ray on this machine. ``site_policy``: the
    policy file of every simulated site (client/policy.py; default: the built-in policy).
    """
    from flwr.simulation import run_simulation

    from client.client_app import make_client_app
    from server.server_app import make_server_app

    overrides = cfg.to_dict()
    with _quiet_third_party(), _rounds_bar(cfg):
        run_simulation(
            server_app=make_server_app(overrides),
            client_app=make_client_app(overrides, str(site_policy) if site_policy else None),
            num_supernodes=n_sites,
            backend_config=backend_config(n_sites, ray_address),
        )
    results_path = cfg.run_dir / "results.json"
    if not results_path.exists():
        raise RuntimeError(f"the federated run ended without writing {results_path}; see the log above")
    return json.loads(results_path.read_text())


def _preprocess_site(site_dir: Path, cfg: RunConfig) -> str:
    import torch

    from common.sitedata.load import load_site

    torch.set_num_threads(1)
    t0 = time.time()
    data = load_site(
        site_dir,
        Path(cfg.cache_dir) / site_dir.name,
        cfg.preprocess,
        split_seed=cfg.split_seed,
        fractions=cfg.split,
        name=site_dir.name,
        progress=lambda m: print("      " + m, flush=True),
    )
    return (
        f"{site_dir.name}: {data.stats['hips']} hips ({len(data.staging_set('train')[2])} labelled train, "
        f"{len(data.staging_set('test')[2])} labelled test), {len(data.pairs_mr)} MR-CT pairs, "
        f"{len(data.problems.warnings)} warnings, {time.time() - t0:.0f}s"
    )


def preprocess_sites(cfg: RunConfig, site_dirs: list[Path], workers: int = 2) -> None:
    """Fill every site's cache, one process per site at a time (each site sees only its own data)."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from multiprocessing import get_context

    with (
        ProcessPoolExecutor(
            max_workers=min(workers, len(site_dirs)), mp_context=get_context("spawn")
        ) as pool,
        progress_bar("preprocessing sites", len(site_dirs)) as bar,
    ):
        for future in as_completed([pool.submit(_preprocess_site, d, cfg) for d in site_dirs]):
            print("      " + future.result(), flush=True)
            bar.advance()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onfh simulate",
        description="The main job: a federation of synthetic hospitals, in one command.",
    )
    parser.add_argument("--sites", type=int, default=4, help="synthetic hospitals (default 4)")
    parser.add_argument("--patients", type=int, default=30, help="patients per hospital (default 30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=("default", "tiny"), default="default", help="phantom image size")
    add_difficulty_option(parser)
    parser.add_argument(
        "--data", type=Path, default=Path("data/federation"), help="where the hospitals are written"
    )
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="TOML preset of run-config keys (default presets/default.toml)",
    )
    parser.add_argument("--run-name", default=None, help="output folder name under outputs/ (default: dated)")
    parser.add_argument(
        "--resume", action="store_true", help="continue run --run-name from its last checkpoint"
    )
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip the centralized and local-only baselines"
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDRESS",
        help="join an existing Ray cluster (e.g. HEAD_IP:6379, or 'auto') instead of starting Ray here",
    )
    return parser


def simulate_config(args: argparse.Namespace) -> RunConfig:
    """The run settings of ``onfh simulate ARGS``: the preset, then the command line's choices.

    Raises:
        ValueError: the preset or a value is invalid (the message names it).
    """
    preset = args.config or PRESET
    return load_run_config(
        preset if preset.exists() else None,
        seed=args.seed,
        data_root=str(args.data.resolve()),
        run_name=args.run_name or time.strftime("simulate-%Y%m%d-%H%M%S"),
        resume=args.resume,
        cache_dir=str(Path(".cache/onfh").resolve()),
        output_dir=str(Path("outputs").resolve()),
    )


def _log_progress_lines() -> None:
    """Our own progress lines; Flower's logger prints its own (a root handler would print it twice)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S"))
    onfh_log = logging.getLogger("onfh")
    onfh_log.addHandler(handler)
    onfh_log.setLevel(logging.INFO)
    onfh_log.propagate = False


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _log_progress_lines()
    from simulation.synth.federation import generate_federation

    started = time.time()
    if args.resume and not args.run_name:
        print("onfh simulate: --resume needs --run-name of the interrupted run", file=sys.stderr)
        return 2
    try:
        cfg = simulate_config(args)
    except ValueError as exc:
        print(f"onfh simulate: {exc}", file=sys.stderr)
        return 2

    print(
        f"[1/4] synthetic hospitals: {args.sites} sites x {args.patients} patients, "
        f"{args.difficulty} phantom -> {args.data}"
    )
    generate_federation(
        args.data,
        sites=args.sites,
        patients=args.patients,
        seed=args.seed,
        size=args.size,
        difficulty=args.difficulty,
    )
    site_dirs = sorted(p for p in args.data.iterdir() if p.is_dir() and p.name.startswith("site-"))
    compare(cfg, site_dirs[: args.sites], args.ray_address, baselines=not args.no_baselines, started=started)
    return 0


def compare(
    cfg: RunConfig,
    site_dirs: list[Path],
    ray_address: str | None = None,
    baselines: bool = True,
    started: float = 0.0,
) -> list:
    """Steps 2-4 of the main job on a written federation: preprocessing, the federated run, the
    baselines, and the report (tables, PNGs, comparison.json in the run folder); returns the files
    the report wrote."""
    started = started or time.time()
    print("[2/4] preprocessing each site into its own cache (sites side by side, as in a real federation)")
    preprocess_sites(cfg, site_dirs)

    where = f"Ray cluster {ray_address}" if ray_address else "Ray on this machine"
    print(
        f"[3/4] federated training in Flower's simulation runtime ({cfg.strategy}, "
        f"{cfg.pretrain_rounds} pretraining + {cfg.stage_rounds} staging rounds, {where}) -> {cfg.run_dir}"
    )
    t0 = time.time()
    federated = run_federated(cfg, len(site_dirs), ray_address)
    fed_seconds = time.time() - t0

    central: dict = {}
    local: dict[str, dict] = {}
    if baselines:
        print("[4/4] centralized and local-only baselines on the same splits", flush=True)
        central, local = run_baselines(cfg, site_dirs)
    intervals = pooled_intervals(cfg, site_dirs, central, local)
    seconds = {"federated": fed_seconds, "total": time.time() - started}
    return report(cfg, federated, central, local, seconds, intervals)


if __name__ == "__main__":
    sys.exit(main())
