"""`avlink params`: parameter counts per part of a preset, built on the meta device (no memory, any size)."""

from __future__ import annotations

import argparse
import json

from torch import nn

from avlink.config import PRESETS, ModelConfig, get_preset
from avlink.system import build_model, build_upsampler


def count(module: nn.Module, trainable: bool | None = None) -> int:
    return sum(p.numel() for p in module.parameters() if trainable is None or p.requires_grad == trainable)


def parameter_table(cfg: ModelConfig) -> dict[str, dict[str, int]]:
    """{part: {"params", "trainable", "frozen"}} for the backbones, each fusion set, one fusion block, total (the
    linked model), and the video upsampler where the preset has one (a model of its own, trained alone: not in
    the total)."""
    model = build_model(cfg, "meta")
    parts: dict[str, nn.Module] = {"audio backbone": model.audio, "video backbone": model.video}
    for name, fset in model.fusion.items():
        parts[f"fusion {name} ({len(fset.blocks)} blocks)"] = fset
    first = next(iter(model.fusion.values()))
    parts["one fusion block"] = first.blocks[0]
    parts["total"] = model
    if cfg.upsampler is not None:
        upsampler = build_upsampler(cfg, "meta")
        out = upsampler.output
        parts[f"video upsampler (to {out.width}x{out.height} at {out.fps:g} fps)"] = upsampler
    return {
        name: {"params": count(m), "trainable": count(m, True), "frozen": count(m, False)}
        for name, m in parts.items()
    }


def format_table(name: str, table: dict[str, dict[str, int]]) -> str:
    lines = [f"preset {name}", f"{'part':<44}{'params':>14}{'trainable':>14}{'frozen':>14}"]
    for part, row in table.items():
        lines.append(f"{part:<44}" + "".join(f"{row[k] / 1e6:>13.2f}M" for k in ("params", "trainable", "frozen")))
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="model preset (default: tiny)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(args: argparse.Namespace) -> int:
    cfg = get_preset(args.preset)
    table = parameter_table(cfg)
    if args.json:
        print(json.dumps({"preset": args.preset, "parts": table}, indent=2))
    else:
        print(format_table(args.preset, table))
    return 0
