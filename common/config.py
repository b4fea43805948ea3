"""One typed, validated view of a run's settings (Flower run config) and a site's (node config).

Run settings live in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case) and arrive as
``context.run_config``; site settings arrive as ``context.node_config``. Only this module
indexes those raw dicts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.models.factory import ModelConfig
from common.training.loops import TrainConfig

# Only T1 TSE coronal and T2 Dixon water coronal are named in the paper; the other three are ours.
DEFAULT_PROTOCOLS: tuple[str, ...] = ("T1_COR", "T2W_COR", "T1_AX", "T2W_AX", "PDFS_SAG")

STAGES: tuple[int, ...] = (1, 2, 3, 4)  # ARCO I-IV; class index = stage - 1


@dataclass(frozen=True)
class HipGrid:
    """The fixed physical box cropped around each femoral head, per protocol.

    Each protocol is resampled in its own slice orientation (coronal protocols into coronal
    slices, and so on), centred on the femoral head: ``slices`` slices spanning ``slab_mm``
    through-plane, each ``size x size`` pixels over ``fov_mm`` in-plane.
    Defaults are small enough for CPU training; the paper's scale is larger (e.g. 16 x 128).
    """

    slices: int = 8
    size: int = 48
    fov_mm: float = 64.0
    slab_mm: float = 40.0

    def __post_init__(self) -> None:
        if self.slices < 1 or self.size < 8:
            raise ValueError(f"HipGrid needs slices >= 1 and size >= 8, got {self.slices} and {self.size}")
        if self.fov_mm <= 0 or self.slab_mm <= 0:
            raise ValueError(f"HipGrid needs positive fov_mm and slab_mm, got {self.fov_mm}, {self.slab_mm}")


@dataclass(frozen=True)
class PreprocessSettings:
    """Everything that changes the preprocessed hips; its fingerprint keys the cache."""

    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS
    grid: HipGrid = field(default_factory=HipGrid)
    # CT window mapped to [-1, 1] for the translation target ("normalised HU").
    ct_window_hu: tuple[float, float] = (-200.0, 1400.0)
    # Protocol whose volume anchors localisation and MR-CT registration.
    anchor_protocol: str = "T1_COR"

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


STRATEGIES = (
    "fedavg",
    "fedprox",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "fedavgm",
    "fedmedian",
    "fedtrimmedavg",
)


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run. Field ``hip_slices`` is run-config key ``hip-slices``."""

    run_name: str = ""
    # Initialisation, shuffling, augmentation, sampling.
    seed: int = 0
    # Each site's train/val/test split of its patients; kept apart from ``seed`` so that runs
    # with different seeds are scored on the same held-out hips.
    split_seed: int = 0
    # Synthetic federation (simulation only; deployed sites use node config ``data-dir``).
    data_root: str = "data/federation"
    cache_dir: str = ".cache/onfh"
    output_dir: str = "outputs"
    # Preprocessing (changes the cache key)
    hip_slices: int = 8
    hip_size: int = 48
    hip_fov_mm: float = 64.0
    hip_slab_mm: float = 40.0
    # Model
    model_preset: str = "cpu-small"
    fusion: str = "attention"
    pretrained: bool = True
    norm: str = "batch"
    # Federation
    strategy: str = "fedavg"
    fedbn: bool = False
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    trimmed_beta: float = 0.2
    min_sites: int = 1
    round_timeout_s: float = 3600.0
    update_dtype: str = "float32"
    histogram_bins: int = 1000
    # Phase 1: MR-to-CT pretraining
    pretrain_rounds: int = 2
    pretrain_epochs: int = 1
    pretrain_lr: float = 1e-3
    pretrain_max_pairs: int = 1500
    # Phase 2: staging
    stage_rounds: int = 8
    stage_epochs: int = 2
    stage_lr: float = 5e-4
    # Hips per staging step (pretraining uses at least 16 pairs). Small on purpose: a site holds
    # 15-25 labelled training hips, so a round of 2 epochs is only a few steps, and FedAvg moves
    # the model about one site's steps per round; 4 doubles the steps at equal compute.
    batch_size: int = 4
    # Keep the weights of the round (federated) or epoch (centralized) with the best validation AUROC.
    select_on_val: bool = True
    class_weighted: bool = True
    augment: bool = True
    device: str = "auto"
    # Resume from the checkpoint of run ``run_name`` in ``output_dir``
    resume: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, fix: str) -> None:
            raise ValueError(f"run config '{key}' = {value!r} is invalid: {fix}")

        if self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, f"use one of {', '.join(STRATEGIES)}")
        if self.update_dtype not in ("float32", "float16"):
            bad("update-dtype", self.update_dtype, "use 'float32' or 'float16'")
        for key in ("pretrain_rounds", "stage_rounds"):
            if getattr(self, key) < 0:
                bad(key.replace("_", "-"), getattr(self, key), "use a number >= 0")
        for key in ("pretrain_epochs", "stage_epochs", "batch_size", "min_sites", "histogram_bins"):
            if getattr(self, key) < 1:
                bad(key.replace("_", "-"), getattr(self, key), "use a number >= 1")
        if not 0.0 <= self.trimmed_beta < 0.5:
            bad("trimmed-beta", self.trimmed_beta, "use a value in [0, 0.5)")
        ModelConfig(preset=self.model_preset, fusion=self.fusion, norm=self.norm)  # validates

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RunConfig:
        """Build from a kebab-case (or snake_case) dict; unknown keys are an error naming them."""
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ValueError(
                    f"unknown run config key '{key}'; known keys: "
                    + ", ".join(sorted(k.replace("_", "-") for k in known))
                )
            default = known[name].default
            if isinstance(default, bool):
                value = value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
            elif isinstance(default, int):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
            else:
                value = str(value)
            values[name] = value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict, as in pyproject.toml."""
        return {k.replace("_", "-"): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    @property
    def preprocess(self) -> PreprocessSettings:
        grid = HipGrid(self.hip_slices, self.hip_size, self.hip_fov_mm, self.hip_slab_mm)
        return PreprocessSettings(grid=grid)

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(
            preset=self.model_preset, fusion=self.fusion, pretrained=self.pretrained, norm=self.norm
        )

    def pretrain_training(self, round_seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.pretrain_epochs,
            lr=self.pretrain_lr,
            batch_size=max(self.batch_size, 16),
            augment=self.augment,
            seed=round_seed,
            device=self.device,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            select_on_val=False,
        )

    def stage_training(self, round_seed: int) -> TrainConfig:
        return TrainConfig(
            epochs=self.stage_epochs,
            lr=self.stage_lr,
            batch_size=self.batch_size,
            class_weighted=self.class_weighted,
            augment=self.augment,
            seed=round_seed,
            device=self.device,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            select_on_val=False,
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or "run")


@dataclass(frozen=True)
class SiteConfig:
    """Where one site's data lives: from node config in deployment, or the synthetic root."""

    site_name: str
    data_dir: Path
    cache_dir: Path
    device: str = "auto"

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], run: RunConfig) -> SiteConfig:
        """Deployment: ``data-dir`` (+ ``site-name``, ``cache-dir``, ``device``) in node config.
        Simulation: ``partition-id`` picks ``site-NN`` under the run's ``data-root``."""
        if "data-dir" in node_config:
            data_dir = Path(str(node_config["data-dir"]))
            name = str(node_config.get("site-name", data_dir.name))
            cache = Path(str(node_config.get("cache-dir", data_dir.parent / f".{data_dir.name}-cache")))
            return cls(name, data_dir, cache, str(node_config.get("device", run.device)))
        if "partition-id" in node_config:
            name = f"site-{int(node_config['partition-id']):02d}"
            return cls(name, Path(run.data_root) / name, Path(run.cache_dir) / name, run.device)
        raise ValueError(
            "node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation): start the "
            "SuperNode with --node-config \"data-dir='/path/to/site' site-name='my-hospital'\""
        )
