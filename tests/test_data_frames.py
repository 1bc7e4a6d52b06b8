"""Frame and space arithmetic of hvfunc.data against hand-computed cases and upstream's definitions."""

import pytest
import torch
import torch.nn.functional as F

from hvfunc.config import DataConfig, data_preset
from hvfunc.data.transform import center_crop_box, dynamic_size, target_size, to_model_input
from hvfunc.data.video import ClipError, clip_length, resample, select_frames, valid_length

HV = data_preset("hunyuan-video-t2v")


@pytest.mark.parametrize("n, fps, train, start, expected", [
    (10, 24, 24, 0, list(range(10))),           # same rate: every frame
    (10, 24.05, 24, 0, list(range(10))),        # within 0.1 fps counts as the same rate
    (10, 60, 24, 0, [0, 2, 5, 7]),              # step 2.5: floor(0, 2.5, 5, 7.5); 1/6 s at 24 fps = 4 frames
    (6, 30, 24, 0, [0, 1, 2, 3, 5]),            # step 1.25: floor(0, 1.25, 2.5, 3.75, 5)
    (7, 29.97, 24, 0, [0, 1, 2, 3, 4, 6]),      # step 1.24875: 4.995 -> 4, 6.24 -> 6
    (5, 12, 24, 0, [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]),  # slower source: frames repeat (real-time speed kept)
    (4, 24, 24, 10, [10, 11, 12, 13]),          # "cut" start frame offsets every index
    (5, 60, None, 0, [0, 1, 2, 3, 4]),          # train_fps None: the source rate
])
def test_fps_resampling(n, fps, train, start, expected):
    assert resample(n, fps, train, start) == expected


