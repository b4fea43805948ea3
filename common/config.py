"""Every setting of onfh-fl in one place: run, site, model and training settings (preprocessing
settings, which key the site cache, sit beside the site data: ``common.sitedata.settings``).

Run settings live in ``[tool.flwr.app.config]`` of pyproject.toml (kebab-case) and arrive as
``context.run_config``; site settings arrive as ``context.node_config``. Only this module
indexes those raw dicts, and ``load_run_config`` is the one loader of presets. No torch here:
the settings are read (and validated) before any network is built.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from common.privacy_settings import check_privacy_settings
from common.sitedata.settings import HipGrid, PreprocessSettings

STAGES: tuple[int, ...] = (1, 2, 3, 4)  # ARCO I-IV; class index = stage - 1
STAGE_NAMES: tuple[str, ...] = ("I", "II", "III", "IV")  # as reports write them


# The models' own tables (common/models: ENCODER_PRESETS, FUSIONS, NORMS) hold these names with
# the layers behind them; the names are repeated here so that settings validate without torch
# (tests/common/test_config.py checks that the two agree).
ENCODER_PRESET_NAMES: tuple[str, ...] = ("cpu-small", "vgg16")
FUSION_NAMES: tuple[str, ...] = ("attention", "plain")
NORM_NAMES: tuple[str, ...] = ("batch", "instance", "group")


@dataclass
class ModelConfig:
    """The model choices of a run (the ablation switches are ``fusion`` and ``pretrained``).

    Attributes:
        preset: encoder preset, a key of ``ENCODER_PRESETS`` (``"cpu-small"``, ``"vgg16"``).
        fusion: ``"attention"`` (paper) or ``"plain"`` (plain VGG baseline).
        pretrained: initialise the staging encoder from the MR-to-CT translation encoder
            (phase 1); ``False`` = random init (the "no self-supervised learning" ablation).
            The builders do not load weights; the caller applies ``load_pretrained_encoder``.
        n_protocols: P (``len(PreprocessSettings.protocols)``).
        n_classes: 4 (ARCO I-IV).
        norm: ``"batch"``, ``"instance"`` or ``"group"``.
        embed_dim, heads, dropout: attention-fusion width, heads and dropout.
    """

    preset: str = "cpu-small"
    fusion: str = "attention"
    pretrained: bool = True
    n_protocols: int = 5
    n_classes: int = 4
    norm: str = "batch"
    embed_dim: int = 128
    heads: int = 4
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.preset not in ENCODER_PRESET_NAMES:
            raise ValueError(
                f"ModelConfig.preset must be one of {sorted(ENCODER_PRESET_NAMES)}, got {self.preset!r}"
            )
        if self.fusion not in FUSION_NAMES:
            raise ValueError(f"ModelConfig.fusion must be one of {FUSION_NAMES}, got {self.fusion!r}")
        if self.norm not in NORM_NAMES:
            raise ValueError(f"ModelConfig.norm must be one of {NORM_NAMES}, got {self.norm!r}")
        if self.n_protocols < 1:
            raise ValueError(f"ModelConfig.n_protocols must be >= 1, got {self.n_protocols}")
        if self.n_classes < 2:
            raise ValueError(f"ModelConfig.n_classes must be >= 2, got {self.n_classes}")
        if self.embed_dim < 1 or self.heads < 1 or self.embed_dim % self.heads:
            raise ValueError(
                f"ModelConfig.heads ({self.heads}) must divide ModelConfig.embed_dim ({self.embed_dim})"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"ModelConfig.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TrainConfig:
    """Settings of one local training call (one federated round, or the centralized run).

    Attributes:
        epochs: passes over the local training set.
        lr, weight_decay: AdamW settings.
        batch_size: hips (staging) or slice pairs (translation) per step.
        class_weighted: weight the cross entropy by inverse training-class frequency.
        augment: augment every training batch on the device (``common.training.augmentation``).
        seed: seeds torch/numpy/random and the shuffling order.
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"``.
        amp: mixed precision (bf16, or fp16 with a GradScaler) on CUDA; ignored on CPU.
        num_workers: DataLoader worker processes (0 = load in the training process).
        proximal_mu: FedProx coefficient; > 0 adds ``mu/2 * ||w - w_ref||^2``.
        ordinal_weight: weight of the staging loss's ordinal terms (``common.training.losses``).
        select_on_val: with a validation set, keep the weights of the epoch with the best
            validation macro AUROC (ties and undefined AUROC broken by lower validation loss).
    """

    epochs: int = 1
    lr: float = 1e-3
    batch_size: int = 8
    weight_decay: float = 1e-4
    class_weighted: bool = True
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    num_workers: int = 0
    proximal_mu: float = 0.0
    ordinal_weight: float = 0.0
    select_on_val: bool = True

    def __post_init__(self) -> None:
        lowest = {"epochs": 1, "batch_size": 1, "num_workers": 0, "weight_decay": 0, "proximal_mu": 0}
        for key, low in {**lowest, "ordinal_weight": 0}.items():
            if not getattr(self, key) >= low:
                raise ValueError(f"TrainConfig.{key} must be >= {low}, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")


PRETRAIN_TARGETS = ("ct", "mr-denoise")  # phase 1's target: RunConfig.pretrain_target
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad", "fedavgm", "fedmedian",
              "fedtrimmedavg", "krum", "multikrum", "bulyan")  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Every setting of a federated run. Field ``hip_slices`` is run-config key ``hip-slices``."""

    run_name: str = ""
    # Initialisation, shuffling, augmentation, sampling.
    seed: int = 0
    # Each site's train/val/test split of its patients; kept apart from ``seed`` so that runs
    # with different seeds are scored on the same held-out hips.
    split_seed: int = 0
    # Shares of each site's patients in train, val and test ("0.6,0.2,0.2"); an evaluation
    # federation holds out more for test (benchmarks/evaluation.py).
    split_fractions: str = "0.6,0.2,0.2"
    # Synthetic federation (simulation only; deployed sites use node config ``data-dir``).
    data_root: str = "data/federation"
    # Simulation only: site folders under data-root taking part, comma-separated (empty: site-00, site-01, ...)
    simulated_sites: str = ""
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
    fedbn: bool = True  # FedBN: chosen on tuning seed 101 (docs/benchmarks.md, "Stage I against II")
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    # FedTrimmedAvg trims int(beta x n) replies at each end: 0.25 trims one of four sites.
    trimmed_beta: float = 0.25
    # Krum, Multi-Krum, Bulyan: the number of malicious sites f they are built to withstand.
    num_malicious_sites: int = 1
    # A training update whose L2 norm exceeds this factor x the round's median is excluded
    # (only with 3+ replies); 0 turns the bound off.
    update_norm_factor: float = 5.0
    dp_noise_multiplier: float = 0.0  # site-level DP of the weight updates (server/privacy.py): 0 = off
    dp_clip_norm: float = 2.0  # L2 bound of each site's update; docs/federation.md "Differential privacy"
    dp_delta: float = 1e-5
    dp_phases: str = "both"  # "both", "pretrain" or "stage"
    secure_aggregation: bool = True  # SecAgg+ (docs/privacy.md): the server learns only sums over sites
    secagg_clip_range: float = 4.0  # update values (weights minus those sent) beyond +- this are clipped
    min_sites: int = 1
    round_timeout_s: float = 3600.0
    update_dtype: str = "float32"
    histogram_bins: int = 1000
    # Phase 1: MR-to-CT pretraining
    pretrain_rounds: int = 2
    pretrain_epochs: int = 1
    pretrain_lr: float = 1e-3
    pretrain_max_pairs: int = 1000
    # What phase 1 teaches the encoder: "ct" (the paper's MR-to-CT), or "mr-denoise" (noisy MR to
    # MR: the pretraining control of docs/benchmarks.md; no CT needed, still only paired patients)
    pretrain_target: str = "ct"
    # Phase 2: staging
    stage_rounds: int = 16
    # 16 rounds x 2 epochs, cosine: chosen on tuning seed 101 (docs/benchmarks.md, Convergence)
    stage_epochs: int = 2
    stage_lr: float = 5e-4
    # "constant", or "cosine": each federated round's local learning rate decays from stage-lr to
    # a tenth of it over stage-rounds (late rounds move the global model less: fewer swings)
    stage_lr_schedule: str = "cosine"
    # Weight of the ordinal terms added to the staging cross entropy (common/training/losses.py); 0: off
    stage_ordinal_weight: float = 0.0
    # Hips per staging step (pretraining uses at least 16 pairs). Small on purpose: a site holds
    # 15-25 labelled training hips, so a round of 4 epochs is only a few steps, and FedAvg moves
    # the model about one site's steps per round; 4 doubles the steps at equal compute.
    batch_size: int = 4
    # Keep the weights of the round (federated) or epoch (centralized) with the best validation AUROC.
    select_on_val: bool = True
    class_weighted: bool = True
    augment: bool = True
    device: str = "auto"
    # Experiment tracking of the server's aggregate metrics: "none" or "tensorboard" (extra [tracking])
    tracking: str = "none"
    # Resume from the checkpoint of run ``run_name`` in ``output_dir``
    resume: bool = False

    def __post_init__(self) -> None:
        def bad(key: str, value: Any, fix: str) -> None:
            raise ValueError(f"run config '{key}' = {value!r} is invalid: {fix}")

        if self.strategy not in STRATEGIES:
            bad("strategy", self.strategy, f"use one of {', '.join(STRATEGIES)}")
        if self.stage_lr_schedule not in ("constant", "cosine"):
            bad("stage-lr-schedule", self.stage_lr_schedule, "use 'constant' or 'cosine'")
        if self.pretrain_target not in PRETRAIN_TARGETS:
            bad("pretrain-target", self.pretrain_target, f"use one of {', '.join(PRETRAIN_TARGETS)}")
        if self.tracking not in ("none", "tensorboard"):
            bad("tracking", self.tracking, "use 'none' or 'tensorboard' (pip install -e '.[tracking]')")
        if self.update_dtype not in ("float32", "float16"):
            bad("update-dtype", self.update_dtype, "use 'float32' or 'float16'")
        counts = ("pretrain_epochs", "stage_epochs", "batch_size", "min_sites", "histogram_bins")
        zero = ("pretrain_rounds", "stage_rounds", "stage_ordinal_weight")
        for key, low in {**dict.fromkeys(zero, 0), **dict.fromkeys(counts, 1)}.items():
            if getattr(self, key) < low:
                bad(key.replace("_", "-"), getattr(self, key), f"use a number >= {low}")
        if not 0.0 <= self.trimmed_beta < 0.5:
            bad("trimmed-beta", self.trimmed_beta, "use a value in [0, 0.5)")
        if self.num_malicious_sites < 0:
            bad("num-malicious-sites", self.num_malicious_sites, "use a number >= 0")
        if self.update_norm_factor != 0 and not self.update_norm_factor >= 1.0:
            bad("update-norm-factor", self.update_norm_factor, "use a factor >= 1, or 0 for no bound")
        if any(Path(n.strip()).name != n.strip() for n in self.simulated_sites.split(",") if n.strip()):
            bad("simulated-sites", self.simulated_sites, "name folders under data-root: 'site-00,site-02'")
        try:
            split = self.split
        except ValueError:
            split = ()
        if len(split) != 3 or min(split) < 0 or split[0] <= 0 or split[2] <= 0 or abs(sum(split) - 1) > 1e-6:
            bad(
                "split-fractions",
                self.split_fractions,
                "give train,val,test shares summing to 1, e.g. '0.6,0.2,0.2'",
            )
        ModelConfig(preset=self.model_preset, fusion=self.fusion, norm=self.norm)  # validates
        check_privacy_settings(self)

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

    @property
    def split(self) -> tuple[float, ...]:
        """``split_fractions`` as numbers: (train, val, test)."""
        return tuple(float(v) for v in self.split_fractions.split(","))

    def simulated_site(self, partition_id: int) -> str:
        """The site folder a simulated SuperNode of ``partition_id`` reads."""
        names = [n.strip() for n in self.simulated_sites.split(",") if n.strip()]
        if names and partition_id >= len(names):
            raise ValueError(
                f"run config 'simulated-sites' names {len(names)} sites: start {len(names)} SuperNodes"
            )
        return names[partition_id] if names else f"site-{partition_id:02d}"

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

    def stage_lr_at(self, phase_round: int | None) -> float:
        """The staging learning rate of federated round ``phase_round`` (1-based; None: centralized)."""
        if self.stage_lr_schedule == "constant" or phase_round is None or self.stage_rounds <= 1:
            return self.stage_lr
        t = min(max(phase_round - 1, 0), self.stage_rounds - 1) / (self.stage_rounds - 1)
        return self.stage_lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * t)))

    def stage_training(self, round_seed: int, phase_round: int | None = None) -> TrainConfig:
        return TrainConfig(
            epochs=self.stage_epochs,
            lr=self.stage_lr_at(phase_round),
            batch_size=self.batch_size,
            class_weighted=self.class_weighted,
            augment=self.augment,
            seed=round_seed,
            device=self.device,
            proximal_mu=self.proximal_mu if self.strategy == "fedprox" else 0.0,
            ordinal_weight=self.stage_ordinal_weight,
            select_on_val=False,
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / (self.run_name or "run")


def load_run_config(path: Path | None, **overrides: Any) -> RunConfig:
    """Defaults, then a TOML preset (flat run-config keys), then keyword overrides.

    Args:
        path: a TOML file of kebab-case run-config keys (``presets/*.toml``), or None.
        overrides: snake_case or kebab-case run-config keys, applied last.

    Raises ValueError when the file is missing or not TOML, or a key or value is invalid (naming all three).
    """
    raw: dict = {}
    if path is not None:
        if not path.is_file():
            raise ValueError(f"config preset {path} not found; see presets/ for examples")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"config preset {path} is not valid TOML ({exc})") from None
    raw.update({k.replace("_", "-"): v for k, v in overrides.items()})
    try:
        return RunConfig.from_dict(raw)
    except (ValueError, TypeError) as exc:
        where = f" in {path}" if path is not None else ""
        raise ValueError(f"{exc}{where}") from None


