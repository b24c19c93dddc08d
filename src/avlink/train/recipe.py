"""`avlink recipe` (what `make checkpoints` runs): everything the embedded default ships, trained from scratch on
SyncBench on one machine, in one command.

    synth train / val / test clips -> prepare shards -> SyncBench classifiers -> sync scorer -> VAE -> shards
    with VAE latents -> T2A, T2V generators -> V2A and A2V Fusion Blocks -> the fast V2A set -> video upsampler
    -> its upsampled-geometry video classifier -> OUT/ (safetensors, config.json, one card per part) -> scores
    on the test split (train/scorecard.py) into the cards, OUT/scores.md

The fast V2A set (OUT/fusion-fast.safetensors, `avlink v2a --fast`) is V2A Fusion Blocks without reinjection
(checkpoint.py FAST_OVERRIDES), trained as the V2A set is, on the same budget: the training of `avlink ablate`'s
"no_reinjection" row, which scores it. The scorecard scores the full sets only.

The generators and fusion blocks validate once, at their last step, on 4 clips of the val split (16 Euler
steps, class accuracy by the classifiers just trained): samples under runs/<part>/samples/, numbers in the card.

Every step calls the library function behind a command a user runs (`avlink synth`, `prepare`, `train`), each
resumable, so a killed recipe picks up where it stopped; OUT/recipe.json logs the command line of each step.
`--scale` multiplies clip counts and step counts, for a quick try. `--budget` changes `Budget` fields
(video_steps=3600) and `--set` the generators' and fusion blocks' sizes (model.video.dim=256), for a machine with
more to spend than the 2-core CPU the default is fitted to. The work folder remembers its settings
(WORK/recipe-settings.json) and refuses others: a T2V trained longer under fusion blocks finished on the old one
would leave them silently stale.

The sync scorer (sync.py, best-of-N's ranker) trains on the shards the classifiers train on: the train split, as
`avlink train sync --data syncbench:DIR:train` would prepare it. The upsampled-geometry video classifier
(eval/classifiers.py UPSAMPLED_FILE, which `avlink eval --task upsample` scores the 24 fps rows with) trains on
the upsampler's training pairs (RUNS/upsampler/pairs), starting from the classifiers just trained.

`--fusion-only CKPT` trains the Fusion Blocks alone on CKPT's other parts (and keeps its upsampler, upsampled
classifier and sync scorer, where it has them, untrained); `--upsampler-only CKPT` trains the video upsampler
and its upsampled-geometry classifier (from CKPT's classifiers) alone (on the train split's clips, synthesized
into WORK/syncbench if missing) and writes CKPT's parts with them to --out, the stage and its wall time added to
the recipe.json kept from CKPT.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from tqdm import tqdm

from avlink.checkpoint import FAST_OVERRIDES, save_fast_fusion
from avlink.data.prepare import MANIFEST, WORKERS, prepare
from avlink.errors import UserError
from avlink.files import atomic_write
from avlink.train.cli import command_line, parse_override, train_args, train_part


@dataclass(frozen=True)
class Budget:
    """Clip and step counts of the tiny recipe, fitted to 100 minutes on 2 CPU cores for the generators and the
    two fusion sets; the fast V2A set, the upsampler, its classifier and the sync scorer came later and add about
    an hour and a half on one core beside other jobs (recipe.json and the cards hold each stage's wall time).

    Fusion blocks learn alignment only on top of base generators that already model their modality well: with
    T2A trained briefly, the blocks first spend themselves on improving the audio model and ignore the video
    (measured: matched and shuffled videos gave the same loss). Hence T2A gets 1500 steps (it is cheap) and the
    fusion blocks train at 1e-3. The paper's fusion rate, 3e-4 for 50k iterations at batch 256, is
    for a budget ~300x larger; on this one a tuning run of the same tiny model (352 SyncBench clips, lr 1e-4 /
    3e-4 / 1e-3 / 3e-3 at batch 32, 2500 steps) learned alignment fastest at 1e-3.

    The VAE and the T2V bound what the linked model can show. VAE: decoded through the vocoder, its
    reconstructions of the 100 test clips were classified right (SyncBench audio classifier, exact class set) on
    0.77 after 600 steps at 3e-4 and 0.93 after 1500 at 1e-3 (real audio 0.97), so the audio class accuracy of any
    V2A model had a 0.77 ceiling. T2V: samples of the T2V alone from the test captions (64 Euler steps, guidance
    3) were classified right on 0.06 after 900 steps at 3e-4 and on 0.35 after 1800 steps at 1e-3 (0.47 with the
    `video.frame_positions` option); its loss is still falling there.

    The class-accuracy target of 0.9 is out of this budget's reach, by measurement. T2Vs trained on one GPU on
    this recipe's 800 clips (batch 32, lr 1e-3, fp32) and sampled alone from the 100 test captions (64 Euler
    steps, one seed; exact class set by the shipped video classifier on the 8-bit samples), guidance 1 / 3:
        steps                     1200         2400         3600
        tiny T2V (dim 128)        0.17 / 0.36  0.31 / 0.52  0.43 / 0.58
        + video.frame_positions   0.24 / 0.36  0.39 / 0.54  0.52 / 0.76
        dim 256 (8 heads)         0.33 / 0.51  0.61 / 0.79  0.75 / 0.86
    (the shipped, CPU-trained T2V: 0.13 / 0.30 the same way). None reaches 0.9 within three times the budget's
    steps. On this CPU a dim-256 step takes 2.0 s against the tiny T2V's 0.8 s (steps 20 to 80 of one run each,
    batch 32), so its 3600 steps alone would take two hours, beyond the 100 minutes for everything. Nor do the
    fusion blocks make up for the T2V: A2V blocks (1000 steps at 1e-3) on a dim-256 T2V of 2400 steps scored
    class accuracy 0.53 (event F1 0.772) where that T2V alone scored 0.49; the shipped model 0.27 (0.729).

    Wall time sets the rest. On this 2-core CPU a T2V step takes 1.0 s and a fusion step 1.2 s at batch 32
    (measured over whole runs, loading and EMA included; compute-bound, autocast to bf16 is no faster), and the
    parts before the T2V take 21 min, the scoring 9.5 min; T2V 1800 and fusion 2 x 1600 steps came to ~125 min.
    So the T2V gets 1200 steps (0.35 at 1200 steps with frame positions, 0.47 at 1800) and each fusion set 1000:
    88.5 min measured for the whole recipe. Test-split scores of that run, against the earlier budget (VAE 600
    and T2V 900 steps at 3e-4, fusion 1600): V2A onset acc 0.857 (0.892), audio class acc 0.81 (0.72); A2V
    event F1 0.732 (0.713), video class acc 0.26 (0.20).
    """

    train_clips: int = 800
    val_clips: int = 64
    test_clips: int = 100
    vae_steps: int = 1500
    audio_steps: int = 1500
    video_steps: int = 1200
    fusion_steps: int = 1000
    classifier_steps: int = 600
    batch_size: int = 32
    fusion_lr: float = 1e-3
    score_steps: int = 64  # Euler steps of the final scoring on the test split
    vae_lr: float = 1e-3
    video_lr: float = 1e-3
    # The video upsampler (upsampler.py) on crops of the train clips: 1500 steps of 16 (flow time drawn near 0,
    # base frames moved in time, guidance on the sound: UpsamplerConfig). Trained on true base frames alone,
    # longer training fitted them, not the A2V frames it serves (README "Second video stage", 100 test clips,
    # event F1 within 1/24 s from A2V's frames: 600 steps 0.653, 1500 steps 0.584); with base frames moved in
    # time it gains from them (64 val clips, A2V's frames, guidance 2: 600 steps 0.706, 1500 steps 0.737).
    upsampler_steps: int = 1500
    upsampler_batch: int = 16
    upsampler_lr: float = 1e-3
    # The upsampled-geometry video classifier, at batch_size: `avlink train classifiers --upsampled`'s default
    # (objectives.py UPSAMPLED_CLASSIFIER_TRAIN_DEFAULTS: 400 steps, a step 1.5 s of CPU time on one core).
    upsampled_classifier_steps: int = 400
    # The sync scorer, at batch_size: `avlink train sync`'s default (1000 steps; with its events head 127 s on the
    # 800 train clips on one CPU thread, its card's wall time; README's Best-of-N).
    sync_steps: int = 1000

    def scaled(self, scale: float) -> Budget:
        def s(n: int, least: int) -> int:
            return max(least, round(n * scale))

        return replace(self, train_clips=s(self.train_clips, 8), val_clips=s(self.val_clips, 2),
                       test_clips=s(self.test_clips, 2), vae_steps=s(self.vae_steps, 2),
                       audio_steps=s(self.audio_steps, 2), video_steps=s(self.video_steps, 2),
                       fusion_steps=s(self.fusion_steps, 2), classifier_steps=s(self.classifier_steps, 2),
                       batch_size=min(self.batch_size, s(self.train_clips, 8)), score_steps=s(self.score_steps, 2),
                       upsampler_steps=s(self.upsampler_steps, 2),
                       upsampler_batch=min(self.upsampler_batch, s(self.train_clips, 8)),
                       upsampled_classifier_steps=s(self.upsampled_classifier_steps, 2),
                       sync_steps=s(self.sync_steps, 2))


SETTINGS = "recipe-settings.json"  # in the work folder: what its runs were started with
FAST_RUN = "v2a-fast"  # the run folder of the fast V2A set
UPSAMPLED_RUN = "classifiers-upsampled"  # the run folder of the upsampled-geometry video classifier
# Parts a checkpoint folder may lack: the upsampler and its classifier (a preset without an upsampler section, a
# fusion-only recipe on a folder without them) and the sync scorer (a fusion-only recipe on a folder without one).
OPTIONAL_PARTS = ("upsampler", UPSAMPLED_RUN, "sync")
MODEL_SECTIONS = ("audio", "video", "fusion")  # what --set may size; clip geometry is the preset's (synth, prepare)


def budget_overrides(items: list[str]) -> dict[str, int | float]:
    """--budget KEY=VALUE items -> Budget field values, typed as the field (whole numbers for counts)."""
    types = {f.name: type(getattr(Budget(), f.name)) for f in fields(Budget)}
    out: dict[str, int | float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in types:
            raise UserError(f"--budget {item}: expected KEY=VALUE with KEY one of {', '.join(types)}")
        try:
            number = types[key](value)
        except ValueError:
            kind = "a whole number" if types[key] is int else "a number"
            raise UserError(f"--budget {item}: {key} takes {kind}") from None
        if not number > 0:
            raise UserError(f"--budget {item}: must be > 0")
        out[key] = number
    return out


def size_overrides(items: list[str], preset: str) -> list[str]:
    """--set items for the generators and fusion blocks, checked against the preset before anything runs."""
    from avlink.config import get_preset

    changes = {}
    for item in items:
        key, value = parse_override(item)  # as every training will read them
        section, _, name = key.partition(".")
        if section != "model" or name.partition(".")[0] not in MODEL_SECTIONS or "." not in name:
            raise UserError(f"--set {item}: expected model.{{{','.join(MODEL_SECTIONS)}}}.KEY=VALUE")
        changes[name] = value
    try:
        cfg = get_preset(preset).override(**changes)
        for section in ("audio", "video"):
            _ = getattr(cfg, section).head_dim  # asserts that dim divides by heads
    except (KeyError, TypeError, AssertionError) as err:
        raise UserError(f"--set {' '.join(items)}: {err}") from None
    return list(items)


def _flat(settings: dict) -> dict:
    """{"budget": {"video_steps": 1}} -> {"budget.video_steps": 1}: what a refusal names."""
    out = {}
    for key, value in settings.items():
        out.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
    return out


def check_settings(work: Path, settings: dict) -> None:
    """The work folder's first recipe settings are written; a later run with other settings is refused."""
    path = work / SETTINGS
    if path.is_file():
        earlier = json.loads(path.read_text())
        if earlier != settings:
            a, b = _flat(earlier), _flat(settings)
            changed = sorted(k for k in {*a, *b} if a.get(k) != b.get(k))
            raise UserError(f"{work}: its runs were started with other recipe settings ({', '.join(changed)} differ; "
                            f"see {path}); give another --work or remove it")
        return
    work.mkdir(parents=True, exist_ok=True)
    text = json.dumps(settings, indent=2)
    atomic_write(path, lambda tmp: tmp.write_text(text))


