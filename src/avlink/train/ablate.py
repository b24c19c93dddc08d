"""`avlink ablate --task v2a`: the paper's Table 2 (V2A ablations) rerun on a checkpoint's frozen generators.

    avlink ablate --task v2a [--ckpt checkpoints/tiny] [--data runs/recipe/shards/latent]
                  [--syncbench runs/recipe/syncbench] [--steps 1000] [--eval-clips 100] [--out runs/ablate/v2a]
                  [--variants fusion no_reinjection ...] [--weights imagebind=PATH synchformer=PATH]

Each variant is a set of `model.fusion` overrides (config.py FusionConfig). Beside the six default rows (VARIANTS
below) the opt-in ones are the rest of the paper's Table 2:
- "Direct alignment w/FT", "Concat. to text w/FT" (direct_ft, text_concat_ft): the generated stream's generator
  is trained too (`fusion.finetune`); its fine-tuned weights are exported with the Fusion Blocks
  (OUT/runs/<variant>/export/audio_dit.safetensors for V2A) and the variant is scored with them;
- "Conditioning features" (features_syncbench, features_imagebind, features_synchformer; V2A): a pretrained
  extractor's per-time video features, computed once per clip, take the video generator's activations' place as
  the Fusion Blocks' conditioning stream (`fusion.features`; fusion/features.py, eval/features.py). ImageBind's
  vision branch is CLIP's ViT-H/14 (the paper's CLIP row); Synchformer stands in for CAVP. The SyncBench video
  classifier needs no download: its weights are CKPT/classifiers.safetensors; the others' files come with
  --weights NAME=PATH;
- "After Block-1 / 11 / 22" (after_block_1, after_block_11, after_block_22): every Fusion Block after that block
  of the paper's 24-block video DiT, mapped to the same place in the checkpoint's (`fusion.after_depth`).
For every variant, fresh Fusion Blocks are trained between the checkpoint's frozen generators as by `avlink train
fusion --resume` into OUT/runs/<variant>/ (so a killed ablation continues where it stopped), then they generate
the other modality of the first --eval-clips clips of the SyncBench test split through the evaluation sweep's
path (`sample_link`,
the checkpoint's VAE, --vocoder), and `avlink eval` scores them in OUT/runs/<variant>/eval/. OUT/table2.md and
OUT/table2.json put the variants side by side with the ground-truth ceiling and the shuffled floor.

Generation uses each clip's caption as prompt for both streams, --batch clips at a time, each clip with its own
noise streams of --sample-seed: the scorecard's scheme (train/scorecard.py), so the "fusion" row of
an ablation on the recipe's data redoes the shipped AV-Link row. Without prompts (--prompts none) the frozen
generator picks what sounds at random and class accuracy sits at the floor in every row.

Training and scoring may run on different machines: `--train-only` trains the variants and stops (it needs no
SyncBench folder, text encoder or vocoder, only the shards and the checkpoint), and a later `avlink ablate` with
the same --steps, --lr, --batch-size, --task and --set scores every OUT/runs/<variant>/export that holds that variant
trained with those settings, without its checkpoints, as it is. `--set` passes training overrides to every
variant (`--set train.precision=fp32` keeps a GPU run in the float32 of a CPU one).

Training follows the recipe's fusion budget (steps, learning rate, batch size: train/recipe.py `Budget`), so
the "fusion" row is the shipped model's recipe retrained.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from avlink.config import PRESETS, ModelConfig, Task
from avlink.errors import UserError
from avlink.train.cli import parse_override, train_args, train_part
from avlink.train.recipe import Budget

PAPER_DEPTH = PRESETS["paper"].video.depth  # the paper's video DiT, whose blocks the arrangement rows name


def after_block(k: int) -> dict[str, Any]:
    """Fusion block arrangement "After Block-k": every block after the paper's video block k, at the same place in
    the checkpoint's video backbone (fusion/linked.py `after_video_block`: 1 / 11 / 22 of 24 are 1 / 3 / 5 of 6)."""
    return {"fusion.placement": "after", "fusion.after_block": k, "fusion.after_depth": PAPER_DEPTH}


