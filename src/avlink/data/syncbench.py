"""SyncBench: a procedural audio-visual data set with exact ground-truth event times.

Every clip is drawn from one integer seed, so the data set is the same on every machine (for one numpy
version) and needs no download. A clip shows 1 to 3 objects, each of an event class with its own look,
motion and sound:

    class   what you see                            what you hear                          events
    ball    a ball dropped before the clip,         a thud per impact, louder when faster  each impact
            bouncing lower each time until it rests (pitch lower when bigger)
    hammer  a hammer swinging down onto a block     a metallic clang: inharmonic partials, each strike
                                                    slow decay
    lamp    a lamp on a stand flashing              a beep exactly as long as the flash    each flash onset
    drum    a stick hitting a drum                  a membrane hit: pitched noise burst    each hit
    slider  a box pushed along a floor, slowed to   a hum whose pitch follows its speed,   each push (stops
            rest by friction (maybe pushed back)    ending when the box stops              are in "stops")
    rain    rain falling from a cloud               steady noise                           none

Visual timing cue. The tiny preset reads video at 6 fps, far coarser than audio. So at each event a bright
cue starts exactly at the event time and fades as exp(-(t - t_event) / CUE_TAU), CUE_TAU = 0.15 s: a dust
puff in the floor under a ball's impact or a box's push, a glow of the struck block or drum shell, a halo
around the flashing lamp. Frames are rendered at their exact times, so video read at any rate shows the cue,
and its brightness in the first frame after an event tells how long ago the event was:
t_event = t_frame + CUE_TAU * ln(intensity). Cues of one object combine by maximum; each cue region is one
that nothing moving ever covers, and `objects[i]["cue"]` gives the regions and the cue colour.

Layout. Everything lives in the central square of the frame (what a centre crop to a square keeps), in up to
three cells of a 2x2 grid (a sliding box gets a whole row). Objects scale with their cell: at 16x16 px an
object is 2.6-8.5 px (mostly 3-4.5) and a cue region at least 18 frame px (two 16x16 pixels) each way; read
back at 16x16 and 6 fps, the cues give every event time to within 0.1 s (see the tests). Backgrounds are a
dark colour with a gradient and a texture (stripes, checker, speckle or none); object colours are picked to
contrast with the background and to stay darker than the near-white cues.

Files. `avlink synth --out DIR --n N [--seed S --split train|val|test --preset tiny --duration S --workers K]`
writes
DIR/<split>/<id>.mp4 (256x144, 24 fps, H.264 + AAC, 44.1 kHz mono, the preset's clip duration or --duration
SECONDS, which keeps the preset clip's event rate: plan_scene) and one JSON
line per clip in DIR/metadata.jsonl:

    id, file (relative to DIR), split, preset, seed, duration, width, height, fps, sample_rate, caption,
    background {rgb, texture},
    objects: [{class, colour, rgb, size (small/medium/large), position [x, y] (px, at rest),
               extent [w, h] (px), cell [x0, y0, x1, y1] (px), events [s],
               cue {rgb, tau, regions: per event, boxes [x0, y0, x1, y1] in px},
               and per class: floor + impact_speeds (px/s) for a ball, flash_durations [s] for a lamp,
               floor + stops [s] for a box}],
    events (all event times in seconds, sorted), event_classes and event_objects (index into objects) of each.

Clip i of a split has seed SPLIT_SEEDS[split] + S + i, and S + N may not pass SPLIT_SIZE, so a test clip is
never a training clip. An mp4 is written to a temporary file and moved into place before its metadata line is
appended; a rerun skips clips already listed, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.signal import butter, sosfilt

from avlink.errors import UserError

log = logging.getLogger(__name__)
Rng = np.random.Generator

CLASSES: tuple[str, ...] = ("ball", "hammer", "lamp", "drum", "slider", "rain")
SPLIT_SEEDS: dict[str, int] = {"train": 0, "val": 1_000_000, "test": 2_000_000}
SPLIT_SIZE = 1_000_000  # seeds per split: seed + n must stay below this
CUE_TAU = 0.15  # seconds: decay constant of every visual cue
WIDTH, HEIGHT, FPS, SAMPLE_RATE = 256, 144, 24, 44100
METADATA = "metadata.jsonl"

CELL = 72.0  # design size of a cell; every length below is in these units and scaled by u = cell / CELL
MIN_EVENT = 0.1  # seconds: no event before this (the first frames show the scene at rest)
END_MARGIN = 0.35  # seconds: no event this close to the end (a later 6 fps frame must show its cue)

# Object colours: saturated, and dark enough (luma <= 150) that a near-white cue drawn over them stands out.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (205, 40, 45), "orange": (230, 115, 25), "green": (45, 165, 70), "blue": (45, 90, 220),
    "purple": (140, 60, 190), "cyan": (30, 160, 185), "pink": (225, 85, 155), "brown": (150, 90, 45),
}
# Only where no cue is drawn over the object (a ball, a sliding box).
BRIGHT_COLOURS: dict[str, tuple[int, int, int]] = {"yellow": (225, 200, 35), "white": (235, 235, 235)}
CLOUD_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 158), "white": (225, 225, 232), "light blue": (160, 190, 225),
}
FLOORS: dict[str, tuple[tuple[int, int, int], str]] = {  # name -> (colour, texture); all luma <= 110
    "wooden": ((112, 72, 40), "grain"), "stone": ((98, 98, 104), "speckle"),
    "tiled": ((80, 88, 105), "tiles"), "carpeted": ((105, 38, 48), "speckle"),
}
SIZES: dict[str, float] = {"small": 0.9, "medium": 1.0, "large": 1.12}
COUNT_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times", 5: "five times", 6: "six times",
               7: "seven times", 8: "eight times"}
DUST = (242, 234, 218)  # colour of a floor puff


@dataclass
class SyncClip:
    """One rendered clip: frames (T, H, W, 3) uint8 at `fps`, mono audio (n,) float32 at `sample_rate`."""

    frames: np.ndarray
    audio: np.ndarray
    meta: dict[str, Any]
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
    stems: np.ndarray | None = None  # (objects, n) float32: each object's own sound, scaled as in the mix


# --- drawing primitives ---------------------------------------------------------------------------------
# Shapes return an alpha mask over a cell, (T or 1, h, w) float32 with a one-pixel soft edge; centres may be
# per-frame arrays of shape (T, 1, 1). Coordinates are pixels from the cell's corner, pixel centres at +0.5.


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    ys = (np.arange(h, dtype=np.float32) + 0.5)[None, :, None]  # (1, h, 1)
    xs = (np.arange(w, dtype=np.float32) + 0.5)[None, None, :]  # (1, 1, w)
    return xs, ys


def _soft(edge: np.ndarray) -> np.ndarray:
    """Signed distance inside a shape (px) -> coverage in [0, 1]."""
    return np.clip(edge + 0.5, 0.0, 1.0).astype(np.float32)


def _disc(xs: np.ndarray, ys: np.ndarray, cx: Any, cy: Any, r: float) -> np.ndarray:
    return _soft(r - np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2))


def _rect(xs: np.ndarray, ys: np.ndarray, cx: Any, cy: Any, hw: float, hh: float) -> np.ndarray:
    return _soft(np.minimum(hw - np.abs(xs - cx), hh - np.abs(ys - cy)))


def _ellipse(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    d = np.sqrt(((xs - cx) / a) ** 2 + ((ys - cy) / b) ** 2)
    return _soft((1.0 - d) * min(a, b))


def _puff(xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, a: float, b_up: float,
          b_down: float) -> np.ndarray:
    """A squarish blob (superellipse, power 4) centred on a floor line; taller below the line than above."""
    b = np.where(ys > cy, b_down, b_up)
    d = ((np.abs(xs - cx) / a) ** 4 + (np.abs(ys - cy) / b) ** 4) ** 0.25
    return _soft((1.0 - d) * np.minimum(a, b))


def _bar(xs: np.ndarray, ys: np.ndarray, px: float, py: float, phi: np.ndarray, along: tuple[float, float],
         half_width: float) -> np.ndarray:
    """A rectangle rotating about a pivot: it spans `along` (px from the pivot) in the direction phi (T,)."""
    cos, sin = np.cos(phi)[:, None, None], np.sin(phi)[:, None, None]
    dx, dy = xs - px, ys - py
    u = dx * cos + dy * sin  # along the direction (image y points down)
    v = -dx * sin + dy * cos
    mid, half = (along[0] + along[1]) / 2, (along[1] - along[0]) / 2
    return _soft(np.minimum(half - np.abs(u - mid), half_width - np.abs(v)))


def _paint(canvas: np.ndarray, alpha: np.ndarray, colour: Any) -> None:
    """Alpha-blend a colour ((3,) or per frame (T, 3)) into canvas (T, h, w, 3) in place, only over the
    bounding box of the alpha (most shapes cover a small part of their cell)."""
    rows = np.flatnonzero(alpha.any(axis=(0, 2)))
    cols = np.flatnonzero(alpha.any(axis=(0, 1)))
    if rows.size == 0 or cols.size == 0:
        return
    colour = np.asarray(colour, dtype=np.float32)
    if colour.ndim == 2:
        colour = colour[:, None, None, :]  # (T, 1, 1, 3)
    box = (slice(None), slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    view = canvas[box]
    view += alpha[box][..., None] * (colour - view)


def _luma(rgb: Sequence[float]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _mix(a: Sequence[float], b: Sequence[float], w: float) -> tuple[int, int, int]:
    r, g, b_ = (int(round((1 - w) * x + w * y)) for x, y in zip(a, b, strict=True))
    return r, g, b_


def cue_intensity(times: np.ndarray, events: Sequence[float], tau: float = CUE_TAU) -> np.ndarray:
    """max over events of exp(-(t - t_event) / tau) for t >= t_event, else 0; (T,) for times (T,)."""
    if len(events) == 0:
        return np.zeros_like(times, dtype=np.float32)
    lag = times[:, None] - np.asarray(events, dtype=np.float64)[None, :]  # (T, E)
    return np.where(lag >= 0, np.exp(-np.maximum(lag, 0.0) / tau), 0.0).max(axis=1).astype(np.float32)


def strike_lift(times: np.ndarray, events: Sequence[float], swing: float = 0.3) -> np.ndarray:
    """Height of a striking tool in [0, 1]: 0 at each event, 1 at rest; it falls faster and faster onto a
    strike and rebounds after it, and between close strikes it does not get all the way up."""
    if len(events) == 0:
        return np.ones_like(times)
    ev = np.asarray(events, dtype=np.float64)
    idx = np.searchsorted(ev, times, side="right")
    since = np.where(idx > 0, times - ev[np.maximum(idx - 1, 0)], np.inf)
    until = np.where(idx < len(ev), ev[np.minimum(idx, len(ev) - 1)] - times, np.inf)
    def ramp(dt: np.ndarray) -> np.ndarray:  # 0 at the strike, fastest there, 1 after `swing` seconds
        return 1.0 - (1.0 - np.clip(dt / swing, 0.0, 1.0)) ** 2

    return np.minimum(ramp(since), ramp(until))


# --- timing -----------------------------------------------------------------------------------------------


def irregular_times(rng: np.random.Generator, min_gaps: Sequence[float], start: float,
                    stop: float) -> list[float]:
    """len(min_gaps) + 1 event times in [start, stop], consecutive ones at least min_gaps[k] apart, spread at
    random (spare time split by a Dirichlet draw, so never on a grid)."""
    slack = (stop - start) - float(sum(min_gaps))
    assert slack >= 0, f"{len(min_gaps) + 1} events, gaps {list(min_gaps)}, do not fit in [{start}, {stop}]"
    spare = rng.dirichlet(np.ones(len(min_gaps) + 2)) * slack
    offsets = np.cumsum(spare[: len(min_gaps) + 1]) + np.concatenate([[0.0], np.cumsum(min_gaps)])
    return [float(start + o) for o in offsets]


def _event_count(rng: np.random.Generator, per_second: float, span: float, min_gap: float, most: int) -> int:
    fit = int(span // min_gap) + 1
    high = max(1, min(most, fit, int(round(per_second * span))))
    return int(rng.integers(1, high + 1))


def _most(most: int, stretch: float) -> int:
    """The cap on one object's events in a clip `stretch` times as long as the clip the cap was set for (the
    preset's; plan_scene): a longer clip may hold as many events per second, not the same number in all."""
    return max(most, round(most * stretch))