@contextmanager
def step(name: str, command: str, log: list[dict]) -> Iterator[None]:
    """One step of the recipe: announced with the `avlink` command line that does the same, a UserError in it
    named after it, and logged with that command line and its wall time when it is done."""
    started = time.perf_counter()
    print(f"avlink recipe: {name}: {command}", flush=True)
    try:
        yield
    except UserError as err:
        raise UserError(f"step {name}: {err}") from err
    log.append({"step": name, "command": command, "wall_s": round(time.perf_counter() - started, 1)})


def synth_step(name: str, out: Path, log: list[dict], progress: bool, **options: Any) -> None:
    """`avlink synth --out OUT ...`: options are synth's keywords, which are the command's flags."""
    from avlink.data.syncbench import synth  # here: it brings scipy, which `Budget`'s users do not need

    quiet = None if progress else True  # tqdm's None: on a terminal only
    with step(name, command_line("synth", out=out, **options), log), \
            tqdm(total=options["n"], unit="clip", desc=name, disable=quiet) as bar:
        synth(out, **options, progress=bar.update)


def prepare_step(name: str, spec: str, out: Path, log: list[dict], progress: bool, **options: Any) -> None:
    """`avlink prepare --data SPEC --out OUT ...`: options are prepare's keywords, which are the command's flags.
    A skipped clip stops the recipe, as the command's exit status 3 did."""
    with step(name, command_line("prepare", data=spec, out=out, **options), log):
        skipped = prepare(spec, out, **options, progress=progress)["skipped"]
        if skipped:
            raise UserError(f"{len(skipped)} clips skipped ({skipped[0]['file']}: {skipped[0]['reason']}; all "
                            f"listed in {out / MANIFEST})")


