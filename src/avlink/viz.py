"""Contact sheets: one PNG that shows a clip's frames over its waveforms, with event times marked.

A sheet is a stack of rows on one time axis in seconds:
- a frame row draws frames side by side, each over the time it is on screen (a frame at k / fps holds until
  the next one shown), so a frame sits right above the sound it goes with;
- a wave row draws a waveform as its min/max envelope per pixel column.
Green solid lines across every row mark the true event times; orange dashed lines in a row mark the events
detected in that row's media (audio onsets by the Onset ACC detector of eval/onset.py, visual cue onsets by
eval/events.py), so a look tells whether generated events land on the true ones.

The layout is fixed in pixels (see the constants), so a sheet's size depends only on its rows:
WIDTH_PX wide, HEADER_PX + the rows' heights + ROW_GAP_PX between rows + FOOTER_PX high. A row shows at most
as many frames as fit side by side at about square cells; longer clips show every k-th frame.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from avlink.files import atomic_write

DPI = 100
WIDTH_PX = 1280
LEFT_PX, RIGHT_PX = 130, 20  # room for the row labels on the left
HEADER_PX, FOOTER_PX = 56, 44  # title and legend above; the time axis below
FRAME_ROW_PX, WAVE_ROW_PX, ROW_GAP_PX = 70, 80, 6
TRUE_COLOUR, DETECTED_COLOUR = "#1a9850", "#f46d43"
TITLE_CHARS = 150  # per line of the title, two lines at most


@dataclass
class FrameRow:
    """Frames (T, H, W, 3) uint8 at `fps`; `marks`: times in seconds of events detected in them."""

    label: str
    frames: np.ndarray
    fps: float
    marks: Sequence[float] = field(default_factory=tuple)

    height_px = FRAME_ROW_PX


@dataclass
class WaveRow:
    """A mono wave (n,) at `sample_rate`; `marks`: times in seconds of onsets detected in it."""

    label: str
    wave: np.ndarray
    sample_rate: int
    marks: Sequence[float] = field(default_factory=tuple)

    height_px = WAVE_ROW_PX


Row = FrameRow | WaveRow


def sheet_size(rows: Sequence[Row]) -> tuple[int, int]:
    """(width, height) in pixels of the sheet of these rows."""
    body = sum(r.height_px for r in rows) + ROW_GAP_PX * max(0, len(rows) - 1)
    return WIDTH_PX, HEADER_PX + body + FOOTER_PX


def audio_onsets(wave: np.ndarray, sample_rate: int) -> np.ndarray:
    """Onset times in seconds of a mono wave, by the Onset ACC protocol's detector (which reads 22,050 Hz)."""
    import soxr

    from avlink.eval import onset

    wave = np.asarray(wave, dtype=np.float32)
    assert wave.ndim == 1, f"mono wave (n,) expected, got {wave.shape}"
    if sample_rate != onset.SAMPLE_RATE:
        wave = soxr.resample(wave, sample_rate, onset.SAMPLE_RATE)
    return onset.detect_onsets(wave) / onset.SAMPLE_RATE


