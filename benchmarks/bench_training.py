"""Training benchmark: throughput and data-wait share of cpu-small, and per preset the parameters,
FLOPs and peak memory of both networks.

Usage (from the repository root):
    .venv/bin/python -m benchmarks.bench_training            # full (vgg16 at the paper-like grid too)
    .venv/bin/python -m benchmarks.bench_training --quick    # smoke: fewer hips, no paper-like grid

What it measures:

- **Throughput** (cpu-small, default grid P=5, K=8, 48x48): ``train_staging`` on random hips
  (all protocols available, augmentation on, ``num_workers=0``, batch 8) in hips per second,
  and ``train_translation`` in slice pairs per second; with ``data_wait_share``, the share of
  the loop spent blocked on the DataLoader (issue 3's target: < 10 %). Augmentation runs on
  whole batches inside the step (``common.training.augmentation``); its share of a step is timed
  apart (20 calls on one batch) and reported beside.
- **Layouts**: the same two loops with the conv weights channels-last (what the builders return)
  and contiguous (NCHW), interleaved three times each at one torch thread; medians and ratios.
- **Parameters** (trainable) of the translation U-Net and the staging net (attention fusion).
- **FLOPs** with ``torch.utils.flop_counter.FlopCounterMode``: one forward (eval) and one
  training step (forward + backward), per hip for staging and per slice for translation.
  A multiply-add counts 2 FLOPs (the counter's convention).
- **Peak memory** on CPU: peak RSS during one AdamW training step minus RSS just before it
  (model, optimiser and inputs already built): the step's activations, gradients and AdamW
  state. The peak is ``VmHWM`` of ``/proc/self/status`` after resetting it through
  ``/proc/self/clear_refs`` (Linux), else ``resource.getrusage(...).ru_maxrss``; each
  measurement runs in a fresh spawned process.

Prints one line per figure, the headline last, and writes JSON (default
``benchmarks/results/training.json``). The 2-core machine is shared, so the load average
is recorded beside the timings.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.harness import command, machine, write_json
from common.config import ModelConfig, TrainConfig
from common.models.factory import build_staging, build_translation, count_parameters
from common.models.translation import TranslationLoss
from common.training.augmentation import BatchAugmentation
from common.training.datasets import HipDataset, PairDataset
from common.training.loops import train_staging, train_translation

DEFAULT_GRID = {"slices": 8, "size": 48}
PAPER_GRID = {"slices": 16, "size": 128}
N_PROTOCOLS = 5
DATA_WAIT_TARGET = 0.10


def _status_mb(field: str) -> float:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux >= 4.0), so the next peak is the step's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure_network(network: str, preset: str, slices: int, size: int, batch: int) -> dict:
    """Parameters, FLOPs and peak-RSS growth of one training step of one network (run in a fresh process).

    Args:
        network: ``"staging"`` (attention fusion; batch = hips ``(B, P, K, H, W)``) or
            ``"translation"`` (batch = MR slices ``(B, 1, H, W)``).
        preset: encoder preset.
        slices, size: the hip grid (K, H = W).
        batch: hips (staging) or slices (translation) per step.

    Returns:
        ``params``, ``forward_gflops_per_item``, ``train_step_gflops_per_item``,
        ``peak_rss_step_mb`` (RSS high-water mark growth over one step), ``step_seconds``.
    """
    torch.manual_seed(0)
    from torch.utils.flop_counter import FlopCounterMode

    cfg = ModelConfig(preset=preset, fusion="attention")
    if network == "staging":
        net = build_staging(cfg)
        inputs = (
            torch.randn(batch, N_PROTOCOLS, slices, size, size),
            torch.ones(batch, N_PROTOCOLS, dtype=torch.bool),
        )
        target = torch.randint(0, 4, (batch,))
        loss_fn = torch.nn.CrossEntropyLoss()
    else:
        net = build_translation(cfg)
        inputs = (torch.randn(batch, 1, size, size),)
        target = torch.rand(batch, 1, size, size) * 2 - 1
        loss_fn = TranslationLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as forward_counter:
        net(*(x[:1] for x in inputs))  # one hip / one slice
    net.train()
    before = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    started = time.perf_counter()
    with FlopCounterMode(display=False) as step_counter:
        loss = loss_fn(net(*inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - started
    return {
        "network": network,
        "preset": preset,
        "grid": {"protocols": N_PROTOCOLS, "slices": slices, "size": size},
        "batch": batch,
        "params": count_parameters(net),
        "forward_gflops_per_item": forward_counter.get_total_flops() / 1e9,
        "train_step_gflops_per_item": step_counter.get_total_flops() / batch / 1e9,
        # With the mark reset, VmHWM is the step's peak; otherwise ru_maxrss (process lifetime).
        "peak_rss_step_mb": (
            _status_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        - before,
        "peak_rss_method": "VmHWM after clear_refs reset" if reset else "ru_maxrss",
        "rss_before_step_mb": before,
        "step_seconds": seconds,
        "item": "hip" if network == "staging" else "slice",
    }


def _in_fresh_process(kwargs: dict) -> dict:
    torch.set_num_threads(2)
    return measure_network(**kwargs)


def _seconds_per_call(call, repeats: int = 20) -> float:
    call()
    start = time.perf_counter()
    for _ in range(repeats):
        call()
    return (time.perf_counter() - start) / repeats


def _laid_out(net: torch.nn.Module, layout: str) -> torch.nn.Module:
    """The builders' channels-last net, or the same net stored contiguous (NCHW) for comparison."""
    return net if layout == "channels-last" else net.to(memory_format=torch.contiguous_format)


