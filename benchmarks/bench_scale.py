"""Scale benchmark: 4, 8 and 16 simulated hospitals on this machine, round time and peak memory.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_scale            # 4, 8, 16 sites x 4 patients, tiny
    .venv/bin/python -m benchmarks.bench_scale --quick    # smoke: 2 and 4 sites

What it measures: for each site count N the federation (``presets/tiny.toml``: 1 pretraining and
1 staging round, tiny hips; synthetic hospitals of ``size="tiny"``, 4 patients each) runs in
Flower's simulation runtime in a fresh child process (``python -m benchmarks.bench_scale --one N``),
as ``onfh simulate --no-baselines`` would run it: Ray with min(CPUs, N) actors of one CPU each.
The hospitals are written and preprocessed once beforehand (sites ``site-00`` .. ``site-{N-1}`` of
one federation; not timed), so the runs measure the federation only.

- **Round time**: per phase, the server's wall clock of the round (``seconds.round`` of the
  strategy's per-round record: configure_train to the end of aggregate_evaluate) plus what the
  server does after it (``on-round-end``: metrics line, checkpoint); and the whole federated run
  (Ray start, inventory, both phases, final test, shutdown).
- **Peak memory** of the whole process tree (the child, Ray's GCS and raylet, its workers and
  actors: separate processes), sampled every ``--interval`` seconds from ``/proc``: the sum of
  PSS (``/proc/PID/smaps_rollup``: shared pages such as Ray's object store and libraries split
  between the processes that map them) and, for comparison, the sum of RSS (counts shared pages
  once per process, so it overstates). Peaks shorter than the interval can be missed.
- **Growth**: the ratio from N to 2N sites of each figure (2.0 = linear in the number of sites).

Prints the tables and the headline last, and writes JSON (default ``benchmarks/results/scale.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from benchmarks.harness import (
    PRESETS,
    ROOT,
    Federation,
    command,
    machine,
    markdown,
    prepare_federation,
    quiet_progress,
    run_fresh,
    write_json,
)

PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


# -- process-tree memory from /proc ------------------------------------------------------------------
def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, now."""
    children, out, todo = _children_map(), [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _memory_kb(pid: int) -> tuple[int, int | None, str] | None:
    """(RSS kB, PSS kB or None, command name) of a process, or None when it is gone."""
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except (OSError, ValueError, IndexError):
        return None
    pss = None
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                pss = int(line.split()[1])
                break
    except OSError:
        pass
    return rss, pss, name


class TreeSampler(threading.Thread):
    """Samples the memory of a process tree until stopped; keeps the peaks."""

    def __init__(self, root: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stop_event = threading.Event()
        self.samples = 0
        self.peak_rss_kb = self.peak_pss_kb = self.max_processes = 0
        self.pss_complete = True
        self.at_peak: dict = {}

    def run(self) -> None:
        while not self.stop_event.is_set():
            rows = [m for m in (_memory_kb(p) for p in process_tree(self.root)) if m is not None]
            if rows:
                self.samples += 1
                rss = sum(r for r, _, _ in rows)
                pss = sum(p if p is not None else r for r, p, _ in rows)
                self.pss_complete &= all(p is not None for _, p, _ in rows)
                self.max_processes = max(self.max_processes, len(rows))
                self.peak_rss_kb = max(self.peak_rss_kb, rss)
                if pss > self.peak_pss_kb:
                    self.peak_pss_kb = pss
                    by_name: Counter = Counter()
                    count: Counter = Counter()
                    for r, p, name in rows:
                        by_name[name] += p if p is not None else r
                        count[name] += 1
                    self.at_peak = {
                        "processes": len(rows),
                        "by-command": {
                            k: {"processes": count[k], "pss-mb": round(v / 1024, 1)}
                            for k, v in by_name.most_common()
                        },
                    }
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


# -- one federated run (child process) --------------------------------------------------------------
def one_run(args) -> int:
    """``--one N``: the federation of the first N sites; writes its figures to ``--result``."""
    from common.config import load_run_config

    cfg = load_run_config(
        args.config,
        seed=args.seed,
        data_root=str(args.data.resolve()),
        cache_dir=str(args.cache.resolve()),
        output_dir=str(args.work.resolve()),
        run_name=f"scale-{args.one}",
        resume=False,
    )
    fed, seconds = run_fresh(cfg, args.one)
    rounds = {
        phase: [
            {
                "round": e["round"],
                "seconds": e.get("seconds", {}),
                "site-train-seconds": e.get("site-train-seconds", {}),
                "train-sites": e.get("train-sites"),
            }
            for e in fed["history"].get(phase, [])
        ]
        for phase in ("pretrain", "stage")
    }
    args.result.write_text(
        json.dumps(
            {
                "sites": args.one,
                "federated-seconds": seconds,
                "server-wall-seconds": fed.get("wall-seconds"),
                "rounds": rounds,
                "failures": fed.get("failures", []),
                "test-hips": fed.get("test", {}).get("n-hips"),
            }
        )
    )
    return 0


def measure(n_sites: int, args, preset: Path) -> dict:
    """Run ``--one n_sites`` in a child process while sampling its process tree."""
    result = args.work / f"scale-{n_sites}.result.json"
    result.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.bench_scale",
        "--one",
        str(n_sites),
        "--result",
        str(result),
        "--data",
        str(args.data),
        "--cache",
        str(args.cache),
        "--work",
        str(args.work),
        "--seed",
        str(args.seed),
        "--config",
        str(preset),
    ]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    sampler = TreeSampler(proc.pid, args.interval)
    sampler.start()
    rc = proc.wait()
    sampler.stop()
    wall = time.time() - t0
    if rc != 0 or not result.exists():
        raise RuntimeError(f"the run with {n_sites} sites failed (exit code {rc}); see its output above")
    out = json.loads(result.read_text())
    out.update(
        {
            "child-process-seconds": wall,
            "peak-pss-mb": sampler.peak_pss_kb / 1024,
            "peak-rss-sum-mb": sampler.peak_rss_kb / 1024,
            "pss-complete": sampler.pss_complete,
            "max-processes": sampler.max_processes,
            "at-peak": sampler.at_peak,
            "samples": sampler.samples,
        }
    )
    return out


def _round_seconds(run: dict, phase: str) -> float | None:
    entries = run["rounds"].get(phase, [])
    if not entries:
        return None
    return sum(e["seconds"].get("round", 0) + e["seconds"].get("on-round-end", 0) for e in entries) / len(
        entries
    )


RUNS_HEADER = [
    "sites",
    "pretrain round s (1st round: actors warm up)",
    "stage round s",
    "stage round s per site",
    "federated run s",
    "peak memory MB (PSS, tree)",
    "peak RSS sum MB",
    "processes (max)",
]
GROWTH_HEADER = ["sites", "pretrain round", "stage round", "federated run", "peak memory (PSS)"]
FIGURES = ("pretrain-round", "stage-round", "federated-run", "peak-pss")


def _figures(run: dict) -> dict[str, float | None]:
    return {
        "pretrain-round": _round_seconds(run, "pretrain"),
        "stage-round": _round_seconds(run, "stage"),
        "federated-run": run["federated-seconds"],
        "peak-pss": run["peak-pss-mb"],
    }


def _per_doubling(a: dict, b: dict) -> dict[str, float | None]:
    """Growth of each figure from run ``a`` to run ``b``, per doubling of the sites (x2.00 = linear)."""
    doublings = math.log2(b["sites"] / a["sites"]) if b["sites"] > a["sites"] else None
    fa, fb = _figures(a), _figures(b)
    return {
        k: None if doublings is None or not fa[k] or fb[k] is None else (fb[k] / fa[k]) ** (1 / doublings)
        for k in FIGURES
    }


def _row(run: dict) -> list:
    pre, stage = _round_seconds(run, "pretrain"), _round_seconds(run, "stage")
    return [
        run["sites"],
        "-" if pre is None else f"{pre:.1f}",
        "-" if stage is None else f"{stage:.1f}",
        "-" if stage is None else f"{stage / run['sites']:.2f}",
        f"{run['federated-seconds']:.1f}",
        f"{run['peak-pss-mb']:,.0f}",
        f"{run['peak-rss-sum-mb']:,.0f}",
        run["max-processes"],
    ]


def summarise(results: dict) -> None:
    """Add the growth figures and the tables to ``results``."""
    runs = results["runs"]
    growth, growth_rows = [], []
    for a, b in zip(runs, runs[1:], strict=False):
        fa, fb = _figures(a), _figures(b)
        g = {"from": a["sites"], "to": b["sites"]}
        g.update({k: None if not fa[k] or fb[k] is None else fb[k] / fa[k] for k in FIGURES})
        g["per-doubling"] = _per_doubling(a, b)
        growth.append(g)
        growth_rows.append(
            [f"{a['sites']} -> {b['sites']}"]
            + ["-" if v is None else f"x{v:.2f}" for v in g["per-doubling"].values()]
        )
    results["growth"] = growth
    results["growth-overall-per-doubling"] = _per_doubling(runs[0], runs[-1])
    results["tables"] = {
        "runs": {"header": RUNS_HEADER, "rows": [_row(r) for r in runs]},
        "growth": {"header": GROWTH_HEADER, "rows": growth_rows},
    }


def report(results: dict, patients: int, out: Path) -> None:
    tables, first, last = results["tables"], results["runs"][0], results["runs"][-1]
    print(f"\nScale on {os.cpu_count()} CPUs ({patients} patients per site, tiny, 1 round per phase):\n")
    print(markdown(tables["runs"]["header"], tables["runs"]["rows"]))
    print("\nGrowth per doubling of the sites (x2.00 = linear):\n")
    print(markdown(tables["growth"]["header"], tables["growth"]["rows"]))
    peak = last["at-peak"].get("by-command", {})
    print(
        f"\nAt the memory peak with {last['sites']} sites, PSS by command: "
        + ", ".join(f"{name} {v['pss-mb']:,.0f} MB ({v['processes']} processes)" for name, v in peak.items())
    )
    o = results["growth-overall-per-doubling"]

    def x(v: float | None) -> str:
        return "-" if v is None else f"x{v:.2f}"

    print(
        f"\nheadline: from {first['sites']} to {last['sites']} sites, a staging round grows {x(o['stage-round'])} per "
        f"doubling ({_round_seconds(first, 'stage'):.1f} s -> {_round_seconds(last, 'stage'):.1f} s), the whole "
        f"federated run {x(o['federated-run'])} ({first['federated-seconds']:.0f} s -> {last['federated-seconds']:.0f} s), "
        f"peak memory of the process tree {x(o['peak-pss'])} ({first['peak-pss-mb']:,.0f} MB -> "
        f"{last['peak-pss-mb']:,.0f} MB PSS) (load average {results['load_average_start'][0]:.1f}) -> {out}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: 2 and 4 sites")
    parser.add_argument("--sites", type=int, nargs="+", default=None, help="site counts (default 4 8 16)")
    parser.add_argument("--patients", type=int, default=4, help="patients per site (default 4)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scale.json"))
    parser.add_argument(
        "--data", type=Path, default=None, help="federation folder (default /tmp/onfh-bench/fed-scale-NxP)"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="cache root (default /tmp/onfh-bench/cache-scale-NxP)"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/onfh-bench/runs"), help="run outputs")
    parser.add_argument("--config", type=Path, default=PRESETS / "tiny.toml", help="run-config preset")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interval", type=float, default=0.25, help="memory sampling interval, seconds")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child: one run
    parser.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quiet_progress()
    if args.one is not None:
        return one_run(args)

    started = time.time()
    counts = sorted(args.sites or ([2, 4] if args.quick else [4, 8, 16]))
    # One folder per federation size: the generator rewrites a folder holding other parameters.
    args.data = args.data or Path(f"/tmp/onfh-bench/fed-scale-{max(counts)}x{args.patients}")
    args.cache = args.cache or Path(f"/tmp/onfh-bench/cache-scale-{max(counts)}x{args.patients}")
    # The largest federation once; smaller runs use its first N sites.
    args.work.mkdir(parents=True, exist_ok=True)
    fed = Federation(max(counts), args.patients, "tiny", args.config, args.data, args.cache)
    prepare_federation(fed, args.work, args.seed)
    results: dict = {
        "command": command("bench_scale", argv),
        **machine(),
        "federation": {
            "data": str(args.data),
            "patients-per-site": args.patients,
            "size": "tiny",
            "seed": args.seed,
        },
        "preset": str(args.config),
        "memory-method": f"sum over the run's process tree of PSS (/proc/PID/smaps_rollup), sampled every "
        f"{args.interval} s; RSS sum beside",
        "runs": [],
    }
    for n in counts:
        print(f"\n=== {n} sites ===", flush=True)
        results["runs"].append(measure(n, args, args.config))
        write_json(args.out, results)
    summarise(results)
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    write_json(args.out, results)
    report(results, args.patients, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
