"""From preprocessed patients to a site: aligned arrays, labels joined by key, the split, the counts."""

from __future__ import annotations

import numpy as np

from common.config import STAGES
from common.problems import ProblemLog
from common.sitedata.labels import HipLabel, split_patients
from common.sitedata.patient import SIDES, PatientResult
from common.sitedata.privacy import KEY_LENGTH, patient_key
from common.sitedata.settings import PreprocessSettings

LOW_CONFIDENCE = 0.5  # localisation confidence below which a hip is worth a look


def stack(results: list[PatientResult], settings: PreprocessSettings) -> dict[str, np.ndarray]:
    """Per-patient results -> the site's aligned arrays (float16 on disk to halve the cache)."""
    grid = settings.grid
    n_protocols = len(settings.protocols)
    hip_keys, hip_sides, images, available, confidence, centres = [], [], [], [], [], []
    pair_mr, pair_ct, pair_keys, reg_keys, reg_matrices = [], [], [], [], []
    for result in results:
        for side in SIDES:
            if side in result.images:
                hip_keys.append(result.key)
                hip_sides.append(side)
                images.append(result.images[side])
                available.append(result.available[side])
                confidence.append(result.confidence[side])
                centres.append(result.centres[side])
        pair_mr.append(result.pairs_mr)
        pair_ct.append(result.pairs_ct)
        pair_keys.extend([result.key] * len(result.pairs_mr))
        if result.registration is not None:
            reg_keys.append(result.key)
            reg_matrices.append(result.registration)
    image_shape = (n_protocols, grid.slices, grid.size, grid.size)
    slice_shape = (0, grid.size, grid.size)
    return {
        "patient_keys": np.array(hip_keys, dtype=f"U{KEY_LENGTH}"),
        "sides": np.array(hip_sides, dtype="U1"),
        "images": np.stack(images).astype(np.float16) if images else np.zeros((0, *image_shape), np.float16),
        "available": np.array(available, dtype=bool).reshape(-1, n_protocols),
        "confidence": np.array(confidence, dtype=np.float32),
        "centres": np.array(centres, dtype=np.float64).reshape(-1, 3),
        "pairs_mr": np.concatenate(pair_mr).astype(np.float16)
        if pair_mr
        else np.zeros(slice_shape, np.float16),
        "pairs_ct": np.concatenate(pair_ct).astype(np.float16)
        if pair_ct
        else np.zeros(slice_shape, np.float16),
        "pair_keys": np.array(pair_keys, dtype=f"U{KEY_LENGTH}"),
        "registration_keys": np.array(reg_keys, dtype=f"U{KEY_LENGTH}"),
        "registration": np.array(reg_matrices, dtype=np.float64).reshape(-1, 4, 4),
    }


def join_labels(
    labels: list[HipLabel], salt: bytes, hips_of: dict[str, set[str]], problems: ProblemLog
) -> dict[tuple[str, str], int]:
    """Stages (0-4) of the hips found, by (salted key, side); rows that match no hip are reported
    by line (never by patient ID), and patients without any row are counted.

    Args:
        labels: the rows of labels.csv.
        salt: the site's pseudonym salt.
        hips_of: patient key -> the sides that gave a hip, for every patient scanned.
        problems: where the notes go.
    """
    stage_of: dict[tuple[str, str], int] = {}
    labelled_patients = set()
    for label in labels:
        key = patient_key(label.patient_id, salt)
        labelled_patients.add(key)
        where = f"labels.csv:{label.line}"
        if key not in hips_of:
            problems.add(
                where,
                "patient_id matches no study in the DICOM folder; label not used",
                "check the patient_id against the PatientID of the DICOM export, or add the study",
            )
        elif label.side not in hips_of[key]:
            if label.stage is not None:
                problems.add(
                    where,
                    f"the study has no usable {label.side} hip (see the study's problems); label not used",
                    "fix the study's series, or give the centre in fh_x_mm, fh_y_mm, fh_z_mm",
                )
        elif label.stage is not None:
            stage_of[(key, label.side)] = label.stage
    unlabelled_patients = [k for k in hips_of if k not in labelled_patients]
    if labels and unlabelled_patients:
        problems.add(
            "labels.csv",
            f"{len(unlabelled_patients)} of {len(hips_of)} patients have no label row; their hips are unlabelled",
            "nothing to do if intended (usable for pretraining); otherwise add rows",
            "info",
        )
    return stage_of


def split_site(
    split_of: dict[str, str],
    keys: list[str],
    stages: np.ndarray,
    pair_keys: list[str],
    split_seed: int,
    fractions: tuple[float, ...] = (0.6, 0.2, 0.2),
) -> dict[str, str]:
    """Patient key -> ``"train"`` / ``"val"`` / ``"test"``, drawn on the install-independent split ids.

    Args:
        split_of: patient key -> split id (``privacy.split_id``), for every patient.
        keys, stages: patient key and stage (1-4, 0 for none) of each hip.
        pair_keys: patient key of each MR/CT pair.
        split_seed: seed of the split.
        fractions: shares of patients in train, val and test.
    """
    # Small sites: every split gets labelled patients, MR-CT pairs and, where three patients
    # have it, each stage, so that a test set can score all four stages.
    staged = {
        stage: {split_of[k] for k, s in zip(keys, stages, strict=True) if s == stage} for stage in STAGES
    }
    by_split_id = split_patients(
        sorted(split_of.values()),
        seed=split_seed,
        fractions=tuple(fractions),
        groups={
            "labelled": set().union(*staged.values()),
            "with MR-CT pairs": {split_of[k] for k in pair_keys},
            **{f"stage {stage}": members for stage, members in staged.items()},
        },
    )
    return {key: by_split_id[sid] for key, sid in split_of.items()}


def site_stats(
    index: dict,
    settings: PreprocessSettings,
    label_values: np.ndarray,
    available: np.ndarray,
    confidence: np.ndarray,
    n_pairs: int,
) -> dict:
    """The counts a site check shows (no identifiers).

    Args:
        index: the site index (scan counts, patient summaries).
        settings: the preprocessing settings (protocols).
        label_values: per hip, -1 unlabelled, 0 healthy, 1-4 the stage.
        available: per hip and protocol, whether the protocol covers the hip.
        confidence: per hip, the localisation confidence.
        n_pairs: MR/CT pairs of the site.
    """
    patients = index["patients"]
    return {
        **index["scan"],
        "patients": len(patients),
        "studies": int(sum(p["studies"] for p in patients)),
        "hips": len(label_values),
        "labelled_hips": int((label_values > 0).sum()),
        "stage_hips": {int(s): int((label_values == s).sum()) for s in STAGES},
        "healthy_hips": int((label_values == 0).sum()),
        "unlabelled_hips": int((label_values < 0).sum()),
        "patients_with_ct": int(sum(bool(p["has_ct"]) for p in patients)),
        "patients_with_ct_pairs": int(sum(int(p["pairs"]) > 0 for p in patients)),
        "pairs": n_pairs,
        "protocol_hips": {p: int(available[:, i].sum()) for i, p in enumerate(settings.protocols)},
        "protocol_patients": {p: int(sum(p in s["protocols"] for s in patients)) for p in settings.protocols},
        "low_confidence_hips": int((confidence < LOW_CONFIDENCE).sum()),
    }
