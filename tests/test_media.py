"""hvfunc.media: I2V buckets against upstream's published sizes, output frames against diffusers'
post-processing, the mp4 writer's round trip, the resize rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hvfunc import media
from hvfunc.data.video import decode


@pytest.mark.parametrize("h, w, base, want", [
    (720, 1280, 960, (704, 1248)),  # hunyuanvideo-official.md section 5: 720p bucket of a 16:9 image
    (1000, 1000, 960, (960, 960)),  # 720p square
    (1280, 720, 960, (1248, 704)),
    (960, 540, 720, (928, 512)),    # mindspeed-mm.md section 5: I2V input_size [65, 928, 512] (540p portrait)
])
def test_i2v_buckets_are_upstreams(h, w, base, want):
    assert media.nearest_bucket(h, w, base=base) == want


def test_bucket_list_follows_upstreams_walk():
    buckets = media.crop_size_list(960, 32)
    n = (960 // 32) ** 2
    assert buckets[0] == (1920, 480) and buckets[-1] == (480, 1920)  # 60 x 15 patches: the 4:1 extremes
    assert (960, 960) in buckets and len(set(buckets)) == len(buckets)
    assert all(a * b <= n * 32 * 32 and max(a, b) / min(a, b) <= 4 for a, b in buckets)
    assert all(a % 32 == 0 and b % 32 == 0 for a, b in buckets)


def test_frames_equal_diffusers_postprocess():
    from diffusers.video_processor import VideoProcessor

    video = torch.randn(1, 3, 5, 16, 24, generator=torch.Generator().manual_seed(0)) * 1.2  # some out of [-1, 1]
    ours = media.to_uint8(video[0])
    pil = VideoProcessor(vae_scale_factor=8).postprocess_video(video, output_type="pil")[0]
    assert ours.shape == (5, 16, 24, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, np.stack([np.asarray(im) for im in pil]))


def test_mp4_round_trip(tmp_path):
    frames = np.zeros((9, 32, 48, 3), np.uint8)
    frames[:, :, :24] = (200, 40, 40)
    frames[4:, :, 24:] = (40, 200, 40)
    media.write_mp4(tmp_path / "v.mp4", frames, 24)
    back = decode(tmp_path / "v.mp4", list(range(9)), backend="pyav").numpy()
    assert back.shape == frames.shape and np.abs(back.astype(int) - frames).max() <= 12
    assert not list(tmp_path.glob(".*"))  # written through a temporary file, renamed
    with pytest.raises(ValueError, match="uint8"):
        media.write_mp4(tmp_path / "w.mp4", frames.astype(np.float32), 24)


def test_resize_rules_and_image_errors(tmp_path):
    im = np.zeros((50, 100, 3), np.uint8)  # 100 wide, 50 high: red left edge, blue right edge
    im[:, :10] = (255, 0, 0)
    im[:, -10:] = (0, 0, 255)
    pil = Image.fromarray(im)
    cover = media.image_tensor(pil, 32, 32, exact=False)  # scale 0.64 -> 64 x 32, centre 32 columns
    assert cover.shape == (3, 32, 32) and float(cover.min()) == -1.0 and float(cover.max()) == -1.0
    exact = media.image_tensor(pil, 32, 32, exact=True)  # squashed: both edges stay in
    assert float(exact[0, :, 0].mean()) > 0.9 and float(exact[2, :, -1].mean()) > 0.9
    (tmp_path / "bad.png").write_bytes(b"no image")
    with pytest.raises(ValueError, match="cannot read image .*bad.png"):
        media.load_image(tmp_path / "bad.png")
    with pytest.raises(ValueError, match="image not found"):
        media.load_image(tmp_path / "none.png")