def shown_frames(num_frames: int, cell_px: float, axis_px: float) -> list[int]:
    """Indices of the frames a row shows: all when they fit at cells of about cell_px, else every k-th."""
    fit = max(1, int(axis_px // cell_px))
    step = max(1, math.ceil(num_frames / fit))
    return list(range(0, num_frames, step))


def _draw_frames(ax, row: FrameRow, duration: float, axis_px: float) -> None:
    frames = np.asarray(row.frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == np.uint8, \
        f"{row.label}: frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}"
    shown = shown_frames(len(frames), row.height_px, axis_px)
    # Frames smaller than their cell keep their pixels (a 16x16 model frame); bigger ones are smoothed.
    small = frames.shape[1] <= row.height_px
    for i, k in enumerate(shown):
        start = k / row.fps
        stop = shown[i + 1] / row.fps if i + 1 < len(shown) else len(frames) / row.fps
        ax.imshow(frames[k], extent=(start, min(stop, duration), 0.0, 1.0), aspect="auto",
                  interpolation="nearest" if small else "antialiased")
    ax.set_ylim(0.0, 1.0)
    ax.set_yticks([])


def _draw_wave(ax, row: WaveRow, duration: float, axis_px: float) -> None:
    wave = np.asarray(row.wave, dtype=np.float32)
    assert wave.ndim == 1, f"{row.label}: mono wave (n,) expected, got {wave.shape}"
    columns = max(1, int(axis_px))
    # min/max per pixel column: the envelope a plot of every sample would show, at a fraction of the cost
    edges = np.linspace(0, len(wave), columns + 1).astype(int)
    lows = np.array([wave[a:b].min(initial=0.0) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    highs = np.array([wave[a:b].max(initial=0.0) for a, b in zip(edges[:-1], edges[1:], strict=True)])
    times = edges[:-1] / row.sample_rate
    ax.fill_between(times, lows, highs, color="#3b5b92", linewidth=0.0, step="post")
    peak = max(1e-3, float(np.abs(wave).max(initial=0.0)))
    ax.set_ylim(-1.05 * peak, 1.05 * peak)
    ax.axhline(0.0, color="#999999", linewidth=0.4)
    ax.set_yticks([])


def contact_sheet(path: Path | str, rows: Sequence[Row], *, events: Sequence[float], duration: float,
                  title: str = "") -> tuple[int, int]:
    """Draw the rows on one time axis [0, duration] s, mark the true `events`, write a PNG (atomically).
    Returns the sheet's (width, height) in pixels."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    assert rows, "a contact sheet needs at least one row"
    assert duration > 0, f"duration must be positive, got {duration}"
    width, height = sheet_size(rows)
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axis_px = width - LEFT_PX - RIGHT_PX
    top = height - HEADER_PX  # pixels from the bottom edge
    axes = []
    for row in rows:
        bottom = top - row.height_px
        ax = fig.add_axes((LEFT_PX / width, bottom / height, axis_px / width, row.height_px / height))
        if isinstance(row, FrameRow):
            _draw_frames(ax, row, duration, axis_px)
        else:
            _draw_wave(ax, row, duration, axis_px)
        for t in events:
            ax.axvline(float(t), color=TRUE_COLOUR, linewidth=1.4, alpha=0.9)
        for t in row.marks:
            ax.axvline(float(t), color=DETECTED_COLOUR, linewidth=1.4, linestyle=(0, (3, 2)))
        ax.set_xlim(0.0, duration)
        ax.tick_params(axis="x", labelbottom=False, length=2)
        fig.text((LEFT_PX - 8) / width, (bottom + row.height_px / 2) / height, row.label, ha="right",
                 va="center", fontsize=9)
        axes.append(ax)
        top = bottom - ROW_GAP_PX
    axes[-1].tick_params(axis="x", labelbottom=True)
    axes[-1].set_xlabel("seconds", fontsize=9, labelpad=2)
    lines = textwrap.wrap(title, TITLE_CHARS)
    if len(lines) > 2:  # the header holds two lines
        lines = [lines[0], textwrap.shorten(" ".join(lines[1:]), TITLE_CHARS, placeholder=" ...")]
    fig.text(LEFT_PX / width, 1 - 8 / height, "\n".join(lines), ha="left", va="top", fontsize=10)
    handles = [Line2D([], [], color=TRUE_COLOUR, linewidth=1.4, label="true event"),
               Line2D([], [], color=DETECTED_COLOUR, linewidth=1.4, linestyle=(0, (3, 2)),
                      label="detected in this row")]
    fig.legend(handles=handles, loc="lower right", bbox_to_anchor=(1 - RIGHT_PX / width, 0.0), ncol=2,
               fontsize=8, frameon=False)
    atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return width, height