# name -> (row title, model.fusion overrides): the rows of the paper's Table 2 that this model can run.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "fusion": ("Fusion blocks (ours)", {}),
    "no_reinjection": ("w/o symm. reinjection", {"fusion.injection": "static"}),
    "cross_attention": ("Symm. cross attention", {"fusion.injection": "cross_attention"}),
    "direct": ("Direct alignment", {"fusion.injection": "direct"}),
    "text_concat": ("Concat. to text", {"fusion.injection": "text_concat"}),
    "uniform_t_cond": ("Conditioning t: uniform samp.", {"fusion.t_cond_mode": "uniform"}),
    # Feature injection with the generated stream's generator fine-tuned ("w/FT").
    "direct_ft": ("Direct alignment w/FT", {"fusion.injection": "direct", "fusion.finetune": True}),
    "text_concat_ft": ("Concat. to text w/FT", {"fusion.injection": "text_concat", "fusion.finetune": True}),
    # Conditioning features type: a pretrained extractor's features in place of the video generator's activations,
    # into the same Fusion Blocks (eval/features.py; ImageBind's vision branch is CLIP's ViT-H, and Synchformer,
    # trained contrastively for audio-visual synchrony, takes CAVP's place).
    "features_syncbench": ("Conditioning features: SyncBench classifier", {"fusion.features": "syncbench-video"}),
    "features_imagebind": ("Conditioning features: CLIP (ImageBind)", {"fusion.features": "imagebind"}),
    "features_synchformer": ("Conditioning features: CAVP (Synchformer)", {"fusion.features": "synchformer"}),
    # Fusion block arrangement: all blocks stacked after one video block.
    "after_block_1": ("After Block-1", after_block(1)),
    "after_block_11": ("After Block-11", after_block(11)),
    "after_block_22": ("After Block-22", after_block(22)),
}
# The rows run without --variants. The others are opt-in: each row is one more training run at the recipe's
# budget, generation and scoring on top of the six; the w/FT rows also train a whole generator (with its Adam and
# EMA states), and the feature rows need an extractor's weights (the checkpoint's classifiers, or ImageBind's or
# Synchformer's files) and run V2A only.
DEFAULT_VARIANTS = ("fusion", "no_reinjection", "cross_attention", "direct", "text_concat", "uniform_t_cond")
# Extractor weights a feature row falls back on without --weights: the checkpoint's SyncBench classifiers.
CHECKPOINT_FEATURE_WEIGHTS = {"syncbench-video": "classifiers.safetensors"}
COLUMNS = ("onset_acc", "onset_ap", "event_f1", "av_align", "class_acc")
METRIC_GROUPS = ("onset", "events", "av_align", "class_acc")  # the evaluation groups behind COLUMNS
BASE_PARTS = ("config.json", "audio_dit.safetensors", "video_dit.safetensors", "vae.safetensors")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    budget = Budget()
    parser.add_argument("--task", default="v2a", choices=("v2a", "a2v"), help="direction (Table 2 is V2A)")
    parser.add_argument("--ckpt", type=Path, default=Path("checkpoints/tiny"),
                        help="checkpoint folder whose generators (and VAE) stay frozen (default checkpoints/tiny)")
    parser.add_argument("--data", type=Path, default=Path("runs/recipe/shards/latent"),
                        help="training shards written by `avlink prepare` (default: the recipe's)")
    parser.add_argument("--syncbench", type=Path, default=Path("runs/recipe/syncbench"),
                        help="SyncBench folder whose --split clips are generated and scored")
    parser.add_argument("--split", default="test", help="SyncBench split to score (default test; 'all')")
    parser.add_argument("--out", type=Path, help="runs and tables (default runs/ablate/TASK)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=sorted(VARIANTS),
                        metavar="NAME", help=f"rows to run (default: {' '.join(DEFAULT_VARIANTS)}; also "
                                             f"{' '.join(v for v in VARIANTS if v not in DEFAULT_VARIANTS)})")
    parser.add_argument("--steps", type=int, default=budget.fusion_steps, help="training steps per variant")
    parser.add_argument("--lr", type=float, default=budget.fusion_lr, help="fusion learning rate")
    parser.add_argument("--batch-size", type=int, default=budget.batch_size)
    parser.add_argument("--eval-clips", type=int, default=budget.test_clips, help="clips scored per variant")
    parser.add_argument("--sample-steps", type=int, default=64, help="Euler steps of the generation")
    parser.add_argument("--sample-seed", type=int, default=0, help="noise seed (each clip draws its own streams of it)")
    parser.add_argument("--prompts", default="captions", choices=("captions", "none"),
                        help="text prompt of both streams: each clip's caption (default) or none")
    parser.add_argument("--batch", type=int, default=25, help="clips per sampling batch (default 25)")
    parser.add_argument("--vocoder", default="hifigan", help="V2A: hifigan, griffinlim or a checkpoint path")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--weights", nargs="+", action="extend", default=[], metavar="NAME=PATH",
                        help="weights of the feature rows' extractors: imagebind=imagebind_huge.pth, "
                             "synchformer=synchformer_state_dict.pth, syncbench-video=PATH (default: CKPT's "
                             "classifiers.safetensors)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="training overrides for every variant, as `avlink train --set` (train.precision=fp32)")
    parser.add_argument("--train-only", action="store_true",
                        help="train the variants and stop; a later `avlink ablate` with the same settings scores "
                             "them (to train on one machine and score on another)")
    parser.add_argument("--no-progress", action="store_true")


