"""`avlink train vae|audio|video|fusion|classifiers|upsampler|sync`: train one part of AV-Link on prepared shards
or a folder of videos (classifiers: the SyncBench audio and video classifiers of the evaluation,
eval/classifiers.py; sync: the learned sync scorer that ranks best-of-N candidates, sync.py).

    avlink train vae    --preset tiny --data shards/ --out runs/vae
    avlink train audio  --preset tiny --data shards/ --out runs/t2a --vae runs/vae/export/vae.safetensors
    avlink train video  --preset tiny --data shards/ --out runs/t2v
    avlink train fusion --preset tiny --task v2a --data folder:my_videos/ --out runs/v2a \\
        --audio-dit runs/t2a/export/audio_dit.safetensors --video-dit runs/t2v/export/video_dit.safetensors \\
        --vae runs/vae/export/vae.safetensors
    avlink train classifiers --preset tiny --data syncbench:sb_train/ --out runs/classifiers
    avlink train classifiers --upsampled --preset tiny --data syncbench:sb/:train --out runs/classifiers-up
    avlink train upsampler --preset tiny --data syncbench:sb/:train --out runs/upsampler
    avlink train sync --preset tiny --data syncbench:sb/:train --out runs/sync

--data takes a folder written by `avlink prepare`, or any data spec `avlink prepare` takes (syncbench:DIR,
vggsound:CSV:DIR, folder:DIR), which is prepared into OUT/prepared first (resumable). The upsampler trains on
pairs of base and output frames decoded from the clips themselves (data/pairs.py): --data is a data spec
(decoded into OUT/pairs once) or such a pairs folder. `classifiers --upsampled` trains the video classifier of
the upsampler's output geometry (eval/classifiers.py) on the same pairs, labelled by the SyncBench metadata of
the folder they were decoded from (or --labels DIR), and exports classifiers-upsampled.safetensors.
A YAML file (--config) holds
`train:` (TrainConfig fields), `model:` (dotted preset overrides) and `batch_size`; --set overrides either, e.g.
--set train.lr=1e-4 model.fusion.injection=static. The same command runs under torchrun (DDP).
At the end the EMA weights are exported to OUT/export/<part>.safetensors with config.json and a model card.
Code trains the same way through `train_part(train_args(part, data=..., out=..., max_steps=...))`.

--val-data SYNCBENCH (DIR or syncbench:DIR[:SPLIT], split val by default) validates with the EMA weights every
--val-every steps and at the last step (train/validation.py): K clips generated (or reconstructed, or
classified), written to OUT/samples/step_<N>/, scored, logged as val/... scalars and TensorBoard media; the last
validation goes into the model card under "validation". Rank 0 validates; the others wait at the next step.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shlex
import subprocess
import time
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from filelock import FileLock, Timeout
from safetensors.torch import load_file, save_file

from avlink.config import PRESETS, ModelConfig, PretrainedConfig, get_preset
from avlink.errors import UserError
from avlink.seq import ClipGeometry
from avlink.train.distributed import Dist, setup, teardown
from avlink.train.loop import TrainConfig, fit

PARTS = ("vae", "audio", "video", "fusion", "classifiers", "upsampler", "sync")
EXPORT_NAMES = {"vae": "vae", "audio": "audio_dit", "video": "video_dit", "fusion": "fusion",
                "classifiers": "classifiers", "upsampler": "upsampler", "sync": "sync"}
VAE_DEFAULTS = {"hidden": 128, "depth": 2, "kl_weight": 1e-4}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("part", choices=PARTS, help="what to train")
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--task", default="v2a", choices=("v2a", "a2v", "joint"), help="fusion only")
    parser.add_argument("--data", required=True, help="prepared shard folder or a data spec (folder:DIR, ...)")
    parser.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, export)")
    parser.add_argument("--max-steps", type=int, help="training steps (default from the config)")
    parser.add_argument("--batch-size", type=int, help="per-process batch size (default 32)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--config", type=Path, help="YAML with train:, model:, batch_size")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="overrides: train.X / model.X (repeatable)")
    parser.add_argument("--vae", type=Path, help="trained VAE (.safetensors) to encode mels to latents")
    parser.add_argument("--audio-dit", type=Path, help="trained text-to-audio generator (fusion only)")
    parser.add_argument("--video-dit", type=Path, help="trained text-to-video generator (fusion only)")
    parser.add_argument("--feature-weights", type=Path, metavar="PATH",
                        help="fusion only: weights of the extractor that model.fusion.features names (Table 2 "
                             "feature rows; syncbench-video defaults to checkpoints/PRESET/classifiers.safetensors)")
    parser.add_argument("--upsampled", action="store_true",
                        help="classifiers only: the video classifier of the upsampler's output geometry, trained "
                             "on upsampler pairs (--data: a pairs folder or a data spec)")
    parser.add_argument("--labels", type=Path, metavar="SYNCBENCH_DIR",
                        help="--upsampled: the SyncBench folder whose metadata labels the pairs (default: the "
                             "one they were decoded from)")
    parser.add_argument("--init", type=Path, metavar="PATH",
                        help="--upsampled: start from the video network of these base classifiers "
                             "(e.g. CKPT/classifiers.safetensors)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, default=0, help="data loader workers per process")
    parser.add_argument("--no-progress", action="store_true")
    val = parser.add_argument_group("validation with the EMA weights (rank 0)")
    val.add_argument("--val-data", metavar="SPEC",
                     help="SyncBench folder to validate on: DIR or syncbench:DIR[:SPLIT] (split val)")
    val.add_argument("--val-every", type=int, default=0, metavar="N",
                     help="validate every N steps (default 0: only at the last step); the last step always")
    val.add_argument("--val-clips", type=int, default=4, metavar="K", help="clips per validation (default 4)")
    val.add_argument("--val-steps", type=int, default=16, metavar="S",
                     help="Euler steps per generated clip (default 16)")
    val.add_argument("--val-vocoder", default="hifigan-universal", metavar="NAME",
                     help="vocoder of the audio samples: hifigan-universal (default), griffin-lim or a path")
    val.add_argument("--val-classifiers", type=Path, metavar="PATH",
                     help="SyncBench classifier weights: adds class accuracy to the generated clips' scores")


def scalar(value: Any) -> Any:
    """YAML 1.1 reads 1e-4 (no dot) as a string; a learning rate written so is meant as a number."""
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)
    return value


def parse_override(item: str) -> tuple[str, Any]:
    """One --set item, KEY=VALUE -> (KEY, value read as YAML: numbers as numbers, 1e-4 included)."""
    key, sep, value = item.partition("=")
    if not sep:
        raise UserError(f"--set {item}: expected KEY=VALUE")
    return key, scalar(yaml.safe_load(value))


def load_settings(args: argparse.Namespace) -> tuple[ModelConfig, TrainConfig, int, dict[str, Any]]:
    doc: dict[str, Any] = {}
    if args.config is not None:
        if not args.config.is_file():
            raise UserError(f"{args.config}: config file not found")
        doc = yaml.safe_load(args.config.read_text()) or {}
    train = {k: scalar(v) for k, v in dict(doc.get("train", {})).items()}
    model = {k: scalar(v) for k, v in dict(doc.get("model", {})).items()}
    extra = {k: v for k, v in doc.items() if k not in ("train", "model")}
    for item in args.set:
        key, value = parse_override(item)
        section, _, name = key.partition(".")
        {"train": train, "model": model}.get(section, extra)[name if section in ("train", "model") else key] = value
    cfg = get_preset(args.preset)
    try:
        cfg = cfg.override(**model)
        known = {f.name for f in fields(TrainConfig)}
        unknown = set(train) - known
        if unknown:
            raise KeyError(f"unknown train keys {sorted(unknown)}")
        tc = TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in train.items()})
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"bad config: {err}") from None
    if args.max_steps is not None:
        tc = replace(tc, max_steps=args.max_steps)
    if args.part == "fusion" and "lr" not in train:
        tc = replace(tc, lr=1e-4)  # the paper's fusion learning rate
    if args.part in ("classifiers", "sync"):  # small networks: the classifiers' step size and length
        from avlink.train.objectives import classifier_train_defaults

        tc = replace(tc, **classifier_train_defaults(train, args.max_steps, args.upsampled))
    batch = args.batch_size or int(extra.pop("batch_size", 32))
    return cfg, tc, batch, extra


def resolve_data(spec: str, out: Path, preset: str, vae: Path | None, ctx: Dist,
                 clip: ClipGeometry | None = None) -> str:
    """A prepared shard folder: as given, or prepared from a data spec into out/prepared (rank 0 prepares) at
    the model's clip geometry (the preset's unless --set changed it)."""
    if Path(spec).is_dir():
        return spec
    if ":" not in spec:
        raise UserError(f"{spec}: neither a prepared folder nor a data spec (syncbench:DIR, folder:DIR, ...)")
    target = out / "prepared"
    if ctx.is_main:
        from avlink.data.prepare import prepare

        prepare(spec, target, preset=preset, vae=None if vae is None else str(vae), clip=clip)
    if ctx.enabled:
        torch.distributed.barrier()
    return str(target)


def resolve_pairs(spec: str, out: Path, cfg: ModelConfig, ctx: Dist) -> str:
    """The upsampler's training pairs (data/pairs.py): a pairs folder as given, or decoded from a data spec into
    out/pairs (rank 0 decodes)."""
    from avlink.data.pairs import PAIRS, prepare_pairs

    if cfg.upsampler is None:
        raise UserError(f"preset {cfg.name} has no upsampler section (config.py UpsamplerConfig)")
    if Path(spec).is_dir():
        if not (Path(spec) / PAIRS).is_file():
            raise UserError(f"{spec}: the upsampler trains on clips: give a data spec (syncbench:DIR[:SPLIT], "
                            f"folder:DIR) or a folder of its pairs (with {PAIRS}), not prepared shards")
        return spec
    if ":" not in spec:
        raise UserError(f"{spec}: neither a pairs folder nor a data spec (syncbench:DIR, folder:DIR, ...)")
    if ctx.is_main:
        prepare_pairs(spec, out / "pairs", cfg.clip, cfg.upsampler.output(cfg.clip.video))
    if ctx.enabled:
        torch.distributed.barrier()
    return str(out / "pairs")


def export_name(args: argparse.Namespace) -> str:
    """The stem of the exported weights: the part's, or the upsampled-geometry classifier's file."""
    if args.part == "classifiers" and args.upsampled:
        from avlink.eval.classifiers import UPSAMPLED_FILE

        return UPSAMPLED_FILE.removesuffix(".safetensors")
    return EXPORT_NAMES[args.part]


def check_upsampled(args: argparse.Namespace) -> None:
    """--upsampled and its options: classifiers only; --labels a SyncBench folder, --init a file."""
    if not args.upsampled:
        for flag, value in (("--labels", args.labels), ("--init", args.init)):
            if value is not None:
                raise UserError(f"{flag}: goes with `avlink train classifiers --upsampled`")
        return
    if args.part != "classifiers":
        raise UserError(f"--upsampled: trains the upsampled-geometry video classifier (`avlink train classifiers "
                        f"--upsampled`), not {args.part}")
    if args.labels is not None and not (args.labels / "metadata.jsonl").is_file():
        raise UserError(f"{args.labels}: not a SyncBench folder (no metadata.jsonl) (--labels)")
    if args.init is not None and not args.init.is_file():
        raise UserError(f"{args.init}: no such file (--init)")


def pairs_labels(args: argparse.Namespace, pairs: str) -> Path:
    """The SyncBench folder whose metadata labels the pairs: --labels, else the one named by the pairs' spec."""
    if args.labels is not None:
        return args.labels
    from avlink.data.pairs import Pairs

    spec = str(Pairs(pairs).meta.get("spec", ""))
    kind, _, rest = spec.partition(":")
    root = Path(rest.split(":")[0]) if kind == "syncbench" else None
    if root is None or not (root / "metadata.jsonl").is_file():
        raise UserError(f"{pairs}: its clips came from {spec!r}, where no SyncBench metadata.jsonl is found; give "
                        f"the SyncBench folder with --labels DIR")
    return root


