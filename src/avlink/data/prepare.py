"""`avlink prepare`: decode a data set once, encode it, and write WebDataset shards for training.

Each sample of a shard holds, under one key (its position in the data set, zero-padded):
    mel.npy          (n_mels, F) float32 log-magnitude mel (natural log, not normalized), F = num_mel_frames
    mel_mask.npy     (F,) bool, False on frames past the end of the file's audio
    latent.npy       (Ta, Da) float32 VAE posterior mean, and latent_logvar.npy; only with a VAE checkpoint.
    wave.npy         (N,) float32 samples, N = the clip's; only for a preset whose audio codec encodes waves itself
                     (a published generator's, e.g. Stable Audio Open's autoencoder)
                     In the VAE's own latent space: the DiT reads vae.scale_latent(z)
    video.npy        (T, H, W, 3) uint8 frames; video_mask.npy (T,) bool
    text.npy         (L, Dt) float32 text-encoder token states of the caption (no padding); (0, Dt) for a clip
                     without a caption, which training reads as the generators' learned null text
    json             {"id", "caption", "file", "start", "events" (when known), "meta"}

Work is split by shard: each worker process (spawned, one torch thread) encodes whole shards with its own
models and a per-caption cache of text states. A shard is written to a temporary name and renamed only when
complete, and DIR/manifest.json records every finished shard at once, so a run killed at any moment leaves
no corrupt shard and the next run with the same arguments does only the shards still missing.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import hashlib
import io
import json
import multiprocessing as mp
import os
import queue as queue_mod
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from avlink.codecs.vae import load_vae
from avlink.config import get_preset
from avlink.data.datasets import SPEC_HELP, AVDataset, ItemRef, Skipped, load_item, open_dataset
from avlink.data.media import MediaError
from avlink.errors import UserError
from avlink.seq import ClipGeometry

MANIFEST = "manifest.json"
FORMAT = "avlink-shards/1"
EXIT_OK = 0
EXIT_SKIPPED = 3  # some files were skipped; the manifest lists them
TEXT_BATCH = 64
WORKERS = min(4, os.cpu_count() or 1)  # encoding processes of `avlink prepare` without --workers


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


@dataclass(frozen=True)
class EncodeSettings:
    """All a worker needs to build its models (picklable: it crosses into spawned processes)."""

    preset: str
    text_encoder: str  # "minilm" or "t5:PATH" (see codecs.text.load_text_encoder)
    audio: str  # "mel" or "latent"
    vae: str | None = None
    clip: ClipGeometry | None = None  # the model's own clip geometry where it is not its preset's (--set)

    @property
    def geometry(self) -> ClipGeometry:
        return self.clip if self.clip is not None else get_preset(self.preset).clip


@dataclass
class ShardTask:
    index: int
    first: int  # data set position of items[0]: sample keys are data set positions
    items: list[ItemRef]
    out_dir: str


@dataclass
class ShardResult:
    index: int
    count: int
    bytes: int
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"name": shard_name(self.index), "index": self.index, "count": self.count, "bytes": self.bytes,
                "skipped": [asdict(s) for s in self.skipped]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ShardResult:
        return cls(d["index"], d["count"], d["bytes"], [Skipped(**s) for s in d["skipped"]])


# --- encoding (runs inside each worker) -------------------------------------------------------------------


class ClipEncoder:
    """The frozen encoders of one worker (the text encoder keeps its own per-caption cache)."""

    def __init__(self, settings: EncodeSettings) -> None:
        from avlink.codecs.mel import MelSpectrogram
        from avlink.codecs.text import load_text_encoder

        self.clip = settings.geometry
        self.mel = MelSpectrogram(self.clip.audio)
        self.text = load_text_encoder(settings.text_encoder)
        self.vae = load_vae(settings.vae, self.clip) if settings.vae is not None else None

    @torch.inference_mode()
    def encode_clip(self, item: ItemRef) -> dict[str, Any]:
        """Decode and encode one item (everything but its text); raises MediaError for a bad file."""
        from avlink.codecs.mel import fit_frames

        clip = load_item(item, self.clip)
        num_frames = self.clip.num_mel_frames
        mel = fit_frames(self.mel(clip.audio[None]), num_frames)  # (1, n_mels, F)
        valid_samples = int(clip.audio_mask.sum())
        hop = self.clip.audio.hop_length
        sample: dict[str, Any] = {
            "mel": mel[0].float().numpy(),
            "mel_mask": (torch.arange(num_frames) * hop < valid_samples).numpy(),
            "video": clip.frames.numpy(),
            "video_mask": clip.video_mask.numpy(),
        }
        if self.clip.audio.codec != "mel-vae":  # a published generator's codec encodes the wave itself
            sample["wave"] = clip.audio.float().numpy()  # (N,) at the preset's sample rate
        if self.vae is not None:
            posterior = self.vae.encode(mel)
            sample["latent"] = posterior.mean[0].float().numpy()  # (Ta, Da)
            sample["latent_logvar"] = posterior.logvar[0].float().numpy()
        info: dict[str, Any] = {"id": item.id, "caption": item.caption, "file": str(item.path),
                                "start": item.start, "meta": item.meta}
        if clip.events is not None:
            info["events"] = clip.events.tolist()
        sample["json"] = info
        return sample

    @torch.inference_mode()
    def encode_captions(self, captions: list[str]) -> list[np.ndarray]:
        """Token states (L, Dt) of each caption, padding dropped: (0, Dt) for an empty one (codecs/text.py)."""
        unique = list(dict.fromkeys(captions))
        states: dict[str, np.ndarray] = {}
        for i in range(0, len(unique), TEXT_BATCH):
            batch = unique[i:i + TEXT_BATCH]
            cond = self.text.encode(batch)  # tokens (B, L, Dt), mask (B, L)
            for caption, tokens, mask in zip(batch, cond.tokens, cond.mask, strict=True):
                states[caption] = tokens[mask.bool()].float().cpu().numpy()
        return [states[c] for c in captions]


_SETTINGS: EncodeSettings | None = None
_ENCODER: ClipEncoder | None = None
_TICK: Callable[[int], None] = lambda n: None  # noqa: E731  (progress: items done, sent to the main process)


def init_worker(settings: EncodeSettings, progress: Any | None) -> None:
    """Process initializer: one torch thread (workers share the cores). Models are built on the first shard,
    so that a failure to load one reaches the main process as its own error, not as a broken pool."""
    global _SETTINGS, _ENCODER, _TICK
    torch.set_num_threads(1)
    if settings != _SETTINGS:  # a second in-process run with the same settings keeps its models
        _SETTINGS, _ENCODER = settings, None
    if progress is not None:
        _TICK = progress.put


def encode_shard(task: ShardTask) -> ShardResult:
    """Encode the items of one shard and write it; a bad file is left out and reported, never fatal."""
    global _ENCODER
    assert _SETTINGS is not None, "init_worker was not called in this process"
    if _ENCODER is None:
        _ENCODER = ClipEncoder(_SETTINGS)
    encoded: list[tuple[int, dict[str, Any]]] = []
    skipped: list[Skipped] = []
    for offset, item in enumerate(task.items):
        try:
            encoded.append((task.first + offset, _ENCODER.encode_clip(item)))
        except MediaError as err:
            skipped.append(Skipped.from_error(item.path, err))
        _TICK(1)
    texts = _ENCODER.encode_captions([sample["json"]["caption"] for _, sample in encoded])
    path = Path(task.out_dir) / shard_name(task.index)
    size = write_shard(path, [(key, {**sample, "text": text}) for (key, sample), text in zip(encoded, texts,
                                                                                              strict=True)])
    return ShardResult(task.index, len(encoded), size, skipped)


# --- writing ----------------------------------------------------------------------------------------------


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def encode_sample(key: int, sample: dict[str, Any]) -> dict[str, Any]:
    """In-memory sample -> WebDataset record: arrays as .npy, the info dict as json."""
    record: dict[str, Any] = {"__key__": f"{key:09d}"}
    for name, value in sample.items():
        if name == "json":
            record["json"] = json.dumps(value).encode("utf-8")
        else:
            record[f"{name}.npy"] = _npy(value)
    return record


def write_shard(path: Path, samples: list[tuple[int, dict[str, Any]]]) -> int:
    """Write a tar under a temporary name in the same folder, then rename; returns its size in bytes."""
    from webdataset import TarWriter

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = TarWriter(f, encoder=False, mtime=0.0)
            for key, sample in samples:
                writer.write(encode_sample(key, sample))
            writer.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path.stat().st_size


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


# --- planning and resuming --------------------------------------------------------------------------------


def plan_shards(items: list[ItemRef], shard_size: int, out_dir: Path) -> list[ShardTask]:
    return [ShardTask(i // shard_size, i, items[i:i + shard_size], str(out_dir))
            for i in range(0, len(items), shard_size)]


def fingerprint(settings: EncodeSettings, shard_size: int, items: list[ItemRef]) -> str:
    """What decides the content of every shard: a resumed run must match it exactly."""
    vae = None
    if settings.vae is not None:
        # By content: a re-export of the same weights (a resumed recipe) keeps the shards valid.
        vae = hashlib.sha256(Path(settings.vae).read_bytes()).hexdigest()
    content = {
        "geometry": asdict(settings.geometry), "preset": settings.preset, "audio": settings.audio,
        "text_encoder": settings.text_encoder, "vae": vae, "shard_size": shard_size,
        "items": [[it.id, str(it.path.resolve()), it.caption, it.start] for it in items],
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


def finished_shards(out: Path, digest: str) -> dict[int, ShardResult]:
    """Shards a previous run completed: recorded in the manifest and still on disk at the recorded size."""
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return {}
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{manifest_path}: unreadable manifest ({err}); remove it to start over") from None
    if manifest.get("fingerprint") != digest:
        raise UserError(f"{out}: holds shards of a different data set or settings; "
                        "use another --out or empty this folder")
    done = {}
    for entry in manifest.get("shards", []):
        path = out / entry["name"]
        if path.is_file() and path.stat().st_size == entry["bytes"]:
            done[entry["index"]] = ShardResult.from_json(entry)
    return done


def remove_stale_temps(out: Path) -> None:
    """Temporary files a killed run left behind (never complete, never read)."""
    for pattern in ("shard-*.tar.tmp-*", f"{MANIFEST}.tmp-*"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def build_manifest(spec: str, settings: EncodeSettings, shard_size: int, digest: str, dataset: AVDataset,
                   num_shards: int, done: dict[int, ShardResult]) -> dict[str, Any]:
    clip = settings.geometry
    results = [done[i] for i in sorted(done)]
    skipped = dataset.skipped + [s for r in results for s in r.skipped]
    return {
        "format": FORMAT,
        "data": spec,
        "preset": settings.preset,
        "geometry": asdict(clip),
        "shapes": {"mel": [clip.audio.n_mels, clip.num_mel_frames],
                   "latent": list(clip.latent_shape) if settings.audio == "latent" else None,
                   "video": [clip.num_frames, clip.video.height, clip.video.width, 3]},
        "audio": settings.audio,
        "vae": settings.vae,
        "text_encoder": settings.text_encoder,
        "shard_size": shard_size,
        "fingerprint": digest,
        "complete": len(done) == num_shards,
        "counts": {"items": len(dataset) + len(dataset.skipped), "written": sum(r.count for r in results),
                   "skipped": len(skipped), "shards": len(done), "shards_planned": num_shards},
        "shards": [r.to_json() for r in results],
        "skipped": [asdict(s) for s in skipped],
    }


# --- running ----------------------------------------------------------------------------------------------


def prepare(spec: str, out: Path | str, *, preset: str = "tiny", workers: int = 1, shard_size: int = 256,
            audio: str | None = None, vae: str | None = None, text_encoder: str | None = None,
            progress: bool = True, clip: ClipGeometry | None = None) -> dict[str, Any]:
    """Encode the data set `spec` into shards under `out`; returns the manifest (also written to out). clip: the
    model's geometry where it is not the preset's."""
    out = Path(out)
    settings = check_settings(preset, audio, vae, text_encoder, workers, shard_size, clip)
    dataset = open_dataset(spec)
    if not dataset.items:
        raise UserError(f"{spec}: no usable items ({len(dataset.skipped)} skipped)")
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    digest = fingerprint(settings, shard_size, dataset.items)
    done = finished_shards(out, digest)
    tasks = [t for t in plan_shards(dataset.items, shard_size, out) if t.index not in done]
    num_shards = len(done) + len(tasks)

    def save() -> dict[str, Any]:
        manifest = build_manifest(spec, settings, shard_size, digest, dataset, num_shards, done)
        write_json(out / MANIFEST, manifest)
        return manifest

    def record(result: ShardResult) -> None:
        done[result.index] = result
        save()

    save()  # the settings and fingerprint go down before any shard, so a kill at any point can resume
    bar = tqdm(total=len(dataset), initial=len(dataset) - sum(len(t.items) for t in tasks), unit="clip",
               desc="prepare", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    with bar:
        if workers == 1 or len(tasks) <= 1:
            run_here(settings, tasks, bar, record)
        else:
            run_pool(settings, tasks, min(workers, len(tasks)), bar, record)
    return save()


def check_settings(preset: str, audio: str | None, vae: str | None, text_encoder: str | None, workers: int,
                   shard_size: int, clip: ClipGeometry | None = None) -> EncodeSettings:
    """Refuse bad arguments before any work (a bad VAE file too: it is loaded once here to check it)."""
    try:
        cfg = get_preset(preset)
    except KeyError as err:
        raise UserError(str(err.args[0])) from None
    audio = audio or ("latent" if vae else "mel")
    if audio == "latent" and vae is None:
        raise UserError("--audio latent needs --vae CKPT")
    if audio == "mel" and vae is not None:
        raise UserError("--vae is used only with --audio latent")
    if vae is not None:
        if not Path(vae).is_file():
            raise UserError(f"{vae}: no such VAE checkpoint")
        load_vae(vae, clip or cfg.clip)
    if workers < 1 or shard_size < 1:
        raise UserError("--workers and --shard-size must be at least 1")
    return EncodeSettings(preset=preset, text_encoder=text_encoder or cfg.text_encoder, audio=audio,
                          vae=str(Path(vae).resolve()) if vae else None,
                          clip=None if clip is None or clip == cfg.clip else clip)


def run_here(settings: EncodeSettings, tasks: list[ShardTask], bar: tqdm,
             record: Callable[[ShardResult], None]) -> None:
    """One worker: encode in this process (no spawn cost); torch threads restored afterwards."""
    global _TICK
    threads = torch.get_num_threads()
    try:
        init_worker(settings, None)
        _TICK = bar.update
        for task in tasks:
            record(encode_shard(task))
    finally:
        torch.set_num_threads(threads)
        _TICK = lambda n: None  # noqa: E731


def run_pool(settings: EncodeSettings, tasks: list[ShardTask], workers: int, bar: tqdm,
             record: Callable[[ShardResult], None]) -> None:
    """Spawned worker processes, one shard at a time each; progress arrives through a queue."""
    ctx = mp.get_context("spawn")
    progress = ctx.Queue()
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker,
                                initargs=(settings, progress)) as pool:
        pending = {pool.submit(encode_shard, task) for task in tasks}
        try:
            while pending:
                finished, pending = cf.wait(pending, timeout=0.2, return_when=cf.FIRST_COMPLETED)
                _drain(progress, bar)
                for future in finished:
                    record(future.result())
        except BaseException:
            for future in pending:
                future.cancel()
            raise
        _drain(progress, bar)


def _drain(progress: Any, bar: tqdm) -> None:
    while True:
        try:
            bar.update(progress.get_nowait())
        except queue_mod.Empty:
            return


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (f"SPEC is one of {SPEC_HELP}. Exit status: 0 when every file was encoded, 3 when some "
                     f"files were skipped (each listed with its reason in DIR/{MANIFEST}), 2 on bad arguments. "
                     "Rerunning with the same arguments resumes: finished shards are kept.")
    parser.add_argument("--data", required=True, metavar="SPEC", help="the data set to encode")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder for the shards and manifest.json")
    parser.add_argument("--preset", default="tiny", help="clip geometry and text encoder (default: tiny)")
    parser.add_argument("--workers", type=int, default=WORKERS, metavar="K",
                        help="encoding processes (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=256, metavar="N", help="clips per shard (default: 256)")
    parser.add_argument("--audio", choices=("mel", "latent"), default=None,
                        help="store log-mels only, or also VAE latents (default: latent when --vae is given)")
    parser.add_argument("--vae", metavar="CKPT", default=None,
                        help="audio VAE checkpoint (.safetensors) for latents")
    parser.add_argument("--text-encoder", default=None, metavar="NAME",
                        help="minilm or t5:PATH (default: the preset's)")


def run(args: argparse.Namespace) -> int:
    manifest = prepare(args.data, args.out, preset=args.preset, workers=args.workers, shard_size=args.shard_size,
                       audio=args.audio, vae=args.vae, text_encoder=args.text_encoder)
    counts = manifest["counts"]
    print(f"wrote {counts['written']} clips in {counts['shards']} shards to {args.out}", file=sys.stderr)
    skipped = manifest["skipped"]
    if not skipped:
        return EXIT_OK
    print(f"skipped {len(skipped)} files (all listed in {Path(args.out) / MANIFEST}):", file=sys.stderr)
    for entry in skipped[:10]:
        print(f"  {entry['file']}: {entry['reason']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more", file=sys.stderr)
    return EXIT_SKIPPED