# --- training -----------------------------------------------------------------------------------------------


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def model_overrides(base: ModelConfig, variant: str) -> tuple[str, dict[str, Any]]:
    """(preset, dotted overrides) under which `avlink train` builds the checkpoint's model with the variant's
    fusion settings: the nearest named preset, and every value where the checkpoint differs from it."""
    preset = base.name if base.name in PRESETS else "tiny"
    ours, theirs = flatten(base.to_dict()), flatten(PRESETS[preset].to_dict())
    overrides = {k: v for k, v in ours.items() if theirs.get(k) != v}
    return preset, {**overrides, **VARIANTS[variant][1]}


def variant_features(variant: str) -> str | None:
    """The extractor a feature row conditions on (None: the generator's activations)."""
    return VARIANTS[variant][1].get("fusion.features")


def feature_weights(args: argparse.Namespace, name: str) -> Path:
    """The weight file of extractor `name`: --weights NAME=PATH, else the checkpoint's (syncbench-video)."""
    from avlink.eval.scoring import parse_weights

    given = parse_weights(args.weights)  # a malformed item or a missing file: one line
    if name in given:
        return given[name]
    if name in CHECKPOINT_FEATURE_WEIGHTS:
        return args.ckpt / CHECKPOINT_FEATURE_WEIGHTS[name]
    raise UserError(f"the {name} feature row needs the extractor's weights: pass --weights {name}=PATH")