def shard_batches(source: str, batch_size: int, seed: int, ctx: Dist, workers: int):
    from torch.utils.data import DataLoader

    from avlink.data.shards import ShardDataset, collate

    dataset = ShardDataset(source, ctx.rank, ctx.world_size, shuffle=True, seed=seed)

    def batches(epoch: int, skip: int):
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate, num_workers=workers,
                            drop_last=True)
        return itertools.islice(iter(loader), skip, None)

    return batches


def load_part(path: Path | None, module: torch.nn.Module, what: str, flag: str) -> None:
    if path is None:
        raise UserError(f"fusion training links pretrained generators: pass {flag} (the {what} export)")
    if not path.is_file():
        raise UserError(f"{path}: {what} weights not found")
    try:
        module.load_state_dict(load_file(str(path)))
    except Exception as err:  # a wrong file is a user error, whatever safetensors or torch raise
        raise UserError(f"{path}: does not hold a {what} for this preset ({str(err).splitlines()[0]})") from None


def build_objective(part: str, task: str, cfg: ModelConfig, args: argparse.Namespace, extra: dict[str, Any],
                    device: torch.device, data: str | None = None):
    from avlink.backbones import build_backbone
    from avlink.codecs.vae import AudioVAE
    from avlink.system import PRETRAINED_CODECS, build_model, pretrained_codec
    from avlink.train.objectives import FusionObjective, GeneratorObjective, VAEObjective, classifier_objective

    if part == "classifiers" and args.upsampled:  # true clips at the upsampler's output geometry
        from avlink.train.objectives import upsampled_classifier_objective

        if cfg.upsampler is None:
            raise UserError(f"preset {cfg.name} has no upsampler section (config.py UpsamplerConfig)")
        return upsampled_classifier_objective(data, pairs_labels(args, data), cfg.upsampler.scale, device,
                                              args.init)
    if part == "classifiers":  # the labels come from the prepared clips' metadata
        return classifier_objective(data or args.data, device, n_mels=cfg.clip.audio.n_mels)
    if part == "sync":
        from avlink.train.objectives import sync_objective

        return sync_objective(cfg, device)
    if part == "upsampler":
        from avlink.system import build_upsampler
        from avlink.train.objectives import UpsamplerObjective

        return UpsamplerObjective(build_upsampler(cfg, device), device)
    vae = None
    if args.vae is not None and part != "vae":
        from avlink.codecs.vae import load_vae

        vae = load_vae(str(args.vae), cfg.clip).to(device)
    if part == "vae":
        opts = {**VAE_DEFAULTS, **extra.get("vae", {})}
        module = AudioVAE(cfg.clip.audio, hidden=opts["hidden"], depth=opts["depth"]).to(device)
        return VAEObjective(module, opts["kl_weight"], device)
    if part == "audio":
        audio = build_backbone("audio", cfg.audio, cfg.clip.audio).to(device)
        return GeneratorObjective(audio, "audio", vae, device=device)
    if part == "video":
        return GeneratorObjective(build_backbone("video", cfg.video, cfg.clip.video).to(device), "video", device=device)
    if task == "joint":
        cfg = cfg.override(**{"fusion.shared": True})
    features = None  # a Table 2 feature row: the extractor in the conditioning generator's place
    if cfg.fusion.features != "generator":
        from avlink.eval.features import load_features

        features = load_features(cfg.fusion.features, cfg, args.feature_weights, device)
    try:
        model = build_model(cfg, tasks=("v2a", "a2v") if task == "joint" else (task,), features=features)
    except ValueError as err:  # settings that do not go together (a feature row of the wrong direction, ...)
        raise UserError(f"bad config: {err}") from None
    codecs = {}  # a published generator comes with its weights (from its folder) and its codec
    for modality, path, what, flag in (("audio", args.audio_dit, "text-to-audio generator", "--audio-dit"),
                                       ("video", args.video_dit, "text-to-video generator", "--video-dit")):
        if isinstance(getattr(cfg, modality), PretrainedConfig):
            if getattr(cfg.clip, modality).codec in PRETRAINED_CODECS:
                codecs[modality] = pretrained_codec(cfg, modality, device)
        else:
            load_part(path, getattr(model, modality), what, flag)
    model = model.to(device)
    return FusionObjective(model, task, vae, device=device, codecs=codecs)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def export(out: Path, part: str, objective, cfg: ModelConfig, card: dict[str, Any], name: str | None = None) -> Path:
    """EMA weights of the last checkpoint -> out/export/<name>.safetensors (name: the part's export name by
    default), config.json, <name>.card.json. A
    fusion run that fine-tuned a generator ("w/FT") also writes that generator's weights under its checkpoint
    name (audio_dit.safetensors or video_dit.safetensors; FusionObjective.export_parts)."""
    from avlink.checkpoint import PARTS, save_config
    from avlink.files import atomic_write
    from avlink.train.state import CheckpointManager

    latest = CheckpointManager(out / "checkpoints").latest()
    assert latest is not None, f"{out}: no checkpoint to export"
    weights = latest.weights(ema=True)
    name = name or EXPORT_NAMES[part]
    target = out / "export" / f"{name}.safetensors"
    meta = {"part": part}
    if part == "vae":
        opts = {**VAE_DEFAULTS, **card.get("vae", {})}
        meta.update(hidden=str(opts["hidden"]), depth=str(opts["depth"]))
    if part == "classifiers":
        from avlink.eval.classifiers import weights_metadata

        video_scale = objective.trainable.cfg.video_scale
        meta.update(weights_metadata(video_scale=video_scale))
    if part == "upsampler":
        from avlink.system import upsampler_metadata

        meta.update(upsampler_metadata(cfg))
    if part == "sync":
        from avlink.sync import sync_metadata

        meta.update(sync_metadata(objective.trainable.cfg, cfg.clip))
    parts = objective.export_parts(weights) if part == "fusion" else {name: weights}
    for stem, tensors in parts.items():
        info = meta if stem == name else {"part": PARTS[stem], "finetuned_in": "fusion"}
        atomic_write(out / "export" / f"{stem}.safetensors",
                     lambda tmp, tensors=tensors, info=info: save_file(tensors, str(tmp), metadata=info))
    save_config(out / "export" / "config.json", cfg)
    text = json.dumps(card, indent=2)
    atomic_write(out / "export" / f"{name}.card.json", lambda tmp: tmp.write_text(text))
    return target


