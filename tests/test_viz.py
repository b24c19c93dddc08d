import struct

import numpy as np
import pytest

from avlink import viz


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def _rows(fps: float = 6.0, seconds: float = 2.0, sr: int = 8000):
    frames = np.zeros((int(fps * seconds), 16, 16, 3), np.uint8)
    frames[..., 0] = 230  # pure red frames: easy to find in the picture
    t = np.arange(int(seconds * sr)) / sr
    wave = (0.5 * np.sin(2 * np.pi * 220 * t) * np.exp(-((t - 1.0) % 1.0) / 0.05)).astype(np.float32)
    return [viz.FrameRow("frames", frames, fps, marks=[0.5]),
            viz.WaveRow("true audio", wave, sr),
            viz.WaveRow("generated", wave[::-1].copy(), sr, marks=[0.3, 1.2])]


def test_sheet_is_a_png_of_the_layout_size(tmp_path):
    rows = _rows()
    path = tmp_path / "sheet.png"
    size = viz.contact_sheet(path, rows, events=[0.25, 1.0], duration=2.0, title="clip 0: a red test")
    expected_height = (viz.HEADER_PX + viz.FRAME_ROW_PX + 2 * viz.WAVE_ROW_PX + 2 * viz.ROW_GAP_PX
                       + viz.FOOTER_PX)
    assert size == (viz.WIDTH_PX, expected_height)
    assert _png_size(path) == size
    assert [p.name for p in tmp_path.iterdir()] == ["sheet.png"], "no temp file left behind"


def test_sheet_draws_the_frames_where_the_frame_row_is(tmp_path):
    import matplotlib.image

    path = tmp_path / "sheet.png"
    viz.contact_sheet(path, _rows(), events=[], duration=2.0)
    pixels = matplotlib.image.imread(str(path))[..., :3]  # (H, W, 3) floats in [0, 1]
    red = (pixels[..., 0] > 0.85) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
    rows_with_red = np.flatnonzero(red.any(axis=1))
    top = viz.HEADER_PX
    assert rows_with_red.size > 0, "the red frames were not drawn"
    assert rows_with_red.min() >= top - 1 and rows_with_red.max() <= top + viz.FRAME_ROW_PX + 1, \
        f"red pixels in rows {rows_with_red.min()}..{rows_with_red.max()}, outside the frame row"
    # the frames span the whole time axis
    cols = np.flatnonzero(red.any(axis=0))
    axis_px = viz.WIDTH_PX - viz.LEFT_PX - viz.RIGHT_PX
    assert cols.max() - cols.min() > 0.95 * axis_px, "the frame strip does not cover the time axis"


def test_long_clips_show_every_kth_frame():
    assert viz.shown_frames(16, 70, 1130) == list(range(16))
    shown = viz.shown_frames(60, 70, 1130)
    assert len(shown) <= 1130 // 70 and shown[0] == 0 and np.all(np.diff(shown) == 4)


def test_audio_onsets_find_clicks_at_any_rate():
    sr = 16000
    wave = np.zeros(2 * sr, np.float32)
    rng = np.random.default_rng(0)
    for t in (0.5, 1.3):
        start = int(t * sr)
        burst = rng.normal(size=1600) * np.exp(-np.arange(1600) / 200)
        wave[start:start + 1600] += 0.8 * burst.astype(np.float32)
    found = viz.audio_onsets(wave, sr)
    assert len(found) == 2, f"onsets {found}"
    assert found == pytest.approx([0.5, 1.3], abs=0.05)


def test_sheet_refuses_bad_frames(tmp_path):
    bad = viz.FrameRow("bad", np.zeros((4, 8, 8), np.uint8), 6.0)
    with pytest.raises(AssertionError, match="bad: frames must be uint8"):
        viz.contact_sheet(tmp_path / "x.png", [bad], events=[], duration=1.0)
    assert not list(tmp_path.iterdir())
