"""Tissues of the phantom: MR and CT properties, MR protocols and the spin-echo signal equation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tissue:
    """MR and CT properties of one tissue.

    Attributes:
        name: tissue name.
        pd: proton density relative to pure water (0-1).
        t1_ms, t2_ms: relaxation times of the tissue's water component (about 1.5 T).
        fat_fraction: share of the MR signal's protons in fat (0-1); fat relaxes with
            ``FAT_T1_MS`` / ``FAT_T2_MS`` and is removed by fat suppression.
        hu: CT attenuation in Hounsfield units.
    """

    name: str
    pd: float
    t1_ms: float
    t2_ms: float
    fat_fraction: float
    hu: float


FAT_T1_MS = 340.0
FAT_T2_MS = 70.0

# Order fixes the tissue index used by the renderer.
TISSUES: tuple[Tissue, ...] = (
    Tissue("air", 0.0, 1000.0, 1.0, 0.0, -1000.0),
    Tissue("subcutaneous_fat", 0.95, 1000.0, 50.0, 0.95, -100.0),
    Tissue("muscle", 0.80, 1000.0, 40.0, 0.03, 50.0),
    Tissue("cortical_bone", 0.05, 1000.0, 1.0, 0.0, 1400.0),
    Tissue("fatty_marrow", 0.90, 1000.0, 40.0, 0.85, 250.0),
    Tissue("red_marrow", 0.85, 900.0, 45.0, 0.45, 300.0),
    Tissue("cartilage", 0.75, 1000.0, 38.0, 0.0, 100.0),
    Tissue("joint_fluid", 1.00, 2800.0, 280.0, 0.0, 10.0),
    # Bone-marrow oedema: water replaces fat; CT barely changes (ARCO I: "CT normal").
    Tissue("marrow_oedema", 0.95, 1300.0, 90.0, 0.35, 270.0),
    # Necrotic segment: mummified fat early (near-normal T1), fibrosis later.
    Tissue("necrotic_fat", 0.85, 1100.0, 50.0, 0.75, 250.0),
    Tissue("necrotic_fibrosis", 0.60, 1200.0, 45.0, 0.30, 320.0),
    # Reactive interface of stage I: low T1, moderately bright fluid-sensitive, CT normal.
    Tissue("reactive_band", 0.70, 1300.0, 70.0, 0.10, 270.0),
    # Double-line sign (stage >= II): inner granulation (bright T2), outer sclerosis (dark).
    Tissue("granulation", 0.90, 1500.0, 120.0, 0.05, 230.0),
    Tissue("sclerosis", 0.25, 1000.0, 15.0, 0.05, 950.0),
    # Trabecular thickening around the rim: MR looks like marrow, CT is dense.
    Tissue("sclerotic_halo", 0.88, 1000.0, 40.0, 0.80, 550.0),
    Tissue("cyst", 1.00, 2500.0, 250.0, 0.0, 25.0),
    # Subchondral fracture cleft (crescent sign): fluid on MR, gas/fluid lucency on CT.
    Tissue("fracture_cleft", 0.95, 2500.0, 200.0, 0.0, -350.0),
    # Compacted trabeculae of the collapsed fragment.
    Tissue("compacted_bone", 0.20, 1000.0, 12.0, 0.05, 1100.0),
    Tissue("acetabular_sclerosis", 0.20, 1000.0, 12.0, 0.05, 1050.0),
)
TISSUE_INDEX: dict[str, int] = {t.name: i for i, t in enumerate(TISSUES)}
# Tissues a lesion brings into the femoral head (and oedema into its marrow): the MR contrast
# knob moves their MR signal towards the fatty marrow they replace. Joint and acetabular changes
# of stage IV are not lesion tissue: their visibility is the cue-overlap knob's.
LESION_TISSUES: tuple[str, ...] = (
    "marrow_oedema",
    "necrotic_fat",
    "necrotic_fibrosis",
    "reactive_band",
    "granulation",
    "sclerosis",
    "sclerotic_halo",
    "cyst",
    "fracture_cleft",
    "compacted_bone",
)


@dataclass(frozen=True)
class MRProtocol:
    """Acquisition parameters of one MR protocol.

    Attributes:
        key: protocol key (``T1_COR`` ...).
        tr_ms, te_ms: repetition and echo time of the spin-echo signal equation.
        fat_residual: share of fat signal left after fat suppression (1.0 = none;
            Dixon water images leave least).
        noise_scale: noise relative to the site's T1 noise (fluid-sensitive images have lower
            signal and relatively more noise).
    """

    key: str
    tr_ms: float
    te_ms: float
    fat_residual: float
    noise_scale: float = 1.0


MR_PROTOCOLS: dict[str, MRProtocol] = {
    "T1_COR": MRProtocol("T1_COR", 550.0, 12.0, 1.0),
    "T1_AX": MRProtocol("T1_AX", 550.0, 12.0, 1.0),
    "T2W_COR": MRProtocol("T2W_COR", 4000.0, 80.0, 0.04, 0.7),
    "T2W_AX": MRProtocol("T2W_AX", 4000.0, 80.0, 0.04, 0.7),
    "PDFS_SAG": MRProtocol("PDFS_SAG", 3000.0, 30.0, 0.08, 0.8),
    # Extra series a PACS holds; ingestion must ignore them.
    "LOCALIZER": MRProtocol("LOCALIZER", 8.0, 4.0, 1.0, 1.5),
    "DWI": MRProtocol("DWI", 5000.0, 90.0, 0.03, 2.0),
}


def spin_echo_signal(protocol: MRProtocol, tissues: tuple[Tissue, ...] = TISSUES) -> np.ndarray:
    """Noise-free signal of each tissue for one protocol: float32 ``(n_tissues,)``.

    ``S = PD * [(1-ff) (1-exp(-TR/T1w)) exp(-TE/T2w) + ff * r_fat (1-exp(-TR/T1f)) exp(-TE/T2f)]``
    with ``r_fat`` the protocol's fat residual (fat suppression / Dixon water).
    """
    tr, te = protocol.tr_ms, protocol.te_ms
    fat = (1.0 - math.exp(-tr / FAT_T1_MS)) * math.exp(-te / FAT_T2_MS)
    values = []
    for t in tissues:
        water = (1.0 - math.exp(-tr / t.t1_ms)) * math.exp(-te / t.t2_ms)
        values.append(t.pd * ((1.0 - t.fat_fraction) * water + t.fat_fraction * protocol.fat_residual * fat))
    return np.asarray(values, dtype=np.float32)


def with_lesion_contrast(signal: np.ndarray, contrast: float) -> np.ndarray:
    """Per-tissue MR ``signal`` with every lesion tissue at ``marrow + contrast * (tissue - marrow)``.

    Only the lesion tissues' own voxels change: a cyst inside the head keeps its sclerotic wall's
    geometry, it only stands out less. ``contrast`` 1 returns the signal unchanged.
    """
    if contrast == 1.0:
        return signal
    out = np.array(signal, dtype=np.float32, copy=True)
    marrow = out[TISSUE_INDEX["fatty_marrow"]]
    for name in LESION_TISSUES:
        i = TISSUE_INDEX[name]
        out[i] = marrow + np.float32(contrast) * (out[i] - marrow)
    return out


def ct_values(tissues: tuple[Tissue, ...] = TISSUES) -> np.ndarray:
    """Hounsfield units of each tissue: float32 ``(n_tissues,)``."""
    return np.asarray([t.hu for t in tissues], dtype=np.float32)


def lesion_blind_ct_values(tissues: tuple[Tissue, ...] = TISSUES) -> np.ndarray:
    """``ct_values`` with every lesion tissue at fatty-marrow HU: a CT that shows no more of the
    femoral-head lesion than MR at zero contrast (joint and acetabular changes stay)."""
    values = ct_values(tissues)
    for name in LESION_TISSUES:
        values[TISSUE_INDEX[name]] = values[TISSUE_INDEX["fatty_marrow"]]
    return values