def check_inputs(args: argparse.Namespace) -> None:
    missing = [name for name in BASE_PARTS if not (args.ckpt / name).is_file()]
    if missing:
        raise UserError(f"{args.ckpt}: not a checkpoint folder with frozen generators, missing {', '.join(missing)}")
    for variant in args.variants:
        name = variant_features(variant)
        if name is None:
            continue
        if args.task != "v2a":
            raise UserError(f"variant {variant}: the feature rows condition on video features, V2A only "
                            f"(--task {args.task})")
        path = feature_weights(args, name)
        if not path.is_file():
            raise UserError(f"{path}: not found; variant {variant} reads {name}'s weights there (--weights "
                            f"{name}=PATH)")
    if not args.train_only and not (args.syncbench / "metadata.jsonl").is_file():
        raise UserError(f"{args.syncbench}: not a SyncBench folder (no metadata.jsonl); make one with "
                        f"`avlink synth --split test`")
    manifest = args.data / "manifest.json"
    if not manifest.is_file():
        raise UserError(f"{args.data}: not a shard folder (no manifest.json); make one with `avlink prepare "
                        f"--data syncbench:DIR:train --out SHARDS --vae {args.ckpt / 'vae.safetensors'}`")
    written = json.loads(manifest.read_text()).get("counts", {}).get("written", 0)
    if written < args.batch_size:
        raise UserError(f"{args.data}: {written} clips, fewer than one batch of {args.batch_size} (--batch-size)")
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--eval-clips", args.eval_clips), ("--sample-steps", args.sample_steps),
                        ("--batch", args.batch)):
        if value < 1:
            raise UserError(f"{flag} {value}: must be at least 1")


def trained_export(run_dir: Path, args: argparse.Namespace, overrides: dict[str, Any]) -> dict[str, Any] | None:
    """The card of run_dir's export when it is this variant trained with these settings (--steps, --lr,
    --batch-size, --task, the variant's model, the train. and model. values of --set), else None. Such an
    export is scored as it is, so a variant may be trained elsewhere (`--train-only` on a GPU machine) and only its
    export folder brought here."""
    export = run_dir / "export"
    try:
        card = json.loads((export / "fusion.card.json").read_text())
        exported = flatten(json.loads((export / "config.json").read_text()))
    except (OSError, ValueError):
        return None
    train = card.get("train") or {}
    wanted = {"train": {**train, "lr": args.lr}, "model": {**exported, **overrides}}
    finetuned = finetuned_files(bool(exported.get("fusion.finetune")), args.task)
    for item in args.set:  # --set train.X / model.X: the export must have been trained with them too
        key, value = parse_override(item)  # `avlink train --set`'s reading of an item
        section, _, name = key.partition(".")
        if section in wanted:
            wanted[section][name] = value
    same = (card.get("steps") == args.steps and card.get("task") == args.task
            and card.get("batch_size") == args.batch_size and (export / "fusion.safetensors").is_file()
            and all((export / name).is_file() for name in finetuned)
            and wanted["train"] == train and wanted["model"] == exported)
    return card if same else None


def train_variant(args: argparse.Namespace, base: ModelConfig, variant: str) -> Path:
    """Train the variant's fusion blocks (as `avlink train fusion`), resumed if it ran before; returns its run
    folder. An export of the same variant and settings without its checkpoints (trained elsewhere) is kept as it
    is."""
    run_dir = args.out / "runs" / variant
    preset, overrides = model_overrides(base, variant)
    card = trained_export(run_dir, args, overrides)
    if card is not None and not (run_dir / "checkpoints").is_dir():
        print(f"avlink ablate: {variant}: trained export found ({card['steps']} steps, world size "
              f"{card.get('world_size', 1)}), not retrained", flush=True)
        return run_dir
    config = run_dir / "ablation.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump({"train": {"lr": args.lr}, "model": overrides}, sort_keys=False))
    name = variant_features(variant)
    training = train_args("fusion", task=args.task, preset=preset, data=args.data, out=run_dir, config=config,
                          vae=args.ckpt / "vae.safetensors", audio_dit=args.ckpt / "audio_dit.safetensors",
                          video_dit=args.ckpt / "video_dit.safetensors", max_steps=args.steps,
                          batch_size=args.batch_size, device=args.device, resume=True, set=args.set,
                          feature_weights=None if name is None else feature_weights(args, name),
                          no_progress=args.no_progress)
    print(f"avlink ablate: {variant}: {training.command_line}", flush=True)
    try:
        train_part(training)
    except UserError as err:
        raise UserError(f"variant {variant}: {err}") from err
    return run_dir


