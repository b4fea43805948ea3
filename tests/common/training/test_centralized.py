"""``onfh train`` (pooled and --local) and ``train_two_phase`` on the tiny synthetic federation."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import RunConfig, load_run_config
from common.models.factory import build_staging, build_translation
from common.models.transfer import encoder_state_from_translation
from common.sitedata.load import SiteData, load_site
from common.training.centralized import evaluate_sites, main, pretrain_translation, train_two_phase

REPO = Path(__file__).resolve().parents[3]
SITES = ("site-00", "site-01")


def strict_json(path: Path) -> dict:
    """Parse JSON, failing on NaN/Infinity (results must be strict JSON)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def write_test_preset(path: Path, **extra) -> Path:
    """presets/tiny.toml with an even smaller phase-1 budget: these tests check behaviour only."""
    values = tomllib.loads((REPO / "presets" / "tiny.toml").read_text())
    values.update({"pretrain-max-pairs": 16, "batch-size": 4, **extra})
    path.write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return path


def shared_cache(tmp_path_factory) -> Path:
    """One preprocessing cache for the tiny federation, shared by the train and predict tests."""
    return tmp_path_factory.getbasetemp() / "tiny-train-cache"


def load_tiny_sites(federation: Path, cache: Path, cfg: RunConfig, split_seed: int) -> list[SiteData]:
    return [
        load_site(
            federation / name, cache / name, cfg.preprocess, split_seed=split_seed, name=name, workers=2
        )
        for name in SITES
    ]


def pick_split_seed(federation: Path, cache: Path, cfg: RunConfig) -> int:
    """The first split seed whose pooled test hips hold two stages or more (AUROC defined)."""
    for seed in range(20):  # the first load fills the cache; the others only re-split patients
        sites = load_tiny_sites(federation, cache, cfg, seed)
        if len({int(s) for site in sites for s in site.staging_set("test")[2]}) >= 2:
            return seed
    raise AssertionError("no split seed gives two test stages on the tiny federation")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tiny_federation, tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("centralized")
    preset = write_test_preset(work / "test.toml")
    cache = shared_cache(tmp_path_factory)
    seed = pick_split_seed(tiny_federation, cache, load_run_config(preset))
    preset = write_test_preset(work / "test.toml", **{"split-seed": seed})  # the CLI reads it there
    cfg = load_run_config(preset, seed=seed)
    return {"work": work, "preset": preset, "cache": cache, "seed": seed, "cfg": cfg, "fed": tiny_federation}


@pytest.fixture(scope="module")
def pooled_run(setup) -> tuple[int, str, str, Path]:
    out = setup["work"] / "out"
    argv = [setup["fed"] / n for n in SITES]
    argv += [
        "--config",
        setup["preset"],
        "--seed",
        setup["seed"],
        "--cache-dir",
        setup["cache"],
        "--out",
        out,
    ]
    return (*run_cli(argv), out)


@pytest.fixture(scope="module")
def sites(setup) -> list[SiteData]:
    return load_tiny_sites(setup["fed"], setup["cache"], setup["cfg"], setup["seed"])


def test_pooled_run_writes_the_documented_layout(pooled_run, sites, setup):
    rc, stdout, stderr, out = pooled_run
    assert rc == 0, stderr
    run_dir = out / "pooled"
    assert sorted(p.name for p in run_dir.iterdir()) == ["final_model.npz", "results.json", "run_config.json"]
    saved_cfg = RunConfig.from_dict(json.loads((run_dir / "run_config.json").read_text()))
    assert saved_cfg == setup["cfg"]
    results = strict_json(run_dir / "results.json")
    assert results["train"]["sites"] == list(SITES)
    assert results["train"]["pretrained_encoder"] is True
    assert results["train"]["pretrain"]["n_samples"] <= 2 * 16  # pretrain-max-pairs per site with pairs
    n_train = sum(len(s.staging_set("train")[2]) for s in sites)
    assert results["train"]["stage"]["n_samples"] == n_train
    pooled = results["test"]["pooled"]
    assert 0.0 <= pooled["macro_auroc"] <= 1.0
    assert pooled["n_samples"] == sum(len(s.staging_set("test")[2]) for s in sites)
    assert np.asarray(pooled["confusion_matrix"]).sum() == pooled["n_samples"]
    assert f"pooled: test macro AUROC {pooled['macro_auroc']:.3f}" in stdout
    with np.load(run_dir / "final_model.npz") as weights:
        assert set(weights.files) == set(build_staging(setup["cfg"].model).state_dict())
        assert all(np.isfinite(weights[k]).all() for k in weights.files)


@pytest.mark.slow  # two more trainings: about a minute on 2 shared cores
def test_local_mode_trains_one_model_per_site(setup):
    out = setup["work"] / "local"
    argv = [setup["fed"] / n for n in SITES]
    argv += ["--local", "--config", setup["preset"], "--seed", setup["seed"]]
    rc, stdout, stderr = run_cli([*argv, "--cache-dir", setup["cache"], "--out", out])
    assert rc == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == list(SITES)
    for name in SITES:
        results = strict_json(out / name / "results.json")
        assert results["train"]["sites"] == [name]
        assert set(results["test"]["sites"]) <= {name}
        auroc = results["test"].get("pooled", {}).get("macro_auroc")
        assert auroc is None or 0.0 <= auroc <= 1.0  # None: fewer than two stages in this site's test set
        assert (out / name / "final_model.npz").is_file()
        assert f"{name}: test macro AUROC" in stdout