def build_validation(args: argparse.Namespace, objective, cfg: ModelConfig, tc: TrainConfig, ctx: Dist):
    """The validate(step) of this run: on rank 0 when --val-data is given, else None. Every rank checks the
    flags, so a bad one stops them all alike."""
    if args.val_data is not None and args.part == "upsampler":
        raise UserError("--val-data: the upsampler is scored by `avlink eval --task upsample` on its export")
    if args.val_data is not None and args.part == "sync":
        raise UserError("--val-data: the sync scorer is judged by the best-of-N outputs it picks (avlink eval on "
                        "`avlink v2a|a2v --candidates N` with its checkpoint folder)")
    if args.val_data is None:
        if args.val_every:
            raise UserError(f"--val-every {args.val_every}: needs --val-data (the clips to validate on)")
        return None
    if args.val_every < 0:
        raise UserError(f"--val-every {args.val_every}: must be 0 (the last step only) or a positive step count")
    if ctx.enabled and tc.sharding == "fsdp":
        raise UserError("--val-data: validation runs on rank 0 alone, which FSDP's sharded weights do not allow "
                        "(train.sharding=ddp validates; or score the export with avlink eval)")
    from avlink.train.validation import ValSettings, build_validator, parse_val_data

    data = parse_val_data(args.val_data)
    settings = ValSettings(args.val_clips, args.val_steps, tc.seed, args.val_vocoder, args.val_classifiers)
    settings.check()
    if not ctx.is_main:
        return None
    return build_validator(args.part, args.task, objective, cfg, data, args.out, settings, ctx.device)