# --- evaluation ---------------------------------------------------------------------------------------------


def finetuned_files(finetune: bool, task: Task) -> list[str]:
    """The generator files that a variant's export holds in place of the checkpoint's: with fusion.finetune
    ("w/FT"), the generated stream's."""
    from avlink.checkpoint import PARTS

    generated = "audio" if task == "v2a" else "video"
    return [f"{stem}.safetensors" for stem, attr in PARTS.items() if finetune and attr == generated]


def load_variant(ckpt: Path, run_dir: Path, task: Task, device: torch.device,
                 weights: dict[str, Path] | None = None) -> torch.nn.Module:
    """The checkpoint's frozen generators linked by the variant's trained fusion blocks (its export); a w/FT
    variant's generated stream takes the fine-tuned generator of the export, a feature row the extractor whose
    weights `weights` names (extractor name -> file)."""
    from avlink.checkpoint import PARTS, load_config, load_weights
    from avlink.system import build_model

    export = run_dir / "export"
    cfg = load_config(export / "config.json")  # every damaged or missing file: one line (WeightsError)
    features = None
    if cfg.fusion.features != "generator":
        from avlink.eval.features import load_features

        features = load_features(cfg.fusion.features, cfg, (weights or {}).get(cfg.fusion.features), device)
    model = build_model(cfg, tasks=(task,), features=features)
    own = finetuned_files(cfg.fusion.finetune, task)
    for stem, attr in PARTS.items():
        if attr != "fusion":
            name = f"{stem}.safetensors"
            load_weights((export if name in own else ckpt) / name, getattr(model, attr))
    load_weights(export / "fusion.safetensors", model.fusion)
    return model.to(device).eval()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def generate_variant(args: argparse.Namespace, model: Any, conds: list, texts: Any, folder: Path,
                     codecs: dict[str, Any], source: dict[str, Any]) -> None:
    """Write the variant's generated clips into folder/generated. A batch whose clips are all there from the same
    weights and sampling settings (folder/source.json) is kept, so a killed ablation does not redo it."""
    from avlink.eval.conditions import write_output
    from avlink.files import atomic_write
    from avlink.train.scorecard import generate

    generated, marker = folder / "generated", folder / "source.json"
    if not marker.is_file() or json.loads(marker.read_text()) != source:
        shutil.rmtree(generated, ignore_errors=True)
    generated.mkdir(parents=True, exist_ok=True)
    text = json.dumps(source, indent=2)
    atomic_write(marker, lambda tmp: tmp.write_text(text))
    suffix = ".wav" if args.task == "v2a" else ".mp4"
    device = model_device(model)
    for start in range(0, len(conds), args.batch):
        chunk = conds[start:start + args.batch]
        if all((generated / f"{c.id}{suffix}").is_file() for c in chunk):
            continue
        xs = generate(model, args.task, "avlink", [replace(c, x_cond=c.x_cond.to(device)) for c in chunk],
                      None if texts is None else texts.rows(start, len(chunk)),
                      args.sample_steps, args.sample_seed, batch=args.batch, first=start)
        for x, cond in zip(xs, chunk, strict=True):
            write_output(args.task, x.cpu(), cond, generated, model.cfg.clip, codecs)


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# --- the table ----------------------------------------------------------------------------------------------


def _value(value: float | None) -> float | None:
    return None if value is None or value != value else float(value)  # NaN -> None


# The paired bootstrap of each variant's difference to the Fusion Blocks (the reference row): the clips resampled
# with replacement, the same draw for both rows, the 2.5th and 97.5th percentiles of the mean difference. Onset
# accuracy is a mean over clips (eval/onset.py), so its per-clip values resample as they are; the pooled columns
# (event F1) are not means over clips and get no interval.
BOOTSTRAP = {"column": "onset_acc", "reference": "fusion", "resamples": 5000, "seed": 0}


