"""`avlink ...`: one entry point; each subcommand lives in the module that does the work.

A subcommand module offers `add_arguments(parser)` and `run(args) -> int`. Modules are imported only when
their command runs, so `avlink --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from avlink.errors import UserError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("avlink.demo", "the main job on the embedded default (needs the shipped checkpoints)"),
    "v2a": ("avlink.generate", "sound for a video, muxed into it (a file, a folder or a list of files)"),
    "a2v": ("avlink.generate", "a video for a sound, with that sound (a file, a folder or a list of files)"),
    "params": ("avlink.params", "parameter counts per part of a preset (built on the meta device)"),
    "bench": ("avlink.bench", "sampling and training speed, FLOPs and utilisation per preset (table + JSON)"),
    "synth": ("avlink.data.syncbench", "render SyncBench clips (procedural audio-visual data set)"),
    "prepare": ("avlink.data.prepare", "encode a data set into WebDataset shards"),
    "recipe": ("avlink.train.recipe", "train everything the embedded default ships, from scratch (make checkpoints)"),
    "train": ("avlink.train.cli", "train the VAE, a generator or the Fusion Blocks (torchrun for many GPUs)"),
    "eval": ("avlink.eval.runner", "score generated clips against references, or sweep a sampling setting"),
    "ablate": ("avlink.train.ablate", "rerun the paper's Table 2 ablations: train each fusion variant, score it"),
    "app": ("avlink.app", "a local web app for V2A and A2V (Gradio, offline, 127.0.0.1 by default)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avlink", description="AV-Link: video-to-audio and audio-to-video generation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage / the error and exits
        return 2
    name, rest = argv[0], argv[1:]
    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=f"avlink {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command_line = "avlink " + " ".join(argv)  # for model cards and logs
    try:
        return int(module.run(args) or 0)
    except UserError as err:
        print(f"avlink {name}: {err}", file=sys.stderr)
        return 2


def console() -> None:
    """The `avlink` program: `main`, then exit with its status. A process that joined a torchrun process group
    exits through train/distributed.py `leave`, which skips an interpreter shutdown that gloo can abort."""
    code = main()
    distributed = sys.modules.get("avlink.train.distributed")  # imported only by commands that can run under torchrun
    if distributed is not None and distributed.joined():
        distributed.leave(code)
    sys.exit(code)


if __name__ == "__main__":  # python -m avlink.cli, torchrun -m avlink.cli
    console()
