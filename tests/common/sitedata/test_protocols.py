"""Tests of the protocol rules: default mapping of series names, site TOML files, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.sitedata.protocols import DEFAULT_RULES_TOML, ProtocolRules, ProtocolRulesError

DEFAULT_CASES = [
    ("T1 TSE COR", "COR", "T1_COR"),
    ("t1_tse_cor", "COR", "T1_COR"),
    ("COR T1", "COR", "T1_COR"),
    ("T1W_TSE_COR", "COR", "T1_COR"),
    ("T2 DIXON W COR", "COR", "T2W_COR"),
    ("t2_dixon_cor_W", "COR", "T2W_COR"),
    ("COR T2 FS", "COR", "T2W_COR"),
    ("COR STIR", "COR", "T2W_COR"),
    ("t2_tse_fs_tra", "AX", "T2W_AX"),
    ("AX T2 FS", "AX", "T2W_AX"),
    ("T1 TSE AX", "AX", "T1_AX"),
    ("t1_tse_tra", "AX", "T1_AX"),
    ("PD FS SAG", "SAG", "PDFS_SAG"),
    ("pd_tse_fs_sag", "SAG", "PDFS_SAG"),
    ("SAG PD SPAIR", "SAG", "PDFS_SAG"),
    # Dixon fat / in-phase / opposed-phase images are not the water image.
    ("T2 DIXON F COR", "COR", None),
    ("t2_dixon_cor_F", "COR", None),
    ("t2_dixon_cor_IP", "COR", None),
    ("t2_dixon_cor_OPP", "COR", None),
    # Localisers never map.
    ("LOCALIZER", "COR", None),
    ("Survey", "AX", None),
    ("3-plane loc", "SAG", None),
    # Without fat suppression a T2 or PD is none of the five protocols.
    ("T2 TSE COR", "COR", None),
    ("PD TSE SAG", "SAG", None),
    ("T1 TSE COR post Gd", "COR", None),
]


@pytest.mark.parametrize(("description", "orientation", "key"), DEFAULT_CASES)
def test_default_rules_map_site_names(description: str, orientation: str, key: str | None) -> None:
    assert ProtocolRules.default().match(description, orientation, "MR") == key


def test_orientation_comes_from_geometry_not_name() -> None:
    rules = ProtocolRules.default()
    assert rules.match("T1 TSE COR", "AX", "MR") == "T1_AX"
    assert rules.match("PD FS SAG", "COR", "MR") is None


def test_ct_and_other_modalities() -> None:
    rules = ProtocolRules.default()
    assert rules.match("Pelvis 1.0 Bone", "AX", "CT") == "CT"
    assert rules.match("T1 TSE COR", "COR", "OT") is None
    assert rules.match("", "COR", "MR") is None


def test_default_keys_in_settings_order() -> None:
    from common.sitedata.settings import DEFAULT_PROTOCOLS

    assert ProtocolRules.default().keys == DEFAULT_PROTOCOLS


def test_site_toml_rules_in_order(tmp_path: Path) -> None:
    path = tmp_path / "protocols.toml"
    path.write_text(
        "ignore = 'scout'\n"
        "[[rule]]\nkey = 'T1_COR'\ndescription = '^cor_t1_'\norientation = 'cor'\n"
        "[[rule]]\nkey = 'WATER'\ndescription = 'water'\nexclude = 'fat'\n"
    )
    rules = ProtocolRules.from_toml(path)
    assert rules.keys == ("T1_COR", "WATER")
    assert rules.match("COR_T1_SE", "COR", "MR") == "T1_COR"
    assert rules.match("COR_T1_SE", "AX", "MR") is None
    assert rules.match("Water image", "SAG", "MR") == "WATER"
    assert rules.match("water fat", "SAG", "MR") is None
    assert rules.match("water scout", "SAG", "MR") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[rule]\nkey='A'", "not valid TOML"),
        (
            "[[rule]]\nkey='T1_COR'\ndescription='t1('",
            "rule 1 (key 'T1_COR') description: bad regular expression",
        ),
        (
            "[[rule]]\nkey='T1_COR'\ndescription='t1'\norientation='OBL'",
            "orientation 'OBL' is not AX, COR or SAG",
        ),
        ("[[rule]]\ndescription='t1'", "rule 1: key must be a name"),
        ("[[rule]]\nkey='CT'\ndescription='t1'", "key must be a name"),
        ("[[rule]]\nkey='T1_COR'", "has no description"),
        ("[[rule]]\nkey='T1_COR'\ndescription='t1'\nplane='COR'", "unknown fields ['plane']"),
        ("ignore = 'loc'", "no [[rule]] tables"),
        ("rules = 1", "unknown top-level entries"),
    ],
)
def test_bad_toml_names_file_and_entry(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "protocols.toml"
    path.write_text(text)
    with pytest.raises(ProtocolRulesError) as caught:
        ProtocolRules.from_toml(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "Fix:" in message


def test_docs_show_the_default_rules() -> None:
    docs = (Path(__file__).parents[3] / "docs" / "site-data.md").read_text()
    assert DEFAULT_RULES_TOML.strip() in docs