def paired_interval(reference: dict[str, float], variant: dict[str, float], resamples: int = 5000,
                    seed: int = 0) -> tuple[float, float] | None:
    """95% paired-bootstrap interval of mean(variant - reference) over the clips both scored (clip -> value;
    NaN values left out); None when no clip is shared."""
    clips = sorted(c for c in reference.keys() & variant.keys() if reference[c] == reference[c]
                   and variant[c] == variant[c])
    if not clips:
        return None
    diff = np.array([variant[c] - reference[c] for c in clips], dtype=np.float64)
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def clip_values(report: Any, column: str) -> dict[str, float]:
    """clip id -> the report's per-clip value of `column` (missing or empty: left out)."""
    values = {}
    for row in report.per_clip:
        value = row.get(column)
        if value is not None and value != "":
            values[str(row["clip"])] = float(value)
    return values


def intervals(reports: dict[str, Any]) -> dict[str, list[float]]:
    """variant -> [low, high] of BOOTSTRAP's interval against its reference row, for each other variant scored
    with it."""
    ref, column = BOOTSTRAP["reference"], BOOTSTRAP["column"]
    if ref not in reports:
        return {}
    base = clip_values(reports[ref], column)
    out = {}
    for variant, report in reports.items():
        if variant != ref:
            found = paired_interval(base, clip_values(report, column), BOOTSTRAP["resamples"], BOOTSTRAP["seed"])
            if found is not None:
                out[variant] = list(found)
    return out


def summarize(args: argparse.Namespace, reports: dict[str, Any]) -> dict[str, Any]:
    """Rows: the variants, then ceiling and floor; columns: COLUMNS that any row measured; intervals: each
    variant's paired-bootstrap interval of its onset accuracy minus the Fusion Blocks' (BOOTSTRAP)."""
    first = next(iter(reports.values()))
    rows = {v: {c: _value(r.value(c)) for c in COLUMNS} for v, r in reports.items()}
    for row in ("ceiling", "floor"):
        rows[row] = {c: _value(first.value(c, row)) for c in COLUMNS}
    columns = [c for c in COLUMNS if any(values[c] is not None for values in rows.values())]
    notes = sorted({note for r in reports.values() for note in r.notes})
    return {
        "task": args.task, "ckpt": str(args.ckpt), "data": str(args.data), "syncbench": str(args.syncbench),
        "split": args.split, "steps": args.steps, "lr": args.lr, "batch_size": args.batch_size,
        "sample_steps": args.sample_steps, "prompts": args.prompts, "vocoder": args.vocoder, "clips": first.clips,
        "columns": columns, "titles": {v: VARIANTS[v][0] for v in reports},
        "rows": {name: {c: values[c] for c in columns} for name, values in rows.items()}, "notes": notes,
        "intervals": intervals(reports) if BOOTSTRAP["column"] in columns else {},
        "bootstrap": BOOTSTRAP,
    }


def table_markdown(summary: dict[str, Any]) -> str:
    from avlink.eval.report import ROW_TITLES

    columns = summary["columns"]
    spans = summary.get("intervals") or {}
    boot = summary.get("bootstrap") or BOOTSTRAP
    ref = boot["reference"]
    headers = [h for c in columns for h in ([c, f"vs {ref}"] if spans and c == boot["column"] else [c])]
    lines = [f"# Table 2 ablation ({summary['task'].upper()}, {summary['steps']} training steps per variant, "
             f"{summary['clips']} SyncBench {summary['split']} clips, {summary['sample_steps']} Euler steps, "
             f"prompts: {summary.get('prompts', 'none')})", "",
             "| variant | " + " | ".join(headers) + " |", "|---|" + "---:|" * len(headers)]
    for name, values in summary["rows"].items():
        title = summary["titles"].get(name) or ROW_TITLES[name]
        cells = []
        for c in columns:
            cells.append("n/a" if values[c] is None else f"{values[c]:.4f}")
            if spans and c == boot["column"]:
                span = spans.get(name)
                cells.append("" if span is None else f"{span[0]:+.3f} .. {span[1]:+.3f}")
        lines.append(f"| {title} | {' | '.join(cells)} |")
    lines += ["", "Higher is better in every column."]
    if spans:
        lines.append(f"vs {ref}: the 95% paired-bootstrap interval of the row's {boot['column']} minus the "
                     f"{summary['titles'].get(ref, ref)} row's ({boot['resamples']} resamples of the clips, seed "
                     f"{boot['seed']}).")
    lines += [f"- {note}" for note in summary["notes"]]
    return "\n".join(lines) + "\n"