@dataclass(frozen=True)
class SiteConfig:
    """Where one site's data lives: from node config in deployment, or the synthetic root."""

    site_name: str
    data_dir: Path
    cache_dir: Path
    device: str = "auto"
    policy_file: Path | None = None  # node config ``policy-file``: the site's limits; None = the defaults

    @classmethod
    def from_node_config(cls, node_config: dict[str, Any], run: RunConfig) -> SiteConfig:
        """Deployment: ``data-dir`` (+ ``site-name``, ``cache-dir``, ``device``, ``policy-file``) in node
        config. Simulation: ``partition-id`` picks ``site-NN`` under the run's ``data-root``."""
        policy = Path(str(node_config["policy-file"])) if node_config.get("policy-file") else None
        if "data-dir" in node_config:
            data_dir = Path(str(node_config["data-dir"]))
            name = str(node_config.get("site-name", data_dir.name))
            cache = Path(str(node_config.get("cache-dir", data_dir.parent / f".{data_dir.name}-cache")))
            return cls(name, data_dir, cache, str(node_config.get("device", run.device)), policy)
        if "partition-id" in node_config:
            name = run.simulated_site(int(node_config["partition-id"]))
            return cls(name, Path(run.data_root) / name, Path(run.cache_dir) / name, run.device, policy)
        raise ValueError(
            "node config has neither 'data-dir' (deployment) nor 'partition-id' (simulation): start the "
            "SuperNode with --node-config \"data-dir='/path/to/site' site-name='my-hospital'\""
        )