def command_line(command: str, *positional: object, **options: object) -> str:
    """The `avlink` command line that a call made in code stands for, for logs and cards: each option as its
    flag (max_steps -> --max-steps), True as the bare flag, a list as the flag and its items; False, None and []
    left out, as the command's defaults."""
    argv = ["avlink", command, *map(str, positional)]
    for key, value in options.items():
        if value is None or value is False or (isinstance(value, list | tuple) and not value):
            continue  # the command's default
        argv.append("--" + key.replace("_", "-"))
        if isinstance(value, list | tuple):
            argv += map(str, value)
        elif value is not True:
            argv.append(str(value))
    return shlex.join(argv)


def train_args(part: str, *, data: str | Path, out: Path, **options: Any) -> argparse.Namespace:
    """What `avlink train PART --data DATA --out OUT --OPTION VALUE ...` parses to, for a training started in
    code (the recipe, ablations): the parser's default for every option not given, `command_line` for the card.
    Options go by the parser's names (max_steps, set, val_data, ...), with values of the parser's types."""
    parser = argparse.ArgumentParser(prog="avlink train")
    add_arguments(parser)
    args = parser.parse_args([part, "--data", str(data), "--out", str(out)])
    unknown = sorted(set(options) - set(vars(args)))
    if unknown:
        raise TypeError(f"avlink train has no option {', '.join(unknown)}")
    vars(args).update(options)
    args.command_line = command_line("train", part, data=data, out=out, **options)
    return args