def write_table(out: Path, summary: dict[str, Any]) -> str:
    from avlink.files import atomic_write

    text = table_markdown(summary)
    blob = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "table2.json", lambda tmp: tmp.write_text(blob))
    atomic_write(out / "table2.md", lambda tmp: tmp.write_text(text))
    return text


# --- the command --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from avlink.checkpoint import load_config

    args.out = args.out or Path("runs/ablate") / args.task
    check_inputs(args)
    base = load_config(args.ckpt / "config.json")
    runs = {variant: train_variant(args, base, variant) for variant in dict.fromkeys(args.variants)}
    if args.train_only:
        print(f"avlink ablate: trained {', '.join(runs)} in {args.out / 'runs'}; run again without --train-only "
              f"to score them", file=sys.stderr)
        return 0
    # The evaluation harness and the vocoder (librosa and the rest), which training alone does not need.
    from avlink.eval import report as rep
    from avlink.eval.conditions import caption_texts, load_conditions
    from avlink.eval.scoring import EvalSettings, classifier_name, evaluate
    from avlink.system import load_codecs

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    clip = base.clip
    codecs = load_codecs(args.ckpt, base, args.vocoder if args.task == "v2a" else None)
    split = None if args.split == "all" else args.split
    conds = load_conditions(args.syncbench, args.eval_clips, args.task, clip, codecs, split=split)
    classifiers = args.ckpt / "classifiers.safetensors"  # class_acc's classifier, when the checkpoint ships one
    weights = {classifier_name(args.task): classifiers} if classifiers.is_file() else {}
    settings = EvalSettings(task=args.task, metrics=METRIC_GROUPS, weights=weights, fps=clip.video.fps,
                            duration=clip.duration, progress=not args.no_progress)
    cache: dict = {}  # the reference clips' features, the same for every variant
    reports = {}
    texts = None
    for variant, run_dir in runs.items():
        export = run_dir / "export"
        name = variant_features(variant)
        extractor = {} if name is None else {name: feature_weights(args, name)}
        model = load_variant(args.ckpt, run_dir, args.task, device, extractor)
        if texts is None and args.prompts == "captions":  # the text encoder is the checkpoint's, as every variant's
            texts = caption_texts(model, args.syncbench, conds).to(device)
        weights = {"fusion": file_digest(export / "fusion.safetensors"),
                   **{f: file_digest(export / f) for f in finetuned_files(model.cfg.fusion.finetune, args.task)},
                   **{n: file_digest(path) for n, path in extractor.items()}}
        source = {**weights, "sample_steps": args.sample_steps, "seed": args.sample_seed,
                  "prompts": args.prompts, "batch": args.batch, "vocoder": args.vocoder,
                  "clips": [c.id for c in conds]}
        folder = run_dir / "eval"
        generate_variant(args, model, conds, texts, folder, codecs, source)
        report = evaluate(folder / "generated", args.syncbench, settings, cache=cache, only={c.id for c in conds})
        rep.write_report(report, folder)
        reports[variant] = report
        print(f"avlink ablate: {variant}: {report.clips} clips scored", flush=True)
    summary = summarize(args, reports)
    print(write_table(args.out, summary))
    print(f"avlink ablate: wrote {args.out / 'table2.md'} and {args.out / 'table2.json'}", file=sys.stderr)
    return 0