def _on_sample_grid(t: float, sample_rate: int = SAMPLE_RATE) -> float:
    """Event times sit on the audio sample grid, so the sound starts exactly at the stated time."""
    return round(t * sample_rate) / sample_rate


# --- scene ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A square-ish region of the frame owned by one object: corner (x0, y0), size (w, h), unit scale u."""

    x0: int
    y0: int
    w: int
    h: int

    @property
    def u(self) -> float:
        return min(self.w, self.h) / CELL

    def box(self, x0: float, y0: float, x1: float, y1: float) -> list[float]:
        """A box in cell pixels -> the same box in frame pixels, rounded to 0.01 px."""
        return [round(v, 2) for v in (self.x0 + x0, self.y0 + y0, self.x0 + x1, self.y0 + y1)]


@dataclass
class SceneObject:
    """One object of a clip: what it is, where, its events and whatever its class needs to draw and sound."""

    cls: str
    cell: Cell
    colour: str
    rgb: tuple[int, int, int]
    size: str
    events: list[float]
    caption: str
    position: tuple[float, float]  # cell px, the object's centre at rest
    extent: tuple[float, float]  # px, width and height of the object's body (a ball's diameter, a block)
    cue_rgb: tuple[int, int, int]
    cue_regions: list[list[list[float]]]  # per event, boxes in cell px that the cue fully covers
    params: dict[str, Any] = field(default_factory=dict)

    def to_meta(self) -> dict[str, Any]:
        c = self.cell
        extras = {k: v for k, v in self.params.items() if not k.startswith("_")}
        return {
            "class": self.cls, "colour": self.colour, "rgb": list(self.rgb), "size": self.size,
            "position": [round(c.x0 + self.position[0], 2), round(c.y0 + self.position[1], 2)],
            "extent": [round(float(v), 2) for v in self.extent],
            "cell": [c.x0, c.y0, c.x0 + c.w, c.y0 + c.h],
            "events": list(self.events),
            "cue": {"rgb": list(self.cue_rgb), "tau": CUE_TAU,
                    "regions": [[c.box(*b) for b in boxes] for boxes in self.cue_regions]},
            **extras,
        }