def train_step(name: str, part: str, log: list[dict], **options: Any) -> Path:
    """`avlink train PART ...` (options: train_args'); returns the exported weights."""
    args = train_args(part, **options)
    with step(name, args.command_line, log):
        return train_part(args)


def run_recipe(out: Path, work: Path, preset: str = "tiny", scale: float = 1.0, seed: int = 0,
               progress: bool = True, budget: dict[str, int | float] | None = None,
               model: list[str] | None = None, fusion_only: Path | None = None) -> dict:
    """budget: Budget fields to change before scaling; model: --set items (model.video.dim=256, ...) given to
    every generator and fusion training. fusion_only: a checkpoint folder whose VAE, classifiers and generators
    the Fusion Blocks train on, instead of training those (after a change to the fusion training alone)."""
    b = replace(Budget(), **(budget or {})).scaled(scale)
    model = size_overrides(model or [], preset)
    reused = None if fusion_only is None else check_reused(Path(fusion_only), out)
    check_settings(work, {"preset": preset, "seed": seed, "budget": asdict(b), "model": model,
                          **({} if reused is None else {"fusion_only": str(reused)})})
    log: list[dict] = []
    started = time.perf_counter()
    sb, shards = work / "syncbench", work / "shards"
    for split, n in (("train", b.train_clips), ("val", b.val_clips), ("test", b.test_clips)):
        synth_step(f"synth {split}", sb, log, progress, n=n, seed=seed, split=split, preset=preset, workers=2)
    encode = {"preset": preset, "shard_size": 64, "workers": WORKERS}
    common = {"preset": preset, "batch_size": b.batch_size, "resume": True, "no_progress": not progress}
    runs = work / "runs"
    if reused is None:
        prepare_step("prepare mel", f"syncbench:{sb}:train", shards / "mel", log, progress, **encode)
        # The classifiers first: every later part's last validation scores class accuracy with them.
        classifiers = train_step("train classifiers", "classifiers", log, data=shards / "mel",
                                 out=runs / "classifiers", max_steps=b.classifier_steps, **common)
        train_step("train sync", "sync", log, data=shards / "mel", out=runs / "sync", max_steps=b.sync_steps,
                   **common)
        vae = train_step("train vae", "vae", log, data=shards / "mel", out=runs / "vae", max_steps=b.vae_steps,
                         set=[f"train.lr={b.vae_lr}"], **common)
    else:
        classifiers, vae = reused / "classifiers.safetensors", reused / "vae.safetensors"
    validate = {"val_data": f"syncbench:{sb}:val", "val_classifiers": classifiers}
    prepare_step("prepare latents", f"syncbench:{sb}:train", shards / "latent", log, progress, **encode, vae=str(vae))
    data = shards / "latent"
    generators = {"audio": reused / "audio_dit.safetensors", "video": reused / "video_dit.safetensors"} if reused \
        else {}
    for part, steps, lr in (("audio", b.audio_steps, None), ("video", b.video_steps, b.video_lr)):
        if reused is None:
            sets = ([] if lr is None else [f"train.lr={lr}"]) + model
            generators[part] = train_step(f"train {part}", part, log, data=data, out=runs / part, vae=vae,
                                          max_steps=steps, set=sets, **validate, **common)
    fast = [f"model.{key}={value}" for key, value in FAST_OVERRIDES.items()]
    for name, task, extra in (("v2a", "v2a", []), ("a2v", "a2v", []), (FAST_RUN, "v2a", fast)):
        train_step(f"train fusion {name}", "fusion", log, task=task, data=data, out=runs / name, vae=vae,
                   audio_dit=generators["audio"], video_dit=generators["video"], max_steps=b.fusion_steps,
                   set=[f"train.lr={b.fusion_lr}", *model, *extra], **validate, **common)
    from avlink.config import get_preset

    if reused is None and get_preset(preset).upsampler is not None:
        upsampler_step(sb, runs, b, preset, progress, log)
        upsampled_classifier_step(sb, runs, classifiers, b, preset, progress, log)
    collect(out, runs, reused)
    # Imported here: the scorecard brings the evaluation harness (librosa and the rest), which `Budget`'s users
    # (`avlink ablate --train-only`) do not need.
    from avlink.train.scorecard import markdown, score_checkpoint, write_scores

    started_score = time.perf_counter()
    print(f"avlink recipe: score: {b.test_clips} test clips, {b.score_steps} Euler steps", flush=True)
    results = score_checkpoint(out, sb, work / "scores", n=b.test_clips, steps=b.score_steps, seed=seed,
                               progress=progress)
    write_scores(out, results)
    log.append({"step": "score", "command": "(scorecard.score_checkpoint on the test split)",
                "wall_s": round(time.perf_counter() - started_score, 1)})
    print(markdown(results))
    sizes = {"model": model} if model else {}  # the preset's sizes: recipe.json as before the option
    summary = {"preset": preset, "scale": scale, "seed": seed, "budget": asdict(b), **sizes, "steps": log,
               "wall_s": round(time.perf_counter() - started, 1)}
    if reused is not None:
        summary["fusion_only"] = "VAE, classifiers and generators of the run in generators_recipe"
    previous = out / "recipe.json"
    if reused is not None:  # the parts kept: the recipe run that trained them
        kept = json.loads((reused / "recipe.json").read_text()) if (reused / "recipe.json").is_file() else None
        summary["generators_recipe"] = (kept or {}).get("generators_recipe", kept)
    elif previous.is_file():  # a resumed recipe: keep what the earlier invocations took
        earlier = json.loads(previous.read_text())
        summary["earlier_runs"] = [*earlier.pop("earlier_runs", []), earlier]
        summary["total_wall_s"] = round(summary["wall_s"] + sum(r["wall_s"] for r in summary["earlier_runs"]), 1)
    text = json.dumps(summary, indent=2)
    atomic_write(out / "recipe.json", lambda tmp: tmp.write_text(text))
    return summary


