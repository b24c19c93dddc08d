"""Data sets of audio-visual clips: a SyncBench folder, VGGSound's layout, a plain folder of videos.

A data set first *resolves* its items (id, path, caption, start, extra metadata) without decoding anything;
*loading* an item decodes it through the one media reader (`media.read_clip`) into a clip geometry. Bad files
never stop a data set: each is listed with its reason (`AVDataset.skipped`) and everything else stays.

Data set specs, as `avlink prepare --data` and training configs take them:
    syncbench:DIR              a `avlink synth` output folder (DIR/metadata.jsonl + its mp4s)
    vggsound:CSV:DIR[:SPLIT]   VGGSound's CSV (youtube_id, start_seconds, label, split; no header) and a folder
                               holding the downloaded clips as {id}_{start:06d}.mp4 or {id}_{start}.mp4
    folder:DIR[:CAPTIONS]      every video under DIR (recursive); captions from a CSV with a `file,caption`
                               header (default DIR/captions.csv when present); no caption -> ""
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from avlink.data import media
from avlink.data.media import MediaError
from avlink.errors import UserError
from avlink.seq import ClipGeometry

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
CAPTIONS_FILE = "captions.csv"


@dataclass
class ItemRef:
    """One resolved item: where its clip is and what is known about it, nothing decoded yet."""

    id: str
    path: Path
    caption: str = ""
    start: float = 0.0  # seconds into the file where the clip starts
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. SyncBench's "events" and "objects"


@dataclass(frozen=True)
class Skipped:
    """A file (or CSV row) left out of a data set, and why."""

    file: str
    reason: str

    @classmethod
    def from_error(cls, path: Path | str, err: Exception) -> Skipped:
        # MediaError reads "<path>: <reason>"; keep only the reason, the path has its own field.
        text = str(err)
        prefix = f"{path}: "
        return cls(str(path), text[len(prefix):] if text.startswith(prefix) else text)


@dataclass
class AVClip:
    """One decoded item in a clip geometry."""

    id: str
    caption: str
    frames: Tensor  # (T, H, W, 3) uint8, as decoded
    video_mask: Tensor  # (T,) bool: False on padding past the end of the file
    audio: Tensor  # (n,) float32 waveform at the geometry's sample rate
    audio_mask: Tensor  # (n,) bool
    events: Tensor | None = None  # (E,) float32 event times in seconds from the clip start, when known

    @property
    def video(self) -> Tensor:
        """(C, T, H, W) float in [-1, 1], what the video backbone reads."""
        return frames_to_video(self.frames)


class AVDataset:
    """A resolved list of items plus the files left out while resolving."""

    def __init__(self, source: str, items: list[ItemRef], skipped: list[Skipped] | None = None) -> None:
        self.source = source
        self.items = items
        self.skipped = list(skipped or [])

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> ItemRef:
        return self.items[index]

    def __iter__(self) -> Iterator[ItemRef]:
        return iter(self.items)

    def load(self, index: int, clip: ClipGeometry) -> AVClip:
        """Decode item `index`; raises MediaError for a file that cannot give a clip."""
        return load_item(self.items[index], clip)

    def check(self) -> AVDataset:
        """Probe every file once; a file that cannot be opened, or lacks a video or an audio stream, moves
        from the items to `skipped`. Cheap next to decoding, so bad files go before training starts."""
        good: list[ItemRef] = []
        for item in self.items:
            try:
                info = media.probe(item.path)
                if not info.has_video or not info.has_audio:
                    raise MediaError(f"{item.path}: no {'video' if not info.has_video else 'audio'} stream")
            except MediaError as err:
                self.skipped.append(Skipped.from_error(item.path, err))
                log.warning("%s", err)
                continue
            good.append(item)
        self.items = good
        return self


# --- loading ----------------------------------------------------------------------------------------------


def frames_to_video(frames: np.ndarray | Tensor) -> Tensor:
    """uint8 frames (T, H, W, 3) -> float video (C, T, H, W) in [-1, 1]."""
    frames = torch.as_tensor(frames)
    assert frames.ndim == 4 and frames.shape[-1] == 3 and frames.dtype == torch.uint8, (
        f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}"
    )
    return frames.permute(3, 0, 1, 2).float() / 127.5 - 1.0


def fit_length(x: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """Cut or zero-pad x (and its bool mask) along the first axis to `length`; padding is masked out."""
    assert x.shape[0] == mask.shape[0], f"mask {tuple(mask.shape)} does not match {tuple(x.shape)}"
    if x.shape[0] >= length:
        return x[:length], mask[:length]
    pad = length - x.shape[0]
    x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return x, torch.cat([mask, mask.new_zeros(pad)])


def clip_events(meta: dict[str, Any], start: float, duration: float) -> Tensor | None:
    """Event times that fall inside [start, start + duration), in seconds from the clip start."""
    if "events" not in meta:
        return None
    times = [float(t) - start for t in meta["events"]]
    return torch.tensor([t for t in times if 0.0 <= t < duration], dtype=torch.float32)


def load_item(item: ItemRef, clip: ClipGeometry) -> AVClip:
    """Decode one item to the clip geometry: exactly clip.num_frames frames and clip.num_samples samples."""
    video, audio = media.read_clip(
        item.path, fps=clip.video.fps, size=(clip.video.width, clip.video.height),
        sample_rate=clip.audio.sample_rate, start=item.start, duration=clip.duration,
    )
    assert video is not None and audio is not None, "read_clip refuses a file without the streams asked for"
    frames, video_mask = fit_length(torch.as_tensor(video.frames), torch.as_tensor(video.mask), clip.num_frames)
    if not video_mask.any():
        raise MediaError(f"{item.path}: no video frames after {item.start:g} s")
    samples, audio_mask = fit_length(torch.as_tensor(audio.samples, dtype=torch.float32),
                                     torch.as_tensor(audio.mask), clip.num_samples)
    return AVClip(
        id=item.id, caption=item.caption,
        frames=frames, video_mask=video_mask.bool(),
        audio=samples, audio_mask=audio_mask.bool(),
        events=clip_events(item.meta, item.start, clip.duration),
    )


# --- SyncBench --------------------------------------------------------------------------------------------


def syncbench_dataset(root: Path | str, split: str | None = None) -> AVDataset:
    """A SyncBench folder: its metadata.jsonl names every clip, its caption and its event times. Several splits
    may share a folder (synth writes DIR/<split>/); `split` keeps one."""
    from avlink.data import syncbench

    root = Path(root)
    if not (root / "metadata.jsonl").is_file():
        raise UserError(f"{root}: not a SyncBench folder (no metadata.jsonl)")
    items, skipped = [], []
    for row in syncbench.load_metadata(root):
        if split is not None and row.get("split") != split:
            continue
        path = root / row["file"]
        if not path.is_file():
            skipped.append(Skipped(str(path), "file not found"))
            continue
        meta = {k: v for k, v in row.items() if k not in ("id", "file", "caption")}
        items.append(ItemRef(id=str(row["id"]), path=path, caption=str(row.get("caption", "")), meta=meta))
    source = f"syncbench:{root}" + (f":{split}" if split else "")
    return AVDataset(source, items, skipped)


# --- VGGSound ---------------------------------------------------------------------------------------------


def index_videos(root: Path) -> dict[str, Path]:
    """Every video file under root (recursive), by file name without suffix; the first of equal stems wins."""
    found: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() in VIDEO_SUFFIXES and path.is_file():
            found.setdefault(path.stem, path)
    return found


def vggsound_dataset(csv_path: Path | str, root: Path | str, split: str | None = None) -> AVDataset:
    """VGGSound: CSV rows (youtube_id, start_seconds, label, split) and a folder of the clips downloaded.

    Downloads name a clip {id}_{start:06d}.mp4 (the common layout) or {id}_{start}.mp4; both are found. A clip
    file is already cut at start_seconds, so the item starts at 0 s in its file. The label is the caption.
    Rows whose clip was never downloaded are listed as skipped ("file not found").
    """
    csv_path, root = Path(csv_path), Path(root)
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: no such CSV file")
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    videos = index_videos(root)
    items: list[ItemRef] = []
    skipped: list[Skipped] = []
    with open(csv_path, newline="", encoding="utf-8") as f:
        for line, row in enumerate(csv.reader(f), start=1):
            parsed = _parse_vggsound_row(row)
            if isinstance(parsed, str):
                if not (line == 1 and parsed == "header"):
                    skipped.append(Skipped(f"{csv_path}:{line}", parsed))
                continue
            ytid, start, label, row_split = parsed
            if split is not None and row_split != split:
                continue
            names = (f"{ytid}_{start:06d}", f"{ytid}_{start}")
            path = next((videos[n] for n in names if n in videos), None)
            if path is None:
                skipped.append(Skipped(str(root / f"{names[0]}.mp4"), "file not found"))
                continue
            meta = {"youtube_id": ytid, "start_seconds": start, "split": row_split}
            items.append(ItemRef(id=names[0], path=path, caption=label, meta=meta))
    tail = f":{split}" if split else ""
    return AVDataset(f"vggsound:{csv_path}:{root}{tail}", items, skipped)


def _parse_vggsound_row(row: list[str]) -> tuple[str, int, str, str] | str:
    """(youtube_id, start, label, split), or the reason the row is unusable ("header" for a header row)."""
    if not row or all(not cell.strip() for cell in row):
        return "empty row"
    if len(row) != 4:
        return f"expected 4 fields (youtube_id, start_seconds, label, split), got {len(row)}"
    ytid, start, label, split = (cell.strip() for cell in row)
    try:
        start_value = float(start)
    except ValueError:
        return "header"  # refused as a bad row unless it is the first line
    if start_value != int(start_value) or start_value < 0:
        return f"start_seconds {start!r} is not a whole number of seconds"
    if not ytid:
        return "empty youtube_id"
    return ytid, int(start_value), label, split


# --- plain folder -----------------------------------------------------------------------------------------


def folder_dataset(root: Path | str, captions: Path | str | None = None) -> AVDataset:
    """Every video under root (recursive, sorted). Ids are paths relative to root.

    Captions come from a CSV with a `file,caption` header (file relative to root, or a bare file name);
    `captions=None` reads root/captions.csv when it exists. A video without a caption gets "". A caption row
    naming a file that is not there is listed as skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder")
    if captions is None and (root / CAPTIONS_FILE).is_file():
        captions = root / CAPTIONS_FILE
    table = read_captions(Path(captions)) if captions is not None else {}
    items: list[ItemRef] = []
    used: set[str] = set()
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in VIDEO_SUFFIXES or not path.is_file():
            continue
        rel = path.relative_to(root).as_posix()
        key = rel if rel in table else path.name
        if key in table:
            used.add(key)
        items.append(ItemRef(id=rel, path=path, caption=table.get(key, "")))
    if not items:
        raise UserError(f"{root}: no video files ({', '.join(VIDEO_SUFFIXES)}) found")
    skipped = [Skipped(str(root / name), f"listed in {Path(captions).name} but not found")
               for name in table if name not in used]
    return AVDataset(f"folder:{root}", items, skipped)


