"""Synthetic but realistic-looking patient identifiers, dates and DICOM UIDs (deterministic per seed)."""

from __future__ import annotations

import datetime as dt

import numpy as np
from pydicom.uid import generate_uid

FAMILY_NAMES = (
    "KIM", "LEE", "PARK", "CHOI", "JUNG", "KANG", "CHO", "YOON", "JANG", "LIM",
    "HAN", "OH", "SEO", "SHIN", "KWON", "HWANG", "AHN", "SONG", "JEON", "HONG",
)  # fmt: skip
GIVEN_NAMES_MALE = (
    "MINJUN", "SEOJUN", "DOYUN", "JIHO", "JUNWOO", "HYUNWOO", "JIHOON", "SUNGMIN", "DONGHYUN",
    "YOUNGSOO", "JAEHYUN", "SANGHOON", "TAEYANG", "WOOJIN", "KYUNGHO", "BYUNGCHUL",
)  # fmt: skip
GIVEN_NAMES_FEMALE = (
    "SEOYEON", "JIWOO", "SEOYUN", "HAEUN", "MINSEO", "JIYOUNG", "EUNJI", "SOYEON", "HYEJIN",
    "MIKYUNG", "YUNA", "SUJIN", "JIMIN", "DAEUN", "HYUNJOO", "EUNHEE",
)  # fmt: skip

# PatientID (hospital MRN) formats, one per site style.
MRN_FORMATS = ("H{:08d}", "{:010d}", "{:02d}-{:06d}", "K{:07d}")


def person_name(rng: np.random.Generator, sex: str) -> str:
    """A DICOM PN like ``"KIM^MINJUN"``."""
    given = GIVEN_NAMES_MALE if sex == "M" else GIVEN_NAMES_FEMALE
    return f"{FAMILY_NAMES[rng.integers(len(FAMILY_NAMES))]}^{given[rng.integers(len(given))]}"


def medical_record_number(rng: np.random.Generator, style: int) -> str:
    """A hospital MRN in the site's ``style`` (index into ``MRN_FORMATS``)."""
    fmt = MRN_FORMATS[style % len(MRN_FORMATS)]
    if fmt.count("{") == 2:
        return fmt.format(int(rng.integers(10, 99)), int(rng.integers(0, 10**6)))
    digits = 8 if "08" in fmt else (10 if "010" in fmt else 7)
    return fmt.format(int(rng.integers(10 ** (digits - 2), 10**digits)))


def accession_number(rng: np.random.Generator, prefix: str, date: dt.date) -> str:
    """An accession number like ``"RA20210314-04321"`` (max 16 characters)."""
    return f"{prefix}{date:%Y%m%d}{int(rng.integers(0, 10**5)):05d}"[:16]


def random_date(rng: np.random.Generator, start: dt.date, end: dt.date) -> dt.date:
    """A uniformly drawn date in ``[start, end]``."""
    return start + dt.timedelta(days=int(rng.integers(0, (end - start).days + 1)))


def dicom_date(date: dt.date) -> str:
    """``YYYYMMDD``."""
    return f"{date:%Y%m%d}"


def dicom_time(rng: np.random.Generator) -> str:
    """A working-hours ``HHMMSS.ffffff`` time."""
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return (
        f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{int(rng.integers(0, 10**6)):06d}"
    )


def uid(*parts: object) -> str:
    """A valid DICOM UID derived deterministically from ``parts`` (seed, site, patient, ...)."""
    return generate_uid(entropy_srcs=["onfh-synth", *[str(p) for p in parts]])