def upsampler_step(sb: Path, runs: Path, b: Budget, preset: str, progress: bool, log: list[dict]) -> Path:
    """`avlink train upsampler` on the train split's clips; returns the exported weights."""
    return train_step("train upsampler", "upsampler", log, data=f"syncbench:{sb}:train", out=runs / "upsampler",
                      preset=preset, batch_size=b.upsampler_batch, max_steps=b.upsampler_steps,
                      set=[f"train.lr={b.upsampler_lr}"], resume=True, no_progress=not progress)


def upsampled_classifier_step(sb: Path, runs: Path, classifiers: Path, b: Budget, preset: str, progress: bool,
                              log: list[dict]) -> Path:
    """`avlink train classifiers --upsampled` on the upsampler's training pairs (decoded by upsampler_step into
    RUNS/upsampler/pairs, cli.resolve_pairs), labelled by the SyncBench folder `sb`, its video network started
    from the base `classifiers`; returns the exported weights."""
    return train_step(f"train {UPSAMPLED_RUN}", "classifiers", log, data=runs / "upsampler" / "pairs",
                      out=runs / UPSAMPLED_RUN, upsampled=True, labels=sb, init=classifiers, preset=preset,
                      batch_size=b.batch_size, max_steps=b.upsampled_classifier_steps, resume=True,
                      no_progress=not progress)


