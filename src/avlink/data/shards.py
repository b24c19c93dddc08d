"""Streaming reader of the shards `avlink prepare` writes, for training at any scale.

Shards are split between ranks *and* between the DataLoader workers of each rank, so every reader process
opens only its own shards and, in one pass, each sample is read exactly once across all of them. Balance
needs at least world_size x num_workers shards; a reader left without shards says so in a warning.
"""

from __future__ import annotations

import io
import json
import random
import tarfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from avlink.data.datasets import frames_to_video

MANIFEST = "manifest.json"


class ShardError(Exception):
    """A shard that cannot be read ("<shard>: <reason>")."""


def list_shards(source: str | Path | Sequence[str | Path]) -> tuple[list[str], dict[str, Any] | None]:
    """Shard paths (or URLs webdataset can open) and the manifest when `source` is a prepared folder."""
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        root = Path(source)
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            return [str(p) for p in sorted(root.glob("shard-*.tar"))], None
        manifest = json.loads(manifest_path.read_text())
        if not manifest.get("complete", False):
            warnings.warn(f"{root}: preparation is not complete ({manifest['counts']['shards']} of "
                          f"{manifest['counts']['shards_planned']} shards); reading the finished ones",
                          stacklevel=3)
        return [str(root / s["name"]) for s in manifest["shards"]], manifest
    if isinstance(source, (str, Path)):
        return [str(source)], None
    return [str(s) for s in source], None


def _split_key(name: str) -> tuple[str, str]:
    """'dir/000000012.mel.npy' -> ('dir/000000012', 'mel.npy'): the key ends at the file name's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


def _decode(field: str, data: bytes) -> Any:
    if field.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if field == "json":
        return json.loads(data)
    return data


def read_records(shard: str) -> Iterator[dict[str, Any]]:
    """Raw records {field: decoded value, "__key__": key} of one shard, streamed in tar order."""
    try:
        with _open(shard) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            record: dict[str, Any] = {}
            for member in tar:
                if not member.isfile():
                    continue
                key, name = _split_key(member.name)
                if record and record["__key__"] != key:
                    yield record
                    record = {}
                file = tar.extractfile(member)
                assert file is not None, f"{shard}: {member.name} has no data"
                record["__key__"] = key
                record[name] = _decode(name, file.read())
            if record:
                yield record
    except (tarfile.TarError, OSError, ValueError) as err:
        raise ShardError(f"{shard}: {err}") from err


def _open(shard: str) -> IO[bytes]:
    """A local file, or through webdataset's opener a URL ("pipe:cmd", "https://...", ...)."""
    if "://" in shard or shard.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(shard, "rb")
    return open(shard, "rb")


def to_sample(record: dict[str, Any]) -> dict[str, Any]:
    """Shard record -> training sample of torch tensors (video as float (C, T, H, W) in [-1, 1])."""
    info = record["json"]
    text = torch.from_numpy(record["text.npy"])
    if not str(info["caption"]).strip():
        # No caption: no states, read as the null text (codecs/text.py). Older shards hold the encoder's states
        # for "" here; they are left out.
        text = text[:0]
    sample: dict[str, Any] = {
        "id": info["id"], "caption": info["caption"],
        "mel": torch.from_numpy(record["mel.npy"]), "mel_mask": torch.from_numpy(record["mel_mask.npy"]),
        "video": frames_to_video(torch.from_numpy(record["video.npy"])),
        "video_mask": torch.from_numpy(record["video_mask.npy"]),
        "text": text, "text_mask": torch.ones(text.shape[0], dtype=torch.bool),
    }
    if "wave.npy" in record:
        sample["wave"] = torch.from_numpy(record["wave.npy"])
    if "latent.npy" in record:
        sample["latent"] = torch.from_numpy(record["latent.npy"])
        sample["latent_logvar"] = torch.from_numpy(record["latent_logvar.npy"])
    if "events" in info:
        sample["events"] = torch.tensor(info["events"], dtype=torch.float32)
    return sample


class ShardDataset(IterableDataset):
    """Samples of prepared shards: dicts with mel / mel_mask, latent (when prepared with a VAE), video /
    video_mask, text / text_mask, caption, id, and events when the data set knows them.

    source: a prepared folder (its manifest's shards), one shard, or a list of shard paths or URLs.
    shuffle: shard order per epoch and a buffer of `buffer` samples, both seeded by (seed, epoch, reader).
    repeat: start the next epoch when one ends (an endless stream for step-counted training).
    """

    def __init__(self, source: str | Path | Sequence[str | Path], rank: int = 0, world_size: int = 1, *,
                 shuffle: bool = False, seed: int = 0, buffer: int = 256, repeat: bool = False) -> None:
        assert 0 <= rank < world_size, f"rank {rank} is outside world size {world_size}"
        self.shards, self.manifest = list_shards(source)
        if not self.shards:
            raise ShardError(f"{source}: no shards")
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.buffer, self.repeat = shuffle, seed, buffer, repeat
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reseeds the shuffle; call before each epoch's iteration (DataLoader workers copy the dataset)."""
        self.epoch = epoch

    def shards_for(self, worker: int = 0, num_workers: int = 1, epoch: int = 0) -> list[str]:
        """This rank's and this worker's share of the shards in one epoch."""
        order = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{epoch}").shuffle(order)
        return order[self.rank::self.world_size][worker::num_workers]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        while True:
            mine = self.shards_for(worker, num_workers, epoch)
            if not mine:
                warnings.warn(f"rank {self.rank} worker {worker}: no shards ({len(self.shards)} shards for "
                              f"{self.world_size * num_workers} readers)", stacklevel=2)
                return
            records = (r for shard in mine for r in read_records(shard))
            if self.shuffle:
                records = _shuffled(records, self.buffer, random.Random(f"{self.seed}-{epoch}-{self.rank}-{worker}"))
            for record in records:
                yield to_sample(record)
            if not self.repeat:
                return
            epoch += 1


def _shuffled(records: Iterator[dict[str, Any]], size: int, rng: random.Random) -> Iterator[dict[str, Any]]:
    """Buffer shuffle: hold `size` records, emit a random one as each new one arrives."""
    pool: list[dict[str, Any]] = []
    for record in records:
        pool.append(record)
        if len(pool) >= size:
            yield pool.pop(rng.randrange(len(pool)))
    rng.shuffle(pool)
    yield from pool


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch samples: text padded to the longest caption (text_mask False on padding: a clip without a caption
    has no True, which the generators read as their null text), other tensors stacked;
    id, caption and events (variable length) stay lists."""
    assert samples, "cannot collate an empty batch"
    longest = max(1, *(s["text"].shape[0] for s in samples))  # a batch without captions keeps one masked token
    batch: dict[str, Any] = {
        "text": torch.stack([_pad(s["text"], longest) for s in samples]),  # (B, L, Dt)
        "text_mask": torch.stack([_pad(s["text_mask"], longest) for s in samples]),  # (B, L)
    }
    for key, value in samples[0].items():
        if key in batch:
            continue
        values = [s[key] for s in samples]
        if isinstance(value, Tensor) and key != "events":
            shapes = {tuple(v.shape) for v in values}
            assert len(shapes) == 1, f"{key}: samples of different shapes {sorted(shapes)} (mixed presets?)"
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch


def _pad(x: Tensor, length: int) -> Tensor:
    """Zero-pad along the first axis to `length`."""
    return torch.cat([x, x.new_zeros((length - x.shape[0], *x.shape[1:]))])
