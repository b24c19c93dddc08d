"""`avlink eval`: score generated clips against their references, with a ceiling and a floor beside them.

    avlink eval --task v2a|a2v --generated DIR --reference DIR --out DIR [--metrics ...]
                [--weights NAME=PATH ...] [--ckpt DIR]
    avlink eval --sweep t_cond|steps|evals|cfg|link --ckpt DIR --data SYNCBENCH_DIR --task v2a|a2v --out DIR
                [--values ...]
    avlink eval --task upsample --ckpt DIR --data SYNCBENCH_DIR --out DIR [--n N] [--source true|a2v]

The command reads its options into `EvalSettings`, scores with `evaluate` (scoring.py: how files pair, the
ceiling and floor rows, the metric groups of --metrics) and writes the report to --out (metrics.json,
metrics.md, per_clip.csv; report.py). Every video is read at --fps, every clip over the reference's length
or --duration. --sweep generates with a checkpoint first and scores each setting (sweep.py). --task upsample
scores the checkpoint's video upsampler against the true clip at its output rate and size (upsample.py).

The seam metrics need the windows the outputs were generated in: the clip geometry of --ckpt's config, the
model that made them, or without --ckpt that of the shipped checkpoint, which `avlink v2a` / `a2v` use by
default (`window_geometry`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from avlink.errors import UserError
from avlink.eval import report as rep
from avlink.eval.embedders import REGISTRY
from avlink.eval.scoring import METRIC_GROUPS, EvalSettings, evaluate, parse_weights
from avlink.seq import ClipGeometry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", required=True, choices=("v2a", "a2v", "upsample"),
                        help="which direction was generated; upsample: the checkpoint's video upsampler "
                             "(with --ckpt and --data)")
    parser.add_argument("--generated", type=Path, help="folder of generated files (.wav/.flac/.mp4)")
    parser.add_argument("--reference", type=Path, help="folder of reference files, or a SyncBench folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (metrics.json, .md, CSV)")
    parser.add_argument("--metrics", nargs="+", choices=METRIC_GROUPS, metavar="NAME",
                        help=f"metric groups (default: all that can run): {', '.join(METRIC_GROUPS)}")
    parser.add_argument("--weights", nargs="+", action="extend", metavar="NAME=PATH",
                        help=f"embedder weight files; names: {', '.join(REGISTRY)}")
    parser.add_argument("--fps", type=float, default=6.0, help="frame rate of every video read (default 6)")
    parser.add_argument("--duration", type=float, help="seconds scored per clip (default: the reference's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the shuffled-pairs floor (default 0)")
    parser.add_argument("--ckpt", type=Path,
                        help="checkpoint folder: the model that generated the clips, whose windows the seam metrics "
                             "read (default: the shipped checkpoints/tiny); --sweep generates with it")
    sweep = parser.add_argument_group("sweep (the paper's Figure 3 study)")
    sweep.add_argument("--sweep", choices=("t_cond", "steps", "evals", "cfg", "link"),
                       help="generate at each value and score it (evals: network evaluations per sample; "
                            "cfg: guidance scale, with --prompts captions; link: guidance scale on the input)")
    sweep.add_argument("--data", type=Path, help="SyncBench folder whose clips condition the generation")
    sweep.add_argument("--values", nargs="+", type=float, help="values of the swept setting")
    sweep.add_argument("--n", type=int, help="clips of --data to use (default all)")
    sweep.add_argument("--split", default="test", help="split of --data (default test; 'all' for every clip)")
    sweep.add_argument("--steps", type=int, default=64,
                       help="sampling steps for a t_cond, cfg or link sweep (default 64)")
    sweep.add_argument("--methods", nargs="+", default=["euler"], help="solvers, one curve each (euler)")
    sweep.add_argument("--vocoder", default="hifigan-universal",
                       help="V2A: hifigan-universal, griffin-lim or a checkpoint path")
    sweep.add_argument("--sample-seed", type=int, default=0, help="noise seed of the generation (default 0)")
    sweep.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="fp32 (default) or bf16 autocast of the network (a CPU with bf16 matmul, or CUDA)")
    sweep.add_argument("--prompts", choices=("none", "captions"), default="none",
                       help="none (default) or each clip's SyncBench caption, as the scorecard")
    sweep.add_argument("--batch", type=int, default=1, help="clips sampled together (default 1)")
    up = parser.add_argument_group("the video upsampler (--task upsample; also --ckpt, --data, --n, --split, "
                                   "--sample-seed, and --steps for --source a2v)")
    up.add_argument("--upsample-steps", type=int, help="Euler steps of the upsampler (default: its own)")
    up.add_argument("--source", choices=("true", "a2v"), default="true",
                    help="base frames: the true clip at the model's fps and size (default), or the "
                         "checkpoint's A2V of its sound")


def window_geometry(ckpt: Path | None) -> ClipGeometry | None:
    """The clip geometry of the model that generated the clips: --ckpt's config, else the shipped checkpoint's
    (the generation commands' default); None where that one is not there (the seam metrics are then skipped)."""
    from avlink.checkpoint import load_config
    from avlink.pipeline import DEFAULT_CHECKPOINT

    config = (DEFAULT_CHECKPOINT if ckpt is None else Path(ckpt)) / "config.json"
    if ckpt is None and not config.is_file():
        return None
    return load_config(config).clip  # a missing or broken --ckpt config: one line naming it


def settings_from_args(args: argparse.Namespace) -> EvalSettings:
    if args.fps <= 0 or (args.duration is not None and args.duration <= 0):
        raise UserError("--fps and --duration must be positive")
    metrics = tuple(args.metrics or METRIC_GROUPS)
    return EvalSettings(task=args.task, metrics=metrics, weights=parse_weights(args.weights), fps=args.fps,
                        duration=args.duration, seed=args.seed,
                        clip=window_geometry(args.ckpt) if "seams" in metrics else None)


def run(args: argparse.Namespace) -> int:
    if args.task == "upsample":
        if args.sweep is not None:
            raise UserError("--task upsample: no --sweep")
        from avlink.eval.upsample import run_upsample_eval

        return run_upsample_eval(args)
    if args.sweep is not None:
        from avlink.eval.sweep import run_sweep

        return run_sweep(args)
    if args.generated is None or args.reference is None:
        raise UserError("--generated and --reference are needed (or --sweep with --ckpt and --data)")
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"{args.out}: exists and is not a folder (--out)")
    report = evaluate(args.generated, args.reference, settings_from_args(args))
    paths = rep.write_report(report, args.out)
    print(rep.markdown(report))
    print(f"{report.clips} clips scored, {len(report.problems)} files left out, {len(report.unpaired)} "
          f"unpaired; wrote {', '.join(str(p) for p in paths.values())}")
    return 0 if report.clips else 1