def _find_closest_y(x: int, min_frames: int, stride: int, cp: int) -> int:
    """Upstream's definition (MindSpeed-MM find_closest_y), a literal downward search."""
    for y in range(x, min_frames - 1, -1):
        if (y - 1) % stride == 0 and ((y - 1) // stride + 1) % cp == 0:
            return y
    return 0


@pytest.mark.parametrize("n, min_frames, stride, cp, expected", [
    (93, 29, 4, 1, 93), (100, 29, 4, 1, 97), (96, 29, 4, 1, 93), (29, 29, 4, 1, 29), (28, 29, 4, 1, 0),
    (93, 29, 4, 4, 93), (92, 29, 4, 4, 77), (93, 29, 4, 8, 93), (100, 29, 4, 8, 93), (93, 29, 4, 5, 77),
    (60, 29, 4, 8, 29), (28, 1, 4, 8, 0), (50, 29, 8, 2, 41), (1, 1, 4, 1, 1), (0, 1, 4, 1, 0),
])
def test_4k_plus_1_and_cp_divisibility(n, min_frames, stride, cp, expected):
    y = valid_length(n, min_frames=min_frames, temporal_stride=stride, cp=cp)
    assert y == expected
    if y:
        assert (y - 1) % stride == 0 and ((y - 1) // stride + 1) % cp == 0 and min_frames <= y <= n


def test_valid_length_equals_upstream_search_everywhere():
    for stride in (4, 8):
        for cp in range(1, 9):
            for n in range(0, 200):
                assert valid_length(n, min_frames=29, temporal_stride=stride, cp=cp) == \
                    _find_closest_y(n, 29, stride, cp), (n, stride, cp)


@pytest.mark.parametrize("n, fps, expected", [
    (300, 60, 93),   # 120 frames at 24 fps, capped at num_frames 93
    (100, 30, 77),   # 80 frames at 24 fps -> 4k+1 below: 77
    (50, 24, 49),
    (28, 24, 0),     # 25 < min_frames 29: skip
    (20, 12, 37),    # 40 frames at 24 fps (each shown twice) -> largest 4k+1 <= 40
])
def test_clip_length_hunyuan_preset(n, fps, expected):
    assert clip_length(n, fps, cfg=HV) == expected


def test_clip_length_with_cp():
    assert clip_length(100, 24, cfg=HV.replace(cp=8)) == 93  # 24 latent frames
    assert clip_length(80, 24, cfg=HV.replace(cp=8)) == 61   # 20 -> 16 latent frames
    assert clip_length(80, 24, cfg=HV.replace(cp=3)) == 69   # 20 -> 18 latent frames


def test_random_window_is_uniform_over_every_start_and_seeded():
    starts = set()
    for seed in range(200):
        idx = select_frames(10, 24, length=7, train_fps=24, generator=torch.Generator().manual_seed(seed))
        assert idx == list(range(idx[0], idx[0] + 7))
        starts.add(idx[0])
    assert starts == {0, 1, 2, 3}  # upstream's TemporalRandomCrop never draws the last start (3)
    a = select_frames(60, 60, length=9, train_fps=24, start_frame=5, generator=torch.Generator().manual_seed(1))
    b = select_frames(60, 60, length=9, train_fps=24, start_frame=5, generator=torch.Generator().manual_seed(1))
    assert a == b and set(a) <= set(resample(60, 60, 24, 5))
    with pytest.raises(ValueError, match="does not fit"):
        select_frames(10, 24, length=11, train_fps=24, generator=torch.Generator())


@pytest.mark.parametrize("h, w, stride, expected", [
    (1080, 1920, 16, (464, 848)),  # scale sqrt(407040/2073600): 478.50 x 850.66 -> 478 x 850 -> /16
    (1080, 1920, 8, (472, 848)),
    (720, 1280, 16, (464, 848)),
    (1920, 1080, 16, (848, 464)),  # portrait
    (480, 848, 16, (480, 848)),    # at max_area: unchanged
    (300, 500, 16, (288, 496)),    # below max_area: only aligned
])
def test_dynamic_size(h, w, stride, expected):
    assert dynamic_size(h, w, max_area=407040, stride=stride) == expected


def test_target_size_limits():
    assert target_size(1080, 1920, HV) == (464, 848)
    with pytest.raises(ClipError, match="bad_aspect"):
        target_size(400, 1000, HV)  # h/w 0.4 < 1/2
    with pytest.raises(ClipError, match="too_small"):
        target_size(200, 300, HV)  # 60000 < 407040 / 4
    fixed = HV.replace(resize="fixed")
    assert target_size(1080, 1080, fixed) == (480, 848)  # h/w 1.0 within [0.283, 1.132]
    with pytest.raises(ClipError, match="bad_aspect"):
        target_size(1280, 720, fixed)  # portrait 1.78 > 1.132
    with pytest.raises(ClipError, match="too_small"):
        target_size(100, 160, HV.replace(min_area=20000))


def test_bad_config_is_fatal():
    with pytest.raises(ValueError, match="multiples of stride"):
        DataConfig(resize="fixed", max_height=100, max_width=160)
    with pytest.raises(ValueError, match="min_frames"):
        DataConfig(num_frames=17, min_frames=29)
    with pytest.raises(ValueError, match="unknown data preset"):
        data_preset("nope")


@pytest.mark.parametrize("h, w, oh, ow, expected", [
    (1080, 1920, 480, 848, (0, 6, 1080, 1908)),  # 1080*848/480 = 1908: crop 6 columns each side
    (100, 100, 50, 100, (25, 0, 50, 100)),
    (64, 96, 64, 96, (0, 0, 64, 96)),
    (96, 64, 64, 96, (27, 0, 42, 64)),  # 64*64/96 = 42.67 -> 42 rows, top (96-42)//2
])
def test_center_crop_box(h, w, oh, ow, expected):
    assert center_crop_box(h, w, oh, ow) == expected


def test_model_input_range_layout_and_resize():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (3, 40, 60, 3), generator=g, dtype=torch.uint8)
    frames[0] = 0
    frames[1] = 255
    same = to_model_input(frames[:, 5:35], 30, 60)  # no resize: exact
    assert same.shape == (3, 3, 30, 60)
    assert torch.equal(same, frames[:, 5:35].permute(3, 0, 1, 2).float() / 127.5 - 1)
    assert same[:, 0].eq(-1).all() and same[:, 1].eq(1).all()
    out = to_model_input(frames, 16, 32)  # crop 40x60 -> 30x60, then resize to 16x32
    ref = F.interpolate(frames[:, 5:35].permute(0, 3, 1, 2).float(), size=(16, 32), mode="bilinear",
                        antialias=True, align_corners=False)
    ref = ref.permute(1, 0, 2, 3) / 127.5 - 1
    assert out.shape == (3, 3, 16, 32) and out.min() >= -1 and out.max() <= 1
    assert (out - ref).abs().max() <= 1.01 / 127.5  # uint8 resize rounds to the nearest grey level
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(frames.float(), 16, 32)