def train_part(args: argparse.Namespace) -> Path:
    """Train args.part and export its EMA weights; returns the exported weights file. A run resumed at its last
    step keeps the export of the run that got there.

    It takes the parsed namespace (the command line's, or train_args') rather than keyword arguments: the command
    has some twenty options, and their defaults and types stay in one place, the parser, for the command line
    and the code that trains alike."""
    check_upsampled(args)
    cfg, tc, batch_size, extra = load_settings(args)
    ctx = setup(args.device)
    validator = None
    lock = None
    try:
        if ctx.is_main:
            lock = hold_run_folder(args.out)
        pairs = args.part == "upsampler" or args.upsampled
        if pairs:
            data = resolve_pairs(args.data, args.out, cfg, ctx)
        else:
            data = resolve_data(args.data, args.out, args.preset, args.vae, ctx, cfg.clip)
        objective = build_objective(args.part, args.task, cfg, args, extra, ctx.device, data)
        if args.part == "fusion":
            cfg = objective.model.cfg
        if tc.activation_checkpointing:
            if args.part == "fusion":
                objective.model.set_activation_checkpointing(True)
            elif args.part in ("audio", "video"):
                objective.trainable.activation_checkpointing = True
        validator = build_validation(args, objective, cfg, tc, ctx)
        if pairs:
            from avlink.data.pairs import Pairs, pair_batches

            batches = pair_batches(Pairs(data), batch_size, ctx.rank, ctx.world_size)
        else:
            batches = shard_batches(data, batch_size, tc.seed, ctx, args.workers)
        started = time.time()
        run_config = {"part": args.part, "task": args.task, "preset": args.preset, "model": cfg.to_dict(),
                      "batch_size": batch_size, "data": args.data, **extra}
        result = fit(objective, batches, tc, args.out, resume=args.resume, device=ctx.device,
                     run_config=run_config, progress=not args.no_progress, dist_ctx=ctx,
                     validate=validator, val_every=args.val_every)
        card_path = args.out / "export" / f"{export_name(args)}.card.json"
        if ctx.is_main and not result.losses and card_path.is_file():
            # Resumed at its last step: the export of the run that got there stands (a re-export would lose
            # that run's wall time and losses from its card).
            print(f"avlink train: {args.part} already trained to step {result.step}; export kept: {card_path}")
        elif ctx.is_main:
            if validator is not None and (validator.last or {}).get("step") != result.step:
                from avlink.train.validation import validate_final

                validate_final(validator, objective.trainable, args.out, result.step)
            tail = [loss for _, loss in result.losses[-20:]]
            card = {
                "part": args.part, "task": args.task if args.part == "fusion" else None,
                "command": getattr(args, "command_line", None),
                "seed": tc.seed, "git_commit": git_commit(), "data": args.data, "steps": result.step,
                "batch_size": batch_size, "world_size": ctx.world_size, "wall_time_s": round(time.time() - started, 1),
                "final_loss": sum(tail) / len(tail) if tail else None, "train": asdict(tc), **extra,
                "validation": None if validator is None else validator.last,
                "captions": getattr(objective, "captions", None),
            }
            path = export(args.out, args.part, objective, cfg, card, export_name(args))
            print(f"avlink train: {args.part} exported to {path}")
    finally:
        if validator is not None:
            validator.close()
        if lock is not None:
            lock.release()
        teardown()
    return args.out / "export" / f"{export_name(args)}.safetensors"


RUN_LOCK = "run.lock"


def hold_run_folder(out: Path) -> FileLock:
    """Lock the run folder `out` for this training (its main process): a second `avlink train` (or `avlink
    ablate`, `avlink recipe`) given the same --out while the first runs would resume from the same checkpoints
    and write the same files, so it is refused in one line instead. The lock is an OS file lock (filelock), so a
    killed run leaves nothing that blocks the next."""
    out.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(out / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise UserError(f"{out}: another training is writing this run folder ({RUN_LOCK} is held); wait for it "
                        f"to end or give another --out") from None
    return lock


def run(args: argparse.Namespace) -> int:
    train_part(args)
    return 0
