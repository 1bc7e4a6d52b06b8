"""The demo's VAE trainer: the loss falls, every leaf learns, and the written folder is an official
VAE that load_vae and diffusers' AutoencoderKLHunyuanVideo read and decode alike."""

from __future__ import annotations

import json
import math

import pytest
import torch
from reference import diffusers_vae, rel_err

from hvfunc import params, vae
from hvfunc.config import VAE_PRESETS
from hvfunc.data.synthetic import make_dataset
from hvfunc.vae.ckpt import load_vae
from parallel.vae_train import VAETrainConfig, train_init, train_vae, vae_loss

CFG = VAE_PRESETS["tiny"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_train")
    data = make_dataset(root / "data", num_clips=2, seed=0)
    cfg = VAETrainConfig(data=data, out=root / "run", steps=40, batch_size=2, frames=5, crop=32, lr=3e-3,
                         image_fraction=0.0, progress=False)
    return cfg, train_vae(cfg)


def test_loss_falls(run):
    cfg, _ = run
    losses = [json.loads(x)["loss"] for x in (cfg.out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == cfg.steps and all(math.isfinite(v) for v in losses)
    q = cfg.steps // 4
    first, last = sum(losses[:q]) / q, sum(losses[-q:]) / q
    assert last < 0.5 * first, (first, last)  # measured: 0.282 -> 0.101 (ratio 0.36)
    ev = json.loads((cfg.out / "eval.json").read_text())
    assert ev["after"]["psnr"] > ev["before"]["psnr"] + 5, ev  # measured: 6.74 -> 18.55 dB (background alone: ~17)


def test_folder_is_an_official_vae(run):
    """load_vae reads it; diffusers loads the state dict strictly and decodes the same."""
    cfg, folder = run
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "pytorch_model.pt"]
    p, vcfg = load_vae(folder)
    assert vcfg == CFG.replace(scaling_factor=vcfg.scaling_factor)
    ev = json.loads((cfg.out / "eval.json").read_text())
    assert abs(ev["after"]["latent_std"] - 1) < 0.01, ev  # scaling_factor: 1 / std of the posterior means
    init = train_init(vcfg, cfg.seed, torch.device("cpu"))
    assert all(not torch.equal(p[k], init[k]) for k in p if k.endswith(".weight")), "weights did not train"
    ref = diffusers_vae(vcfg, p)  # load_state_dict(strict=True)
    z = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(vae.decode(p, z, cfg=vcfg), ref.decode(z).sample) <= 1e-5
        x = torch.rand(1, 3, 9, 32, 48, generator=torch.Generator().manual_seed(2)) * 2 - 1
        assert rel_err(vae.encode(p, x, cfg=vcfg)[0], ref.encode(x).latent_dist.mean) <= 1e-5


def test_inflated_init_keeps_latent_frames_apart():
    """With torch's default init the causal convs' replicate padding lets frame 0 set every latent
    frame; train_init's inflated convs make latent frame j an encoding of its own frames."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 17, 32, 64, generator=g) * 2 - 1
    y = x.clone()
    y[:, :, 0] = torch.rand(3, 32, 64, generator=g) * 2 - 1  # a new frame 0
    moved = {}
    for name, p in (("default", params.init(vae.vae_spec(CFG), generator=torch.Generator().manual_seed(0))),
                    ("inflated", train_init(CFG, 0, torch.device("cpu")))):
        with torch.no_grad():
            d = (vae.encode(p, y, cfg=CFG)[0] - vae.encode(p, x, cfg=CFG)[0]).abs().mean((0, 1, 3, 4))
        moved[name] = float(d[4] / d[0])  # last latent frame (frames 13-16) against the first (frame 0)
    assert moved["default"] > 0.5 and moved["inflated"] < 0.2, moved  # measured: 0.91, 0.06


@pytest.mark.parametrize("frames", [1, 5])
def test_every_leaf_gets_a_gradient(frames):
    """Clips and lone frames: no leaf is unused (None grad) or dead (all-zero grad)."""
    p = {k: v.requires_grad_() for k, v in
         params.init(vae.vae_spec(CFG), generator=torch.Generator().manual_seed(0)).items()}
    x = torch.rand(2, 3, frames, 16, 24, generator=torch.Generator().manual_seed(3)) * 2 - 1
    loss, _, _ = vae_loss(p, x, cfg=CFG, kl_weight=1e-4, generator=torch.Generator().manual_seed(4))
    loss.backward()
    bad = sorted(k for k, v in p.items() if v.grad is None or not v.grad.abs().sum() > 0)
    assert bad == [], bad


def test_bad_crop_names_the_bucket(tmp_path):
    data = make_dataset(tmp_path / "data", num_clips=1, seed=0)
    with pytest.raises(ValueError, match=r"--crop 128 is larger than bucket"):
        train_vae(VAETrainConfig(data=data, out=tmp_path / "run", crop=128, steps=1, progress=False))