def read_captions(path: Path) -> dict[str, str]:
    """A `file,caption` CSV -> {file: caption} (file as written, relative to the data folder)."""
    if not path.is_file():
        raise UserError(f"{path}: no such captions file")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
            raise UserError(f"{path}: captions CSV needs a header row 'file,caption'")
        return {Path(row["file"].strip()).as_posix(): (row["caption"] or "").strip()
                for row in reader if row.get("file")}


# --- specs ------------------------------------------------------------------------------------------------

SPEC_HELP = "syncbench:DIR[:SPLIT] | vggsound:CSV:DIR[:SPLIT] | folder:DIR[:CAPTIONS_CSV]"


def open_dataset(spec: str) -> AVDataset:
    """Resolve a data set spec (see the module docstring)."""
    kind, _, rest = spec.partition(":")
    parts = rest.split(":") if rest else []
    if kind == "syncbench" and len(parts) in (1, 2):
        return syncbench_dataset(parts[0], split=parts[1] if len(parts) == 2 else None)
    if kind == "vggsound" and len(parts) in (2, 3):
        return vggsound_dataset(parts[0], parts[1], split=parts[2] if len(parts) == 3 else None)
    if kind == "folder" and len(parts) in (1, 2):
        return folder_dataset(parts[0], captions=parts[1] if len(parts) == 2 else None)
    raise UserError(f"{spec}: not a data set spec; expected {SPEC_HELP}")