def _layouts(side: int) -> list[list[tuple[int, int, int, int]]]:
    """Cell layouts of the central square (side px) by object count; half-side cells, as (x, y, w, h)."""
    h = side // 2
    return [
        [(0, 0, side, side)],
        [(0, 0, h, side), (h, 0, h, side)],
        [(0, 0, side, h), (0, h, side, h)],
        [(0, 0, side, h), (0, h, h, h), (h, h, h, h)],
        [(0, 0, h, h), (h, 0, h, h), (0, h, side, h)],
        [(0, 0, h, side), (h, 0, h, h), (h, h, h, h)],
        [(0, 0, h, h), (0, h, h, h), (h, 0, h, side)],
    ]


def _place_cells(rng: np.random.Generator, width: int, height: int) -> list[tuple[Cell, bool]]:
    """1 to 3 cells inside the central square; each with whether a sliding box fits (width >= 0.69 side)."""
    side = min(width, height)
    ox, oy = (width - side) // 2, (height - side) // 2
    count = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
    options = [lay for lay in _layouts(side) if len(lay) == count]
    layout = options[int(rng.integers(len(options)))]
    cells = []
    for x, y, w, h in layout:
        if not (w >= side - 1 and h < side):  # a square cell inside the box at a random spot; rows stay rows
            s = min(w, h) if count > 1 else int(round(side * rng.uniform(0.7, 0.9)))
            x += int(rng.integers(0, w - s + 1))
            y += int(rng.integers(0, h - s + 1))
            w = h = s
        cells.append((Cell(ox + x, oy + y, w, h), w >= 0.69 * side))
    return cells