def run_upsampler_only(ckpt: Path, out: Path, work: Path, scale: float = 1.0, seed: int = 0, progress: bool = True,
                       budget: dict[str, int | float] | None = None) -> dict:
    """The video upsampler alone for the checkpoint folder `ckpt`: trained on the train split (its preset's clip
    geometry), its upsampled-geometry video classifier on the upsampler's pairs from ckpt's classifiers, then
    `ckpt`'s parts, the upsampler and that classifier written to `out`, with ckpt's recipe.json and this stage."""
    from avlink.checkpoint import load_config
    from avlink.config import PRESETS

    ckpt = Path(ckpt)
    if not (ckpt / "config.json").is_file():
        raise UserError(f"--upsampler-only {ckpt}: not a checkpoint folder (no config.json)")
    if ckpt.resolve() == Path(out).resolve():
        raise UserError(f"--upsampler-only {ckpt}: give another --out (the checkpoint's parts are copied there)")
    cfg = load_config(ckpt / "config.json")
    if cfg.name not in PRESETS or PRESETS[cfg.name].upsampler is None:
        raise UserError(f"--upsampler-only {ckpt}: its preset {cfg.name!r} has no upsampler section")
    if PRESETS[cfg.name].clip != cfg.clip:
        raise UserError(f"--upsampler-only {ckpt}: its clip geometry is not preset {cfg.name!r}'s")
    classifiers = ckpt / "classifiers.safetensors"
    if not classifiers.is_file():
        raise UserError(f"--upsampler-only {ckpt}: no classifiers.safetensors (the upsampled-geometry video "
                        f"classifier starts from it)")
    b = replace(Budget(), **(budget or {})).scaled(scale)
    log: list[dict] = []
    started = time.perf_counter()
    sb = work / "syncbench"
    synth_step("synth train", sb, log, progress, n=b.train_clips, seed=seed, split="train", preset=cfg.name,
               workers=2)
    runs = work / "runs"
    trained = {"upsampler": upsampler_step(sb, runs, b, cfg.name, progress, log).parent,
               UPSAMPLED_RUN: upsampled_classifier_step(sb, runs, classifiers, b, cfg.name, progress, log).parent}
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(ckpt.iterdir()):
        if path.is_file() and not path.name.startswith(tuple(f"{name}." for name in trained)):
            shutil.copyfile(path, out / path.name)
    for name, export in trained.items():
        for suffix in (".safetensors", ".card.json"):
            shutil.copyfile(export / f"{name}{suffix}", out / f"{name}{suffix}")
    kept = json.loads((ckpt / "recipe.json").read_text()) if (ckpt / "recipe.json").is_file() else {}
    used = ("train_clips", "batch_size", "upsampled_classifier_steps")
    stage = {"scale": scale, "seed": seed, "budget": {k: v for k, v in asdict(b).items()
                                                      if k.startswith("upsampler") or k in used},
             "steps": log, "wall_s": round(time.perf_counter() - started, 1)}
    summary = {**kept, "upsampler_only": stage}
    text = json.dumps(summary, indent=2)
    atomic_write(out / "recipe.json", lambda tmp: tmp.write_text(text))
    return stage