# --- torch wrapper for training on decoded clips ----------------------------------------------------------


class ClipDataset(torch.utils.data.Dataset):
    """Map-style torch Dataset over a resolved data set, decoding each item to `clip`.

    An item that fails to decode is logged (file and reason) and returned as None; `collate_clips` drops it, so
    batches never hold None. Run `AVDataset.check()` first to filter files that cannot even be opened.
    """

    def __init__(self, dataset: AVDataset, clip: ClipGeometry) -> None:
        self.dataset = dataset
        self.clip = clip

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        try:
            item = load_item(self.dataset[index], self.clip)
        except MediaError as err:
            log.warning("skipping %s", err)
            return None
        sample: dict[str, Any] = {
            "id": item.id, "caption": item.caption, "video": item.video, "video_mask": item.video_mask,
            "audio": item.audio, "audio_mask": item.audio_mask,
        }
        if item.events is not None:
            sample["events"] = item.events
        return sample


def collate_clips(batch: list[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Drop failed items, stack tensors; strings and event lists stay lists. None if every item failed."""
    good = [b for b in batch if b is not None]
    if not good:
        return None
    out: dict[str, Any] = {}
    for key in good[0]:
        values = [b[key] for b in good]
        stackable = isinstance(values[0], Tensor) and key != "events"
        out[key] = torch.stack(values) if stackable else values
    return out