def throughput(n_hips: int, epochs: int, n_pairs: int, layout: str = "channels-last") -> dict:
    """Hips/s of ``train_staging`` and pairs/s of ``train_translation`` for cpu-small on random data.

    ``layout``: ``"channels-last"`` (what ``build_staging``/``build_translation`` return) or
    ``"contiguous"`` (the NCHW layout they returned before).
    """
    rng = np.random.default_rng(0)
    k, size = DEFAULT_GRID["slices"], DEFAULT_GRID["size"]
    hips = HipDataset(
        rng.normal(size=(n_hips, N_PROTOCOLS, k, size, size)).astype(np.float32),
        np.ones((n_hips, N_PROTOCOLS), bool),
        rng.integers(1, 5, n_hips),
    )
    cfg = TrainConfig(epochs=epochs, batch_size=8, device="cpu", augment=True, num_workers=0)
    staging = train_staging(_laid_out(build_staging(ModelConfig()), layout), hips, cfg)
    pairs = PairDataset(
        rng.normal(size=(n_pairs, size, size)).astype(np.float32),
        rng.uniform(-1, 1, size=(n_pairs, size, size)).astype(np.float32),
    )
    tcfg = TrainConfig(epochs=epochs, batch_size=16, device="cpu", augment=True, num_workers=0)
    translation = train_translation(_laid_out(build_translation(ModelConfig()), layout), pairs, tcfg)
    augmentation = BatchAugmentation(0)
    image = torch.from_numpy(hips.images[:8])
    available = torch.from_numpy(hips.available[:8])
    mr, ct = (torch.from_numpy(a[:16, None]) for a in (pairs.mr, pairs.ct))
    staging_step = staging["seconds"] / (epochs * -(-n_hips // 8))
    translation_step = translation["seconds"] / (epochs * -(-n_pairs // 16))
    return {
        "staging_augment_share": _seconds_per_call(lambda: augmentation.hips(image, available))
        / staging_step,
        "translation_augment_share": _seconds_per_call(lambda: augmentation.pairs(mr, ct)) / translation_step,
        "staging_hips_per_s": n_hips * epochs / staging["seconds"],
        "staging_step_seconds": staging_step,
        "staging_data_wait_share": staging["data_wait_share"],
        "translation_pairs_per_s": n_pairs * epochs / translation["seconds"],
        "translation_data_wait_share": translation["data_wait_share"],
        "layout": layout,
        "n_hips": n_hips,
        "n_pairs": n_pairs,
        "epochs": epochs,
        "batch_hips": 8,
        "batch_pairs": 16,
    }


def layout_ratios(n_hips: int, epochs: int, n_pairs: int, runs: int = 3) -> dict:
    """Channels-last against contiguous weights, interleaved (A B A B ...) so that both see the same load.

    At one torch thread, as every simulated site, every baseline job and a site daemon on a small
    machine train. Returns the medians and their ratios.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows: dict[str, list[dict]] = {"channels-last": [], "contiguous": []}
    try:
        for _ in range(runs):
            for layout in ("contiguous", "channels-last"):
                rows[layout].append(throughput(n_hips, epochs, n_pairs, layout))
    finally:
        torch.set_num_threads(threads)
    keys = ("staging_hips_per_s", "translation_pairs_per_s")
    median = {
        layout: {key: float(np.median([r[key] for r in rs])) for key in keys} for layout, rs in rows.items()
    }
    return {
        "runs": runs,
        "threads": 1,
        "medians": median,
        "staging_speedup": median["channels-last"]["staging_hips_per_s"]
        / median["contiguous"]["staging_hips_per_s"],
        "translation_speedup": median["channels-last"]["translation_pairs_per_s"]
        / median["contiguous"]["translation_pairs_per_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke: fewer hips, no paper-like grid")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training.json"))
    args = parser.parse_args(argv)
    started = time.time()
    results: dict = {
        "command": command("bench_training", argv),
        **machine(),
        "torch": torch.__version__,
        "memory_method": "peak RSS (VmHWM, reset via /proc/self/clear_refs) during one AdamW step minus VmRSS "
        "before it, fresh spawned process",
        "flops_method": "torch.utils.flop_counter.FlopCounterMode (multiply-add = 2 FLOPs)",
    }
    n_hips, epochs, n_pairs = (16, 1, 64) if args.quick else (48, 2, 256)
    results["throughput"] = throughput(n_hips, epochs, n_pairs)
    results["layouts"] = layout_ratios(n_hips, epochs, n_pairs)
    t = results["throughput"]
    print(
        f"cpu-small staging: {t['staging_hips_per_s']:.1f} hips/s ({t['staging_step_seconds']:.2f} s per step of 8), "
        f"data wait {100 * t['staging_data_wait_share']:.1f} % (target < {100 * DATA_WAIT_TARGET:.0f} %), "
        f"batch augmentation {100 * t['staging_augment_share']:.1f} % of a step"
    )
    print(
        f"cpu-small translation: {t['translation_pairs_per_s']:.0f} slice pairs/s, "
        f"data wait {100 * t['translation_data_wait_share']:.1f} %, "
        f"batch augmentation {100 * t['translation_augment_share']:.1f} % of a step"
    )
    ratios = results["layouts"]
    print(
        f"channels-last vs contiguous (NCHW) weights, one torch thread, medians of {ratios['runs']} interleaved runs: "
        f"staging {ratios['staging_speedup']:.2f}x, translation {ratios['translation_speedup']:.2f}x faster"
    )
    jobs = []
    for preset in ("cpu-small", "vgg16"):
        jobs.append(dict(network="staging", preset=preset, batch=8, **DEFAULT_GRID))
        jobs.append(dict(network="translation", preset=preset, batch=16, **DEFAULT_GRID))
    if not args.quick:  # vgg16 at a paper-like grid: one hip (80 slices of 128x128) per step
        jobs.append(dict(network="staging", preset="vgg16", batch=1, **PAPER_GRID))
        jobs.append(dict(network="translation", preset="vgg16", batch=16, **PAPER_GRID))
    results["networks"] = []
    context = multiprocessing.get_context("spawn")
    for job in jobs:
        with context.Pool(1) as pool:
            try:
                row = pool.apply(_in_fresh_process, (job,))
            except (MemoryError, RuntimeError) as exc:
                row = {**job, "error": f"{type(exc).__name__}: {exc}"}
        results["networks"].append(row)
        if "error" in row:
            print(f"{job['preset']} {job['network']} at K={job['slices']}, {job['size']}px: {row['error']}")
            continue
        print(
            f"{row['preset']:<9} {row['network']:<11} K={row['grid']['slices']:<2} {row['grid']['size']:>3}px: "
            f"{row['params']:>10,} params, {row['forward_gflops_per_item']:8.2f} GFLOP forward / "
            f"{row['train_step_gflops_per_item']:8.2f} GFLOP train step per {row['item']}, "
            f"peak RSS +{row['peak_rss_step_mb']:,.0f} MB per step of {row['batch']} ({row['step_seconds']:.1f} s)"
        )
        write_json(args.out, results)
    results["load_average_end"] = os.getloadavg()
    results["seconds"] = time.time() - started
    write_json(args.out, results)
    print(
        f"headline: cpu-small trains at {t['staging_hips_per_s']:.1f} hips/s on this machine, "
        f"{100 * t['staging_data_wait_share']:.1f} % of the loop waiting for data "
        f"(load average {results['load_average_start'][0]:.1f}) -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