def test_train_two_phase_ablation_switches(sites, setup):
    cfg = setup["cfg"]
    random_net, random_info = train_two_phase(sites, cfg.replace(pretrained=False, fusion="plain"))
    assert "pretrain" not in random_info and random_info["pretrained_encoder"] is False
    assert random_net.fusion == "plain"
    # A given phase-1 state is reused as is (phase 1 does not run again).
    translation = _translation_state(cfg, seed=123)
    lines: list[str] = []
    cfg_one = cfg.replace(stage_rounds=1, stage_epochs=1)
    net, info = train_two_phase(sites, cfg_one, progress=lines.append, translation_state=translation)
    assert info["pretrained_encoder"] is True and "pretrain" not in info
    assert lines and not any("pretraining" in line for line in lines)
    scores = evaluate_sites(net, sites)
    assert set(scores["sites"]) <= set(SITES)


def test_pretraining_target_decides_what_phase_one_teaches(sites, setup):
    """The pretraining control: "mr-denoise" fits the MR itself, "ct" the CT (same pairs, same budget)."""
    from common.training.datasets import DenoisingPairs

    mr, ct = (
        np.concatenate(arrays) for arrays in zip(*(s.pair_set("train", "val") for s in sites), strict=True)
    )
    denoising = DenoisingPairs(mr)
    mr_target = np.stack([denoising[i]["ct"][0].numpy() for i in range(len(mr))])
    errors = {}
    for target in ("ct", "mr-denoise"):
        cfg = setup["cfg"].replace(pretrain_target=target, pretrain_rounds=10, pretrain_epochs=2)
        state, stats = pretrain_translation(sites, cfg)
        net = build_translation(cfg.model)
        net.load_state_dict(state)
        with torch.no_grad():
            out = net.eval()(torch.from_numpy(mr[:, None])).numpy()[:, 0]
        errors[target] = (np.abs(out - ct).mean(), np.abs(out - mr_target).mean())
    assert errors["ct"][0] < errors["ct"][1]  # the MR-to-CT net is closer to the CT than to the MR
    assert errors["mr-denoise"][1] < errors["mr-denoise"][0]  # and the denoiser the other way
    assert errors["mr-denoise"][1] < errors["ct"][1] and errors["ct"][0] < errors["mr-denoise"][0]


def _translation_state(cfg: RunConfig, seed: int) -> dict[str, torch.Tensor]:
    """A translation net's state that differs from any the staging net would draw itself."""
    torch.manual_seed(seed)
    return build_translation(cfg.model).state_dict()


def test_pretrained_encoder_is_loaded_before_fine_tuning(sites, setup, monkeypatch):
    import common.training.centralized as centralized

    cfg = setup["cfg"].replace(stage_rounds=1, stage_epochs=1)
    translation = _translation_state(cfg, seed=321)
    captured = {}
    real_train = centralized.train_staging

    def record_start(net, *args, **kwargs):
        captured["encoder"] = {k: v.clone() for k, v in net.encoder.state_dict().items()}
        return real_train(net, *args, **kwargs)

    monkeypatch.setattr(centralized, "train_staging", record_start)
    train_two_phase(sites, cfg, translation_state=translation)
    expected = encoder_state_from_translation(translation)
    for key, value in captured["encoder"].items():
        assert torch.equal(value, expected[f"encoder.{key}"]), key


def test_no_labelled_training_hip_is_a_clear_error(sites, setup):
    unlabelled = [dataclasses.replace(s, stages=np.zeros_like(s.stages)) for s in sites]
    with pytest.raises(ValueError, match="no labelled training hip in site-00, site-01.*labels.csv"):
        train_two_phase(unlabelled, setup["cfg"])


def test_missing_site_folder_exits_2_with_a_message(tmp_path):
    rc, stdout, stderr = run_cli([tmp_path / "nowhere", "--cache-dir", tmp_path / "cache", "--out", tmp_path])
    assert rc == 2
    assert "nowhere does not exist" in stderr and "Traceback" not in stderr + stdout


def test_bad_preset_exits_2_naming_the_key_and_file(tmp_path, tiny_federation):
    preset = tmp_path / "bad.toml"
    preset.write_text("stage-rounds = 1\nlearning-rate = 0.1\n")
    rc, _, stderr = run_cli([tiny_federation / "site-00", "--config", preset, "--out", tmp_path / "out"])
    assert rc == 2
    assert "unknown run config key 'learning-rate'" in stderr and str(preset) in stderr
    missing = tmp_path / "missing.toml"
    rc, _, stderr = run_cli([tiny_federation / "site-00", "--config", missing, "--out", tmp_path / "out"])
    assert rc == 2 and "missing.toml not found" in stderr
    assert not (tmp_path / "out").exists()
