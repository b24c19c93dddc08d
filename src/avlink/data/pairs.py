"""Training pairs of the video upsampler: each clip of a data set decoded twice, once as the base model sees it
(the clip geometry, e.g. 16x16 px at 6 fps, as `avlink prepare` decodes it) and once at the upsampler's output
geometry (64x64 at 24 fps) from the same file, with the audio's envelope at the output rate.

The shards of `avlink prepare` hold only the base geometry, so the pairs are decoded from the clips themselves
(SyncBench renders every clip at 256x144 and 24 fps, so the high-resolution truth is in the file) and kept in
a folder of .npy arrays read memory-mapped:

    low.npy        (N, T, H, W, 3) uint8 base frames
    high.npy       (N, T * st, H * ss, W * ss, 3) uint8 output frames
    envelope.npy   (N, 2, T * st) float32 (upsampler.audio_envelope of the clip's audio)
    pairs.json     {"spec", "clip", "output", "ids", "skipped"}

The folder is written under a temporary name and renamed when complete; a later run with the same spec and
geometry reads it again, another one is refused (give another folder).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from avlink.data import media
from avlink.data.datasets import fit_length, load_item, open_dataset
from avlink.data.media import MediaError
from avlink.errors import UserError
from avlink.seq import ClipGeometry, VideoGeometry
from avlink.upsampler import ENVELOPE_VERSION, audio_envelope

log = logging.getLogger(__name__)
PAIRS = "pairs.json"


def _key(spec: str, clip: ClipGeometry, output: VideoGeometry) -> dict[str, Any]:
    return {"spec": spec, "clip": asdict(clip), "output": asdict(output), "envelope": ENVELOPE_VERSION}


def _same(a: Any, b: Any) -> bool:
    return json.loads(json.dumps(a)) == json.loads(json.dumps(b))  # tuples and lists alike


def prepare_pairs(spec: str, folder: Path, clip: ClipGeometry, output: VideoGeometry,
                  progress: bool = True) -> Path:
    """Decode the clips of data spec `spec` (syncbench:DIR[:SPLIT], folder:DIR, ...) into `folder` (module
    docstring), unless it already holds them; returns the folder."""
    folder = Path(folder)
    key = _key(spec, clip, output)
    if (folder / PAIRS).is_file():
        held = json.loads((folder / PAIRS).read_text())
        if not _same({k: held.get(k) for k in key}, key):
            raise UserError(f"{folder}: holds pairs of another data spec, geometry or audio envelope "
                            f"({held.get('spec')}); remove it or give another --out")
        return folder
    dataset = open_dataset(spec)
    if not len(dataset):
        raise UserError(f"{spec}: no clips")
    st = round(output.fps / clip.video.fps)
    frames = clip.num_frames * st
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        n = len(dataset)
        v = clip.video
        low = np.lib.format.open_memmap(temp / "low.npy", "w+", np.uint8, (n, clip.num_frames, v.height, v.width, 3))
        high = np.lib.format.open_memmap(temp / "high.npy", "w+", np.uint8,
                                         (n, frames, output.height, output.width, 3))
        env = np.lib.format.open_memmap(temp / "envelope.npy", "w+", np.float32, (n, 2, frames))
        ids, skipped = [], []
        for item in tqdm(dataset, desc="upsampler pairs", unit="clip", disable=not progress):
            try:
                base = load_item(item, clip)
                video = media.read_video(item.path, fps=output.fps, size=(output.width, output.height),
                                         start=item.start, duration=clip.duration)
            except MediaError as err:
                log.warning("skipping %s", err)
                skipped.append({"file": str(item.path), "reason": str(err)})
                continue
            hi, _ = fit_length(torch.as_tensor(video.frames), torch.as_tensor(video.mask), frames)
            i = len(ids)
            low[i], high[i] = base.frames.numpy(), hi.numpy()
            env[i] = audio_envelope(base.audio[None], clip.audio.sample_rate, output.fps, frames)[0].numpy()
            ids.append(item.id)
        if not ids:
            raise UserError(f"{spec}: no clip could be decoded ({skipped[0]['file']}: {skipped[0]['reason']})")
        for array in (low, high, env):
            array.flush()
        del low, high, env
        if len(ids) < n:  # keep the decoded rows only
            for name in ("low.npy", "high.npy", "envelope.npy"):
                kept = np.load(temp / name, mmap_mode="r")[: len(ids)]
                np.save(temp / f"kept-{name}", kept)
                (temp / f"kept-{name}").replace(temp / name)
        (temp / PAIRS).write_text(json.dumps({**key, "ids": ids, "skipped": skipped}, indent=2))
        if folder.exists():
            shutil.rmtree(folder)
        temp.rename(folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


class Pairs:
    """The arrays of a pairs folder, memory-mapped."""

    def __init__(self, folder: Path | str):
        folder = Path(folder)
        if not (folder / PAIRS).is_file():
            raise UserError(f"{folder}: no upsampler pairs ({PAIRS} missing)")
        self.meta = json.loads((folder / PAIRS).read_text())
        self.low = np.load(folder / "low.npy", mmap_mode="r")
        self.high = np.load(folder / "high.npy", mmap_mode="r")
        self.envelope = np.load(folder / "envelope.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.meta["ids"])

    def batch(self, index: list[int]) -> dict[str, Any]:
        """{"low", "high": uint8 (B, T, H, W, 3) tensors, "envelope": (B, 2, T * st), "id": [...]}."""
        index = sorted(index)  # memory-mapped rows in file order; the batch's order does not matter
        return {"low": torch.from_numpy(np.ascontiguousarray(self.low[index])),
                "high": torch.from_numpy(np.ascontiguousarray(self.high[index])),
                "envelope": torch.from_numpy(np.ascontiguousarray(self.envelope[index])),
                "id": [self.meta["ids"][i] for i in index]}


def pair_batches(pairs: Pairs, batch_size: int, rank: int = 0, world_size: int = 1):
    """The (epoch, skip) -> batches callable of train/loop.fit: a shuffle per epoch (drawn from the torch RNG the
    loop gives the data), each rank its share, whole batches only."""
    if len(pairs) < batch_size * world_size:
        raise UserError(f"{len(pairs)} clips are fewer than one batch of {batch_size} per process")

    def batches(epoch: int, skip: int) -> Iterator[dict[str, Any]]:
        order = torch.randperm(len(pairs)).tolist()[rank::world_size]
        for start in range(skip * batch_size, len(order) - batch_size + 1, batch_size):
            yield pairs.batch(order[start:start + batch_size])

    return batches