def check_reused(folder: Path, out: Path) -> Path:
    """The checkpoint folder whose VAE, classifiers and generators a fusion-only recipe keeps, checked."""
    parts = [f"{name}{suffix}" for name in ("vae", "audio_dit", "video_dit", "classifiers")
             for suffix in (".safetensors", ".card.json")]
    missing = [name for name in parts if not (folder / name).is_file()]
    if missing:
        raise UserError(f"--fusion-only {folder}: missing {', '.join(missing)}")
    if folder.resolve() == out.resolve():
        raise UserError(f"--fusion-only {folder}: give another --out (the kept parts are copied there)")
    return folder.resolve()


def collect(out: Path, runs: Path, reused: Path | None = None) -> None:
    """The exported parts, in the layout `system.load_link` reads; both fusion sets in one file, the fast V2A set
    in its own (checkpoint.save_fast_fusion). reused: the folder of the VAE, classifiers, generators, sync scorer
    and upsampler of a fusion-only recipe."""
    out.mkdir(parents=True, exist_ok=True)
    for part, name in (("vae", "vae"), ("audio", "audio_dit"), ("video", "video_dit"),
                       ("classifiers", "classifiers"), ("sync", "sync"), ("upsampler", "upsampler"),
                       (UPSAMPLED_RUN, UPSAMPLED_RUN)):
        export = runs / part / "export" if reused is None else reused
        if part in OPTIONAL_PARTS and not (export / f"{name}.safetensors").is_file():
            continue  # OPTIONAL_PARTS says when a folder has none
        for suffix in (".safetensors", ".card.json"):
            shutil.copyfile(export / f"{name}{suffix}", out / f"{name}{suffix}")
    fusion, cards = {}, {}
    for task in ("v2a", "a2v"):
        export = runs / task / "export"
        fusion.update(load_file(str(export / "fusion.safetensors")))
        cards[task] = json.loads((export / "fusion.card.json").read_text())
    atomic_write(out / "fusion.safetensors", lambda tmp: save_file(fusion, str(tmp), metadata={"part": "fusion"}))
    text = json.dumps(cards, indent=2)
    atomic_write(out / "fusion.card.json", lambda tmp: tmp.write_text(text))
    export = runs / FAST_RUN / "export"
    save_fast_fusion(out, load_file(str(export / "fusion.safetensors")),
                     json.loads((export / "fusion.card.json").read_text()), FAST_OVERRIDES)
    # One model config for the linked model: the fusion run's (it holds the generators' sizes too).
    shutil.copyfile(runs / "v2a" / "export" / "config.json", out / "config.json")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("checkpoints/tiny"), help="where the parts go")
    parser.add_argument("--work", type=Path, default=Path("runs/recipe"), help="data, runs and logs")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply clip and step counts (quick tries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="Budget fields before --scale, e.g. video_steps=3600 fusion_steps=2000")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="generator and fusion sizes for every training, e.g. model.video.dim=256 "
                             "model.video.heads=8")
    parser.add_argument("--fusion-only", type=Path, metavar="CKPT",
                        help="train only the Fusion Blocks, on the VAE, classifiers and generators of this "
                             "checkpoint folder (copied to --out), e.g. after changing the fusion training")
    parser.add_argument("--upsampler-only", type=Path, metavar="CKPT",
                        help="train only the video upsampler and its upsampled-geometry classifier for this "
                             "checkpoint folder and write the folder's parts with them to --out")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    if args.upsampler_only is not None:
        if args.fusion_only is not None or args.set:
            raise UserError("--upsampler-only: trains the upsampler alone; --fusion-only and --set do not apply")
        stage = run_upsampler_only(args.upsampler_only, args.out, args.work, args.scale, args.seed,
                                   not args.no_progress, budget=budget_overrides(args.budget))
        print(f"avlink recipe: upsampler and its classifier trained in {stage['wall_s'] / 60:.1f} min; parts in "
              f"{args.out}")
        return 0
    summary = run_recipe(args.out, args.work, args.preset, args.scale, args.seed, not args.no_progress,
                         budget=budget_overrides(args.budget), model=args.set, fusion_only=args.fusion_only)
    print(f"avlink recipe: done in {summary['wall_s'] / 60:.1f} min; parts in {args.out}")
    return 0
