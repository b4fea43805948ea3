"""``onfh adapt``: a delivered model fitted to a new site's scanners (batch statistics from unlabelled
hips) and, optionally, to a few of its labels; the adapted folder is one ``onfh evaluate`` takes."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest
import torch
from torch import nn

from common.adapt import adapt, adapt_batch_statistics, main, pick_labelled
from common.evaluate import main as evaluate_main
from common.predict import load_model
from common.sitedata.load import load_site
from tests.common.test_predict import run_dir  # noqa: F401  (a model trained on site-00)


@pytest.fixture(scope="module")
def new_site(run_dir, tiny_federation, tmp_path_factory):  # noqa: F811
    """site-01, which the model never saw, preprocessed with the model's settings."""
    _, cfg, _ = load_model(run_dir)
    cache = tmp_path_factory.mktemp("adapt-cache")
    return load_site(tiny_federation / "site-01", cache, cfg.preprocess, split_seed=cfg.split_seed)


def test_batch_statistics_become_the_new_sites_own(run_dir, new_site):  # noqa: F811
    """After adaptation the first batch-norm layer's running mean is the mean of what reaches it
    from the site's hips (equal-size batches: the average of batch means is the mean), and no
    weight moved."""
    net, _, _ = load_model(run_dir)
    weights = {
        k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k
    }
    first = next(m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))
    before = first.running_mean.clone()
    images, available, _ = new_site.staging_set("train", "val")
    n = len(images) - len(images) % 2
    seen: list[torch.Tensor] = []
    hook = first.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0].detach()))
    layers = adapt_batch_statistics(net, images[:n], available[:n], batch_size=2)
    hook.remove()
    assert layers > 0
    channel_means = torch.stack([x.transpose(0, 1).reshape(x.shape[1], -1).mean(1) for x in seen])
    assert torch.allclose(first.running_mean, channel_means.mean(0), atol=1e-5)
    assert not torch.allclose(first.running_mean, before)
    for key, value in net.state_dict().items():
        if key in weights:
            assert torch.equal(value, weights[key]), key


def test_labelled_hips_are_drawn_by_whole_training_patients(new_site):
    keys = new_site.staging_patients("train")
    for n in (1, 3):
        pick = pick_labelled(new_site, n, seed=0)
        assert len(pick) >= min(n, len(keys))
        chosen = set(keys[pick])
        assert set(np.flatnonzero(np.isin(keys, list(chosen)))) == set(pick)  # both hips or neither
        assert np.array_equal(pick, pick_labelled(new_site, n, seed=0))  # the same draw again
    assert len(pick_labelled(new_site, None)) == len(keys)
    test_patients = set(new_site.staging_patients("test"))
    assert not test_patients & set(keys[pick_labelled(new_site, None)])


def test_fine_tuning_uses_only_the_labels_it_reports(run_dir, new_site):  # noqa: F811
    net, cfg, _ = load_model(run_dir)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    info = adapt(net, cfg, new_site, labels=2, epochs=1)
    assert info["labelled-hips"] >= 2 and sum(info["stages-used"]) == info["labelled-hips"]
    assert info["unlabelled-hips"] == len(new_site.staging_set("train", "val")[2])
    moved = [k for k, v in net.state_dict().items() if "weight" in k and not torch.equal(v, start[k])]
    assert moved  # fine-tuning trained the network


def test_onfh_adapt_writes_a_folder_onfh_evaluate_takes(run_dir, tiny_federation, tmp_path):  # noqa: F811
    out = tmp_path / "adapted"
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert main([str(tiny_federation / "site-01"), "--model", str(run_dir), "--out", str(out)]) == 0
    record = json.loads((out / "adaptation.json").read_text())
    assert record["labelled-hips"] == 0 and record["batch-norm-layers"] > 0
    assert "onfh evaluate" in stdout.getvalue()
    source = np.load(run_dir / "final_model.npz")
    adapted = np.load(out / "final_model.npz")
    stats = [k for k in source.files if k.endswith("running_mean")]
    assert stats and any(not np.array_equal(source[k], adapted[k]) for k in stats)
    with contextlib.redirect_stdout(io.StringIO()):
        assert evaluate_main([str(tiny_federation / "site-01"), "--model", str(out), "--split", "all"]) == 0
    assert (out / "evaluation" / "evaluation.json").is_file()


@pytest.mark.parametrize(
    "argv, message", [(["--labels", "-3"], "--labels"), (["--labels", "some"], "--labels")]
)
def test_bad_arguments_exit_2_naming_the_option(run_dir, tiny_federation, tmp_path, argv, message):  # noqa: F811
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(
            [str(tiny_federation / "site-01"), "--model", str(run_dir), "--out", str(tmp_path / "o"), *argv]
        )
    assert rc == 2 and message in err.getvalue()


def test_the_delivered_model_is_never_overwritten(run_dir, tiny_federation):  # noqa: F811
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main([str(tiny_federation / "site-01"), "--model", str(run_dir), "--out", str(run_dir)]) == 2
    assert "--out must differ" in err.getvalue()
