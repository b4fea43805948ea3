"""Preprocessing settings: what changes a site's preprocessed hips, and so keys its cache.

Part of the settings (``common.config.RunConfig.preprocess`` builds them from the run config);
kept beside the site data that they shape. No torch, no DICOM here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

# Only T1 TSE coronal and T2 Dixon water coronal are named in the paper; the other three are ours.
DEFAULT_PROTOCOLS: tuple[str, ...] = ("T1_COR", "T2W_COR", "T1_AX", "T2W_AX", "PDFS_SAG")


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