def _background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, dict[str, Any]]:
    """A dark colour with a gradient and a faint texture: (H, W, 3) float32 and its description."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.15, 0.5), rng.uniform(0.2, 0.38)
    base = np.array(_hsv_to_rgb(hue, sat, val), dtype=np.float32) * 255
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * (xs - width / 2) + np.sin(angle) * (ys - height / 2)) / max(width, height)
    image = base[None, None, :] * (1.0 + rng.uniform(0.2, 0.6) * ramp[..., None])  # (H, W, 3)
    texture = str(rng.choice(["plain", "stripes", "checker", "speckle"]))
    if texture == "stripes":
        period, turn = rng.uniform(10, 28), rng.uniform(0, np.pi)
        image += 9.0 * np.sin(2 * np.pi * (np.cos(turn) * xs + np.sin(turn) * ys) / period)[..., None]
    elif texture == "checker":
        square = int(rng.integers(12, 30))
        image += np.where(((xs // square) + (ys // square)) % 2 == 0, 7.0, -7.0)[..., None]
    elif texture == "speckle":
        image += rng.normal(0.0, 6.0, size=(height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.float32), {"rgb": [int(v) for v in base], "texture": texture}


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[float, float, float]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]


def _pick_colour(rng: np.random.Generator, palette: dict[str, tuple[int, int, int]],
                 background: Sequence[float]) -> tuple[str, tuple[int, int, int]]:
    """A palette colour far from the background (by RGB distance; the most distant one if none is far)."""
    names = list(palette)
    far = [n for n in names if np.linalg.norm(np.subtract(palette[n], background)) >= 110]
    farthest = max(names, key=lambda n: np.linalg.norm(np.subtract(palette[n], background)))
    name = str(rng.choice(far or [farthest]))
    return name, palette[name]


def _floor(rng: np.random.Generator) -> tuple[str, tuple[int, int, int], str]:
    name = str(rng.choice(list(FLOORS)))
    colour, texture = FLOORS[name]
    return name, colour, texture


def _draw_floor(canvas: np.ndarray, u: float, top: float, colour: Sequence[int], texture: str,
                seed: int) -> None:
    """A floor slab from y = top to the bottom of the cell, with a static texture."""
    h, w = canvas.shape[1:3]
    xs, ys = _grid(h, w)
    slab = np.broadcast_to(np.asarray(colour, dtype=np.float32), (h, w, 3)).copy()
    rng = np.random.default_rng(seed)
    x2, y2 = xs[0], ys[0]  # (1, w), (h, 1)
    if texture == "grain":
        slab += (8.0 * np.sin(2 * np.pi * y2 / (4.0 * u) + 2.0 * np.sin(x2 / (9.0 * u))))[..., None]
    elif texture == "tiles":
        tile = 12.0 * u
        slab += np.where(((x2 // tile) + (y2 // tile)) % 2 == 0, 8.0, -8.0)[..., None]
    else:
        slab += rng.normal(0.0, 7.0, size=(h, w, 1)).astype(np.float32)
    alpha = _soft(ys - top)[0]  # (h, w): below the floor line
    canvas += alpha[None, ..., None] * (slab[None] - canvas)


# --- event classes ----------------------------------------------------------------------------------------
# Each class plans an object (attributes + events, from the rng), draws it into its cell for every frame time,
# and synthesises its sound track. All lengths are multiples of the cell unit u.


def _count_phrase(n: int) -> str:
    return COUNT_WORDS.get(n, f"{n} times")


def _size(rng: np.random.Generator) -> tuple[str, float]:
    name = str(rng.choice(list(SIZES)))
    return name, SIZES[name]


def _a(size: str, colour: str) -> str:
    """ "a red", "a small red", "an orange": the size word only when it is not medium."""
    words = colour if size == "medium" else f"{size} {colour}"
    return ("an " if words[0] in "aeiou" else "a ") + words


class EventClass:
    """A kind of event: plans an object of its kind, draws it at given frame times, synthesises its sound."""

    name: str = ""

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        raise NotImplementedError

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        raise NotImplementedError

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        raise NotImplementedError


def _floor_puff_region(x: float, floor_y: float, a: float, u: float) -> list[float]:
    """The part of a floor puff under the floor line that its core always covers."""
    return [x - 0.6 * a, floor_y + 1.5 * u, x + 0.6 * a, floor_y + 21.0 * u]


def bounce_arcs(rng: np.random.Generator, duration: float) -> list[tuple[float, float]]:
    """(start, length) in seconds of each flight of a ball dropped before the clip starts: each arc lasts a
    fraction of the one before (the ball's restitution, 0.45-0.85, varied a little per bounce); the ball comes
    to rest when an arc would be shorter than 0.25 s. No landing falls in the last END_MARGIN seconds (no
    frame would show its cue)."""
    last = duration - END_MARGIN
    first = rng.uniform(0.55, 0.8)  # the flight under way when the clip starts
    restitution = rng.uniform(0.45, 0.85)
    t = min(last, max(MIN_EVENT, rng.uniform(0.15, 0.7) * first))  # first landing
    arcs = [(t - first, first)]
    while t <= duration:
        length = arcs[-1][1] * restitution * rng.uniform(0.93, 1.07)
        if length < 0.25:
            break  # at rest from here on
        if last < t + length < duration + 0.02:  # land after the clip instead, or earlier, or stay down
            if duration + 0.02 - t <= 0.95 * arcs[-1][1]:
                length = duration + 0.02 - t
            elif last - t >= 0.25:
                length = last - t
            else:
                break
        arcs.append((t, length))
        t += length
    return arcs


class Ball(EventClass):
    """A ball dropped before the clip, bouncing in place with less height each time until it rests. Flights
    are parabolas under one gravity, so a longer flight is higher and ends in a faster, louder impact."""

    name = "ball"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = cell.u
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, {**COLOURS, **BRIGHT_COLOURS}, bg)
        floor_name, floor_rgb, texture = _floor(rng)
        r = 13.0 * u * k
        floor_y = cell.h - 24.0 * u
        x = cell.w / 2 + rng.uniform(-0.12, 0.12) * cell.w
        arcs = bounce_arcs(rng, duration)
        headroom = floor_y - 2 * r - 3.0 * u  # px the ball can rise above the floor and stay in its cell
        gravity = 8 * headroom * rng.uniform(0.75, 1.0) / arcs[0][1] ** 2  # px/s^2; apex = g * length^2 / 8
        landed = [(t0 + length, length) for t0, length in arcs if t0 + length <= duration]
        events = [_on_sample_grid(t) for t, _ in landed]
        speeds = [gravity * length / 2 for _, length in landed]  # px/s at each impact
        a = max(1.5 * r, 24.0 * u)
        count = len(events)
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=events,
            caption=f"{_a(size, colour)} ball bouncing {_count_phrase(count)} on a {floor_name} floor",
            position=(x, floor_y - r), extent=(2 * r, 2 * r), cue_rgb=DUST,
            cue_regions=[[_floor_puff_region(x, floor_y, a, u)]] * count,
            params={"floor": floor_name, "impact_speeds": [round(float(v), 2) for v in speeds],
                    "_r": r, "_floor_y": floor_y, "_floor_rgb": floor_rgb, "_texture": texture,
                    "_arcs": arcs, "_gravity": gravity, "_a": a, "_seed": int(rng.integers(2**31))},
        )

    def height(self, obj: SceneObject, times: np.ndarray) -> np.ndarray:
        """Height of the ball's bottom above the floor (px), (T,); 0 once it rests."""
        arcs = np.asarray(obj.params["_arcs"])  # (A, 2): start, length
        k = np.clip(np.searchsorted(arcs[:, 0], times, side="right") - 1, 0, len(arcs) - 1)
        since, length = times - arcs[k, 0], arcs[k, 1]
        flying = (since >= 0) & (since <= length)
        return np.where(flying, obj.params["_gravity"] / 2 * since * (length - since), 0.0)

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.cell.u
        xs, ys = _grid(*canvas.shape[1:3])
        _draw_floor(canvas, u, p["_floor_y"], p["_floor_rgb"], p["_texture"], p["_seed"])
        x = obj.position[0]
        puff = _puff(xs, ys, x, p["_floor_y"], p["_a"], 9.0 * u, 23.0 * u)
        _paint(canvas, puff * cue_intensity(times, obj.events)[:, None, None], DUST)
        cy = (p["_floor_y"] - p["_r"] - self.height(obj, times))[:, None, None]
        _paint(canvas, _disc(xs, ys, x, cy, p["_r"]), obj.rgb)
        # A highlight, so that the ball reads as round.
        shine = _disc(xs, ys, x - 0.35 * p["_r"], cy - 0.35 * p["_r"], 0.3 * p["_r"])
        _paint(canvas, 0.35 * shine, (255, 255, 255))

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        track = np.zeros(n)
        v_ref = obj.params["_gravity"] * 0.8 / 2  # the impact after the longest first flight
        f0 = 150.0 / SIZES[obj.size] * rng.uniform(0.85, 1.15)
        for t, v in zip(obj.events, obj.params["impact_speeds"], strict=True):
            gain = 0.3 + 0.7 * min(1.0, v / v_ref)  # louder when faster
            _add_at(track, t, sr, gain * _thud(f0 * rng.uniform(0.95, 1.05), sr, rng))
        return 0.55 * track


class Hammer(EventClass):
    """A hammer on a pivot swinging down onto a block; the block glows where it is struck."""

    name = "hammer"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = cell.u
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, COLOURS, bg)
        bw, bh = 32.0 * u * k, 26.0 * u * k
        floor_y = cell.h - 8.0 * u
        bx = cell.w * 0.6 + rng.uniform(-0.06, 0.06) * cell.w
        top = floor_y - bh
        span = duration - END_MARGIN - MIN_EVENT
        count = _event_count(rng, 1.5, span, 0.3, _most(4, stretch))
        events = [_on_sample_grid(t) for t in irregular_times(rng, [0.3] * (count - 1), MIN_EVENT,
                                                               duration - END_MARGIN)]
        glow = [bx - bw / 2 + 2 * u, top + 2.5 * u, bx + bw / 2 - 2 * u, floor_y - 1.5 * u]
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=events,
            caption=f"a hammer striking {_a(size, colour)} block {_count_phrase(count)}",
            position=(bx, top + bh / 2), extent=(bw, bh), cue_rgb=(255, 240, 200),
            cue_regions=[[glow]] * count,
            params={"_bw": bw, "_bh": bh, "_top": top, "_floor_y": floor_y,
                    "_f0": rng.uniform(320, 700), "_tau": rng.uniform(0.35, 0.8),
                    "_detune": rng.uniform(-0.03, 0.03, size=5).tolist()},
        )

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.cell.u
        xs, ys = _grid(*canvas.shape[1:3])
        _paint(canvas, _rect(xs, ys, obj.cell.w / 2, (p["_floor_y"] + obj.cell.h) / 2, obj.cell.w / 2,
                             (obj.cell.h - p["_floor_y"]) / 2), (78, 70, 62))
        bx, by = obj.position
        glow = cue_intensity(times, obj.events)[:, None]  # (T, 1)
        colour = (1 - glow) * np.asarray(obj.rgb, np.float32) + glow * np.asarray(obj.cue_rgb, np.float32)
        _paint(canvas, _rect(xs, ys, bx, by, p["_bw"] / 2, p["_bh"] / 2), colour)
        # The hammer: handle horizontal at the strike, head standing on the block's top face.
        length, head_half = 26.0 * u, 8.0 * u
        px, py = bx - length, p["_top"] - head_half
        phi = -np.radians(55.0) * strike_lift(times, obj.events)  # negative: the head goes up
        _paint(canvas, _bar(xs, ys, px, py, phi, (-3.0 * u, length), 2.0 * u), (150, 100, 60))
        head = _bar(xs, ys, px, py, phi, (length - 5.0 * u, length + 5.0 * u), head_half)
        _paint(canvas, head, (175, 180, 190))

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        p = obj.params
        track = np.zeros(n)
        for t in obj.events:
            _add_at(track, t, sr, _clang(p["_f0"], p["_tau"], p["_detune"], sr, rng))
        return 0.22 * track


class Lamp(EventClass):
    """A lamp on a stand: the bulb is lit for each flash; a halo around it flares at the onset and fades."""

    name = "lamp"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = cell.u
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, COLOURS, bg)
        lx, ly = cell.w / 2 + rng.uniform(-2, 2) * u, 36.0 * u
        r, floor_y = 11.0 * u * k, cell.h - 6.0 * u
        span = duration - END_MARGIN - MIN_EVENT
        count = _event_count(rng, 1.2, span, 0.45, _most(3, stretch))
        lengths = rng.uniform(0.1, 0.45, size=count)
        gaps = [max(0.25, float(d) + 0.15) for d in lengths[:-1]]
        while sum(gaps) > span:  # long flashes that do not fit: shorten them all
            lengths *= 0.8
            gaps = [max(0.25, float(d) + 0.15) for d in lengths[:-1]]
        events = [_on_sample_grid(t) for t in irregular_times(rng, gaps, MIN_EVENT, duration - END_MARGIN)]
        lengths = [_on_sample_grid(float(d)) for d in lengths]
        # Left and right of the bulb, inside the halo (radius 34 u): never covered by the bulb or the stand.
        halo = [[lx - 31 * u, ly - 9 * u, lx - 13 * u, ly + 9 * u],
                [lx + 13 * u, ly - 9 * u, lx + 31 * u, ly + 9 * u]]
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=events,
            caption=f"{_a(size, colour)} lamp flashing {_count_phrase(count)}",
            position=(lx, ly), extent=(2 * r, floor_y - ly + r), cue_rgb=_mix(rgb, (255, 255, 255), 0.8),
            cue_regions=[halo] * count,
            params={"flash_durations": lengths, "_r": r, "_floor_y": floor_y, "_f": rng.uniform(500, 1400)},
        )

    def lit(self, obj: SceneObject, times: np.ndarray) -> np.ndarray:
        on = np.zeros_like(times, dtype=bool)
        for t, d in zip(obj.events, obj.params["flash_durations"], strict=True):
            on |= (times >= t) & (times < t + d)
        return on

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.cell.u
        xs, ys = _grid(*canvas.shape[1:3])
        lx, ly = obj.position
        floor_y = p["_floor_y"]
        _paint(canvas, _disc(xs, ys, lx, ly, 34.0 * u) * cue_intensity(times, obj.events)[:, None, None],
               obj.cue_rgb)
        _paint(canvas, _rect(xs, ys, lx, (ly + floor_y) / 2, 2.0 * u, (floor_y - ly) / 2), (170, 170, 176))
        _paint(canvas, _rect(xs, ys, lx, floor_y, 11.0 * u, 2.5 * u), (170, 170, 176))
        lit = self.lit(obj, times)[:, None].astype(np.float32)
        off, on = _mix(obj.rgb, (20, 20, 20), 0.55), _mix(obj.rgb, (255, 255, 255), 0.5)
        colour = (1 - lit) * np.asarray(off, np.float32) + lit * np.asarray(on, np.float32)
        _paint(canvas, _disc(xs, ys, lx, ly, p["_r"]), colour)

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        track = np.zeros(n)
        for t, d in zip(obj.events, obj.params["flash_durations"], strict=True):
            _add_at(track, t, sr, _beep(obj.params["_f"], d, sr))
        return 0.35 * track


class Drum(EventClass):
    """A drum hit by a stick from the upper right; the shell glows at each hit."""

    name = "drum"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = cell.u
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, COLOURS, bg)
        w, h = 38.0 * u * k, 30.0 * u * k
        floor_y = cell.h - 6.0 * u
        dx = cell.w * 0.42 + rng.uniform(-0.05, 0.05) * cell.w
        top = floor_y - h
        span = duration - END_MARGIN - MIN_EVENT
        count = _event_count(rng, 2.0, span, 0.25, _most(5, stretch))
        events = [_on_sample_grid(t) for t in irregular_times(rng, [0.25] * (count - 1), MIN_EVENT,
                                                               duration - END_MARGIN)]
        glow = [dx - w / 2 + 2 * u, top + 6.5 * u, dx + w / 2 - 2 * u, floor_y - 1.5 * u]
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=events,
            caption=f"{_a(size, colour)} drum being hit {_count_phrase(count)}",
            position=(dx, top + h / 2), extent=(w, h), cue_rgb=(250, 246, 236), cue_regions=[[glow]] * count,
            params={"_w": w, "_h": h, "_top": top, "_f0": rng.uniform(110, 260) / k},
        )

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.cell.u
        xs, ys = _grid(*canvas.shape[1:3])
        dx, _ = obj.position
        glow = cue_intensity(times, obj.events)[:, None]
        colour = (1 - glow) * np.asarray(obj.rgb, np.float32) + glow * np.asarray(obj.cue_rgb, np.float32)
        _paint(canvas, _rect(xs, ys, dx, p["_top"] + p["_h"] / 2, p["_w"] / 2, p["_h"] / 2), colour)
        _paint(canvas, _ellipse(xs, ys, dx, p["_top"], p["_w"] / 2, 5.0 * u), (225, 215, 190))
        # The stick swings about a pivot up and to the right; its tip touches the membrane at each hit.
        px, py = dx + p["_w"] / 2 + 8.0 * u, p["_top"] - 24.0 * u
        tx, ty = dx + 5.0 * u, p["_top"] - 1.5 * u
        length, phi_hit = math.hypot(tx - px, ty - py), math.atan2(ty - py, tx - px)
        up = 1.0 if math.cos(phi_hit) < 0 else -1.0  # the way of turning that lifts the tip
        phi = phi_hit + up * np.radians(40.0) * strike_lift(times, obj.events, swing=0.22)
        _paint(canvas, _bar(xs, ys, px, py, phi, (0.0, length), 1.6 * u), (205, 175, 120))
        tip = (px + length * np.cos(phi))[:, None, None], (py + length * np.sin(phi))[:, None, None]
        _paint(canvas, _disc(xs, ys, tip[0], tip[1], 2.8 * u), (235, 220, 190))

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        track = np.zeros(n)
        for t in obj.events:
            _add_at(track, t, sr, _membrane(obj.params["_f0"] * rng.uniform(0.97, 1.03), sr, rng))
        return 0.6 * track


class Slider(EventClass):
    """A box pushed along a floor: it starts at speed v0 at the push and friction brings it to rest
    (constant deceleration). Events are the pushes; the stops are in `stops`. One or two slides (the second
    goes back). A dust puff rises where the box is pushed."""

    name = "slider"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = min(cell.u, cell.w / 105.0)  # a square cell: a smaller box, so that it has room to travel
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, {**COLOURS, **BRIGHT_COLOURS}, bg)
        floor_name, floor_rgb, texture = _floor(rng)
        bw, bh = 30.0 * u * k, 22.0 * u * k
        floor_y = cell.h - 24.0 * u
        span = duration - END_MARGIN - MIN_EVENT
        count = 2 if span > 1.6 and rng.uniform() < 0.5 else 1
        # Slides of 0.5-1.2 s; a clip too short for that gets shorter ones (same draws whenever 0.5 s fits).
        longest = max(0.1, min(1.2, span / count - 0.2))
        lengths = rng.uniform(min(0.5, longest / 2), longest, size=count)
        gaps = [float(lengths[0]) + 0.2] if count == 2 else []
        events = [_on_sample_grid(t) for t in irregular_times(rng, gaps, MIN_EVENT, duration - END_MARGIN)]
        a = max(0.9 * bw, 24.0 * u)  # puff half-width
        free = cell.w - bw - 8.0 * u  # travel room, margins included
        apart = (1.2 * a + 4.0 * u) / free  # the two puffs' regions must not overlap
        assert apart < 0.95, f"slider cell {cell} too narrow"
        distance = rng.uniform(max(0.55, apart), 0.95) * free
        go_right = bool(rng.uniform() < 0.5)
        x_left, x_right = 4.0 * u + bw / 2, 4.0 * u + bw / 2 + distance
        starts = [x_left, x_right] if go_right else [x_right, x_left]
        slides = [(t, float(d), starts[i], starts[1 - i])
                  for i, (t, d) in enumerate(zip(events, lengths, strict=True))]
        caption = f"{_a(size, colour)} box sliding across a {floor_name} floor"
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=events,
            caption=caption + (" and back" if count == 2 else ""),
            position=(starts[0], floor_y - bh / 2), extent=(bw, bh), cue_rgb=DUST,
            cue_regions=[[_floor_puff_region(s[2], floor_y, a, u)] for s in slides],
            params={"floor": floor_name, "stops": [round(t + d, 6) for t, d, _, _ in slides],
                    "_slides": slides, "_bw": bw, "_bh": bh, "_floor_y": floor_y, "_a": a, "_u": u,
                    "_floor_rgb": floor_rgb, "_texture": texture, "_seed": int(rng.integers(2**31)),
                    "_f": rng.uniform(90, 150) / k},
        )

    def motion(self, obj: SceneObject, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Position x (cell px) and speed as a fraction of the push speed, (T,) each."""
        slides = obj.params["_slides"]
        x = np.full_like(times, slides[0][2], dtype=np.float64)
        speed = np.zeros_like(times, dtype=np.float64)
        for t0, d, x0, x1 in slides:
            s = np.clip((times - t0) / d, 0.0, 1.0)
            moved = times >= t0
            x = np.where(moved, x0 + (x1 - x0) * (2 * s - s * s), x)  # v falls linearly to 0 at s = 1
            speed = np.where(moved & (s < 1), 1.0 - s, speed)
        return x, speed

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.params["_u"]
        xs, ys = _grid(*canvas.shape[1:3])
        _draw_floor(canvas, u, p["_floor_y"], p["_floor_rgb"], p["_texture"], p["_seed"])
        for (_, _, x0, _), event in zip(p["_slides"], obj.events, strict=True):
            puff = _puff(xs, ys, x0, p["_floor_y"], p["_a"], 8.0 * u, 23.0 * u)
            _paint(canvas, puff * cue_intensity(times, [event])[:, None, None], DUST)
        x, _ = self.motion(obj, times)
        cy = p["_floor_y"] - p["_bh"] / 2
        _paint(canvas, _rect(xs, ys, x[:, None, None], cy, p["_bw"] / 2, p["_bh"] / 2), obj.rgb)
        _paint(canvas, _rect(xs, ys, x[:, None, None], cy - p["_bh"] * 0.3, p["_bw"] / 2 - u, 1.0 * u),
               _mix(obj.rgb, (0, 0, 0), 0.4))

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        times = np.arange(n) / sr
        _, speed = self.motion(obj, times)
        freq = obj.params["_f"] * (1.0 + 1.2 * speed)  # pitch follows speed
        phase = 2 * np.pi * np.cumsum(freq) / sr
        tone = sum(np.sin(h * phase) / h for h in range(1, 7))
        rub = _bandpass(rng.normal(size=n), 900, 3500, sr) * 3.0
        level = np.zeros(n)
        for t0, d, _, _ in obj.params["_slides"]:
            since = times - t0
            sliding = (since >= 0) & (since < d)
            # loud at the push, quieter as it slows; a 2 ms attack and a 30 ms release at the stop
            level = np.where(sliding, (0.35 + 0.65 * (1 - since / d)) * np.minimum(1.0, since / 0.002), level)
            tail = (since >= d) & (since < d + 0.03)
            level = np.where(tail, 0.35 * (1 - (since - d) / 0.03), level)
        return 0.16 * level * (tone + rub * speed)


class Rain(EventClass):
    """Rain falling from a cloud: a steady hiss and no events."""

    name = "rain"

    def plan(self, rng: Rng, cell: Cell, duration: float, bg: Sequence[float],
             stretch: float = 1.0) -> SceneObject:
        u = cell.u
        size, k = _size(rng)
        colour, rgb = _pick_colour(rng, CLOUD_COLOURS, bg)
        cx = cell.w / 2 + rng.uniform(-4, 4) * u
        drops = 16
        return SceneObject(
            cls=self.name, cell=cell, colour=colour, rgb=rgb, size=size, events=[],
            caption=f"rain falling from {_a(size, colour)} cloud",
            position=(cx, 14.0 * u), extent=(70 * u * k, 30 * u * k), cue_rgb=(0, 0, 0), cue_regions=[],
            params={"_k": k, "_x": (cx + rng.uniform(-22, 22, size=drops) * u * k).tolist(),
                    "_phase": rng.uniform(0, 1, size=drops).tolist(), "_speed": rng.uniform(140, 190) * u,
                    "_puffs": (rng.uniform(-1, 1, size=(3, 2)) * [4, 2]).tolist()},
        )

    def draw(self, obj: SceneObject, canvas: np.ndarray, times: np.ndarray) -> None:
        p, u = obj.params, obj.cell.u
        h, w = canvas.shape[1:3]
        xs, ys = _grid(h, w)
        top, bottom = 22.0 * u, h - 2.0 * u
        fall = bottom - top
        drop = _mix(obj.rgb, (120, 160, 235), 0.5)
        for x, phase in zip(p["_x"], p["_phase"], strict=True):
            y = top + np.mod(phase * fall + p["_speed"] * times, fall)
            _paint(canvas, 0.85 * _rect(xs, ys, x, y[:, None, None], 1.0 * u, 3.5 * u), drop)
        cx, cy = obj.position
        for (dx, dy), r, off in zip(p["_puffs"], (11, 13, 10), (-13, 0, 13), strict=True):
            scale = u * p["_k"]
            _paint(canvas, _disc(xs, ys, cx + (off + dx) * scale, cy + dy * u, r * scale), obj.rgb)

    def sound(self, obj: SceneObject, n: int, sr: int, rng: Rng) -> np.ndarray:
        hiss = _bandpass(rng.normal(size=n), 300, 6000, sr)
        rate, phase = rng.uniform(0.3, 0.8), rng.uniform(0, 2 * np.pi)
        sway = 1.0 + 0.12 * np.sin(2 * np.pi * rate * np.arange(n) / sr + phase)  # a slow swell, no onsets
        return 0.05 * obj.params["_k"] * hiss * sway


EVENT_CLASSES: dict[str, EventClass] = {
    c.name: c for c in (Ball(), Hammer(), Lamp(), Drum(), Slider(), Rain())
}
assert tuple(EVENT_CLASSES) == CLASSES


# --- sounds -----------------------------------------------------------------------------------------------


def _add_at(track: np.ndarray, t: float, sr: int, sound: np.ndarray) -> None:
    start = int(round(t * sr))
    stop = min(len(track), start + len(sound))
    if start < stop:
        track[start:stop] += sound[: stop - start]


def _bandpass(x: np.ndarray, low: float, high: float, sr: int) -> np.ndarray:
    return sosfilt(butter(2, [low, min(high, 0.45 * sr)], btype="band", fs=sr, output="sos"), x)


def _thud(f0: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.35 * sr)) / sr
    freq = f0 * (1.0 + 1.2 * np.exp(-t / 0.012))  # the pitch drops as the impact relaxes
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.075)
    click = _bandpass(rng.normal(size=len(t)), 200, 2500, sr) * np.exp(-t / 0.005)
    return (body + 0.6 * click) * np.minimum(1.0, t / 0.0005)


def _clang(f0: float, tau: float, detune: Sequence[float], sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(min(2.5, 4 * tau) * sr)) / sr
    ratios = np.array([1.0, 2.756, 5.404, 8.933, 13.344]) * (1.0 + np.asarray(detune))  # free-bar modes
    partials = sum(
        np.sin(2 * np.pi * f0 * r * t + rng.uniform(0, 2 * np.pi)) * np.exp(-t * (1 + 0.6 * i) / tau)
        / np.sqrt(i + 1)
        for i, r in enumerate(ratios) if f0 * r < 0.45 * sr
    )
    strike = _bandpass(rng.normal(size=len(t)), 2000, 9000, sr) * np.exp(-t / 0.003)
    return (partials + 1.5 * strike) * np.minimum(1.0, t / 0.0005)


def _beep(freq: float, length: float, sr: int) -> np.ndarray:
    t = np.arange(int(round(length * sr))) / sr
    edge = np.minimum(1.0, np.minimum(t, length - t) / 0.004)
    return (np.sin(2 * np.pi * freq * t) + 0.25 * np.sin(6 * np.pi * freq * t)) * np.maximum(edge, 0.0)


def _membrane(f0: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(0.6 * sr)) / sr
    noise = _bandpass(rng.normal(size=len(t)), 0.7 * f0, 2.2 * f0, sr) * 2.5 * np.exp(-t / 0.09)
    freq = f0 * (1.0 + 0.5 * np.exp(-t / 0.03))
    tone = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / 0.16)
    attack = _bandpass(rng.normal(size=len(t)), 1000, 6000, sr) * np.exp(-t / 0.006)
    return (noise + tone + 0.5 * attack) * np.minimum(1.0, t / 0.0005)


# --- one clip ---------------------------------------------------------------------------------------------


def _choose_class(rng: np.random.Generator, wide: bool, taken: list[str]) -> str:
    options = [c for c in CLASSES if (c != "slider" or wide) and not (c == "rain" and "rain" in taken)]
    # Sliders only fit wide cells, which are rarer: weigh them up so every class is common.
    weights = np.array([0.5 if c == "rain" else (3.0 if c == "slider" else 1.0) for c in options])
    return str(rng.choice(options, p=weights / weights.sum()))


def _join_captions(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


@dataclass
class Scene:
    """A planned clip: background and objects with their events; nothing drawn or synthesised yet."""

    seed: int
    duration: float
    background: np.ndarray  # (H, W, 3) float32
    background_meta: dict[str, Any]
    objects: list[SceneObject]
    rng: np.random.Generator  # goes on into the sound synthesis (noise), so a seed fixes everything

    @property
    def caption(self) -> str:
        return _join_captions([o.caption for o in self.objects])

    def meta(self) -> dict[str, Any]:
        events = sorted((t, obj.cls, i) for i, obj in enumerate(self.objects) for t in obj.events)
        height, width = self.background.shape[:2]
        return {
            "seed": int(self.seed), "duration": float(self.duration), "width": width, "height": height,
            "caption": self.caption, "background": self.background_meta,
            "objects": [o.to_meta() for o in self.objects],
            "events": [e[0] for e in events], "event_classes": [e[1] for e in events],
            "event_objects": [e[2] for e in events],
        }


def plan_scene(seed: int, duration: float, *, width: int = WIDTH, height: int = HEIGHT,
               base: float | None = None) -> Scene:
    """Draw the scene of one seed from the random stream: background, cells, classes, attributes, events.

    base: the clip length the event counts are set for (the preset's clip duration; None: duration). A clip
    longer than base lets a hammer, lamp or drum draw up to duration / base times as many events (`_most`), spread
    over the whole clip like a base clip's; at duration <= base every draw is what it always was. A ball still
    comes to rest (its bounces fill the first seconds) and a box is pushed once or twice: they are physical."""
    assert duration > MIN_EVENT + END_MARGIN + 0.1, f"duration {duration} s is too short for a SyncBench clip"
    rng = np.random.default_rng(seed)
    background, bg_meta = _background(rng, width, height)
    objects: list[SceneObject] = []
    for cell, wide in _place_cells(rng, width, height):
        cls = _choose_class(rng, wide, [o.cls for o in objects])
        stretch = 1.0 if base is None else max(1.0, duration / base)
        objects.append(EVENT_CLASSES[cls].plan(rng, cell, duration, bg_meta["rgb"], stretch))
    return Scene(seed, duration, background, bg_meta, objects, rng)


def render_clip(seed: int, duration: float, *, width: int = WIDTH, height: int = HEIGHT, fps: int = FPS,
                sample_rate: int = SAMPLE_RATE, stems: bool = False, base: float | None = None) -> SyncClip:
    """Render the clip of one seed: frames (T, H, W, 3) uint8 with T = ceil(duration * fps), audio (n,)
    float32 with n = round(duration * sample_rate), and its ground truth (see the module docstring).
    With stems=True the clip also carries each object's own sound track. base: plan_scene's."""
    scene = plan_scene(seed, duration, width=width, height=height, base=base)
    num_frames = math.ceil(duration * fps - 1e-6)
    num_samples = round(duration * sample_rate)
    times = np.arange(num_frames, dtype=np.float64) / fps  # every frame drawn at its exact time

    frames = np.broadcast_to(scene.background, (num_frames, height, width, 3)).copy()  # (T, H, W, 3) float32
    for obj in scene.objects:
        c = obj.cell
        view = frames[:, c.y0:c.y0 + c.h, c.x0:c.x0 + c.w]  # drawing stays inside the object's cell
        EVENT_CLASSES[obj.cls].draw(obj, view, times)

    sounds = [EVENT_CLASSES[o.cls].sound(o, num_samples, sample_rate, scene.rng) for o in scene.objects]
    tracks = np.stack(sounds)  # (objects, n)
    audio = tracks.sum(axis=0) + 2e-4 * scene.rng.normal(size=num_samples)  # plus a faint room tone
    gain = min(1.0, 0.9 / float(np.abs(audio).max()))  # no clipping; quieter mixes stay as they are
    audio *= gain

    meta = {**scene.meta(), "fps": fps, "sample_rate": sample_rate}
    out = SyncClip(np.clip(frames + 0.5, 0, 255).astype(np.uint8), audio.astype(np.float32), meta, fps,
                   sample_rate, (tracks * gain).astype(np.float32) if stems else None)
    assert out.frames.shape == (num_frames, height, width, 3), f"frames {out.frames.shape}"
    assert out.audio.shape == (num_samples,), f"audio {out.audio.shape}"
    return out


# --- a data set on disk -----------------------------------------------------------------------------------


def clip_seed(split: str, seed: int, index: int) -> int:
    """The seed of clip `index` of a split whose run started at `seed`."""
    if split not in SPLIT_SEEDS:
        raise UserError(f"unknown split {split!r}; choose one of {', '.join(SPLIT_SEEDS)}")
    return SPLIT_SEEDS[split] + seed + index


def clip_id(split: str, seed: int) -> str:
    return f"{split}-{seed:07d}"


def load_metadata(root: Path | str) -> list[dict[str, Any]]:
    """The rows of root/metadata.jsonl, one per clip, in file order. A final line cut off by a killed run is
    ignored; any other bad line is refused."""
    path = Path(root) / METADATA
    if not path.is_file():
        raise UserError(f"{path}: not found (not a SyncBench folder)")
    lines = path.read_text(encoding="utf-8").split("\n")
    rows, seen = [], set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the unterminated last line of an interrupted append
                log.warning("%s: ignoring an incomplete last line", path)
                continue
            raise UserError(f"{path}: line {number} is not valid JSON") from None
        if not isinstance(row, dict) or "id" not in row or "file" not in row:
            raise UserError(f"{path}: line {number} has no id or file")
        if row["id"] not in seen:
            seen.add(row["id"])
            rows.append(row)
    return rows


def _drop_partial_line(path: Path) -> None:
    """Cut a last line that a killed run left without its newline, so the next append starts clean."""
    if not path.is_file() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


@dataclass(frozen=True)
class _Job:
    root: str
    split: str
    seed: int
    duration: float
    preset: str
    base: float  # the preset's clip duration (plan_scene)


def _make_clip(job: _Job) -> dict[str, Any]:
    """Render one clip, write its mp4 atomically, return its metadata row (run in worker processes)."""
    from avlink.data import media

    clip = render_clip(job.seed, job.duration, base=job.base)
    cid = clip_id(job.split, job.seed)
    rel = f"{job.split}/{cid}.mp4"
    final = Path(job.root) / rel
    final.parent.mkdir(parents=True, exist_ok=True)
    # write_video is atomic (temp file + os.replace): a killed run leaves no half-written mp4
    media.write_video(final, clip.frames, clip.fps, clip.audio, clip.sample_rate)
    return {"id": cid, "file": rel, "split": job.split, "preset": job.preset, **clip.meta}


def _append(path: Path, row: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def synth(out_dir: Path | str, n: int, seed: int = 0, split: str = "train", preset: str = "tiny",
          workers: int = 1, progress: Callable[[int], None] | None = None,
          duration: float | None = None) -> list[dict[str, Any]]:
    """Make clips 0..n-1 of a split (seeds SPLIT_SEEDS[split] + seed + i) in out_dir; clips already listed
    in out_dir/metadata.jsonl with their file present are kept. Returns the n metadata rows in clip order.
    duration: seconds per clip (None: the preset's clip duration); a longer clip keeps the preset clip's event
    rate (plan_scene's base)."""
    from avlink.config import get_preset

    if n < 0 or seed < 0 or seed + n > SPLIT_SIZE:
        raise UserError(f"--seed {seed} --n {n}: need 0 <= seed and seed + n <= {SPLIT_SIZE} "
                        "(splits never overlap)")
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least 1")
    try:
        base = get_preset(preset).clip.duration
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    shortest = MIN_EVENT + END_MARGIN + 0.1
    if duration is not None and not (math.isfinite(duration) and duration > shortest):
        raise UserError(f"--duration {duration}: a clip needs more than {shortest:g} s")
    duration = base if duration is None else float(duration)
    root = Path(out_dir)
    if root.exists() and not root.is_dir():
        raise UserError(f"{root}: exists and is not a folder")
    root.mkdir(parents=True, exist_ok=True)
    index = root / METADATA
    _drop_partial_line(index)
    done = {r["id"]: r for r in load_metadata(root)} if index.exists() else {}
    jobs, rows = [], {}
    for i in range(n):
        s = clip_seed(split, seed, i)
        row = done.get(clip_id(split, s))
        if row is not None and abs(float(row.get("duration", -1)) - duration) > 1e-6:
            raise UserError(f"{index}: clip {row['id']} has duration {row.get('duration')} s, not "
                            f"{duration:g} s; write to another folder")
        if row is not None and (root / row["file"]).is_file():
            rows[row["id"]] = row
        else:
            jobs.append(_Job(str(root), split, s, duration, preset, base))
    for row in _run_jobs(jobs, workers):
        if row["id"] not in done:  # a listed clip whose file was lost is rewritten, not listed twice
            _append(index, row)
        rows[row["id"]] = row
        if progress is not None:
            progress(1)
    return [rows[clip_id(split, clip_seed(split, seed, i))] for i in range(n)]


def _run_jobs(jobs: list[_Job], workers: int):
    if workers == 1 or len(jobs) <= 1:
        yield from map(_make_clip, jobs)
        return
    with multiprocessing.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(_make_clip, jobs)


# --- command line -----------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path,
                        help="output folder (metadata.jsonl + <split>/*.mp4)")
    parser.add_argument("--n", required=True, type=int, help="number of clips")
    parser.add_argument("--seed", type=int, default=0, help="first seed within the split (default 0)")
    parser.add_argument("--preset", default="tiny", help="preset whose clip duration to use (default tiny)")
    parser.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                        help="seconds per clip (default: the preset's clip duration); a longer clip keeps the "
                             "preset clip's event rate")
    parser.add_argument("--split", default="train", choices=list(SPLIT_SEEDS),
                        help="seed range (default train)")
    parser.add_argument("--workers", type=int, default=1, help="parallel processes (default 1)")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    start = time.perf_counter()
    made = 0

    def step(count: int) -> None:
        nonlocal made
        made += count
        bar.update(count)

    with tqdm(total=args.n, unit="clip", disable=None) as bar:
        rows = synth(args.out, args.n, args.seed, args.split, args.preset, args.workers, progress=step,
                     duration=args.duration)
    elapsed = time.perf_counter() - start
    rate = f", {made / elapsed:.2f} clips/s" if made else ""
    print(f"{args.out}: {made} clips written, {len(rows) - made} already there ({elapsed:.1f} s{rate})")
    return 0
