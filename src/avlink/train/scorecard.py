"""The last step of `avlink recipe`: the shipped parts scored on the SyncBench test split, into their cards.

For each task, every test clip conditions the linked model ("AV-Link") and, for the no-fusion baseline, the
frozen generator alone with the same caption and seed ("T2A alone" / "T2V alone"). Both use the clip's caption
as prompt (the issue's "same captions"), 64 Euler steps and fixed seeds; `avlink eval` then scores them against
the clips (onset, events, AV-Align, class accuracy), with its ground-truth ceiling and shuffled floor.

    OUT/scores/<task>/<system>/generated/  the generated files, metrics.json / .md beside them
    OUT/scores.json, OUT/scores.md           every row side by side
    cards: fusion.card.json[task]["eval"], audio_dit / video_dit .card.json["eval"] (the baseline rows),
           classifiers.card.json["eval"] (their accuracy on the real test clips, the ceiling's class_acc)
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from avlink.backbones.protocol import TextCond
from avlink.config import Task
from avlink.eval import report as rep
from avlink.eval.classifiers import CLASSIFIERS_FILE
from avlink.eval.conditions import caption_texts, load_conditions, write_output
from avlink.eval.scoring import EvalSettings, evaluate
from avlink.files import atomic_write
from avlink.sample import sample_batches
from avlink.system import load_system

METRICS = ("onset", "events", "av_align", "class_acc")
SYSTEMS = {"v2a": ("avlink", "t2a_alone"), "a2v": ("avlink", "t2v_alone")}
LABELS = {"avlink": "AV-Link", "t2a_alone": "T2A alone (no fusion)", "t2v_alone": "T2V alone (no fusion)",
          "ceiling": "ground truth (ceiling)", "floor": "shuffled pairs (floor)"}
KEY_METRICS = {"v2a": ("onset_acc", "onset_ap", "event_f1", "av_align", "class_acc"),
               "a2v": ("event_f1", "event_precision", "event_recall", "av_align", "class_acc")}
BATCH = 25  # clips per sampling batch


@torch.no_grad()
def generate(model: Any, task: Task, system: str, conds: list, text: TextCond | None, steps: int, seed: int,
             batch: int = BATCH, cfg_scale: float = 1.0, first: int = 0) -> list:
    """One generated tensor (1, ...) per clip (`sample.sample_batches`: clip i's own noise streams of the seed,
    conds[0] being clip `first`). text: every clip's prompt, or None. cfg_scale: classifier-free guidance on the
    generated stream's prompt (1: none), the same for AV-Link and the generator alone."""
    batches = sample_batches(model, task, [c.x_cond for c in conds], batch=batch, seed=seed, first=first, text=text,
                             alone=system != "avlink", steps=steps, cfg_scale=cfg_scale)
    return [x[i:i + 1] for _, x in batches for i in range(x.shape[0])]


def score_checkpoint(ckpt: Path, data: Path, out: Path, n: int | None = None, steps: int = 64, seed: int = 0,
                     vocoder: str = "hifigan-universal", progress: bool = True,
                     cfg_scale: float = 1.0) -> dict[str, Any]:
    started = time.perf_counter()
    loaded = load_system(ckpt, vocoder=vocoder)
    model, clip = loaded.model, loaded.clip
    classifier = ckpt / CLASSIFIERS_FILE
    weights = {"syncbench-audio": classifier, "syncbench-video": classifier} if classifier.is_file() else {}
    results: dict[str, Any] = {"steps": steps, "seed": seed, "cfg_scale": cfg_scale, "split": "test",
                               "vocoder": vocoder}
    for task in ("v2a", "a2v"):
        conds = load_conditions(data, n, task, clip, loaded.codecs, "test")
        ids = [c.id for c in conds]
        text = caption_texts(model, data, conds)
        settings = EvalSettings(task=task, metrics=METRICS, weights=weights, fps=clip.video.fps,
                                duration=clip.duration, seed=seed, progress=progress)
        cache: dict = {}
        rows: dict[str, dict[str, float | None]] = {}
        for system in SYSTEMS[task]:
            folder = out / task / system
            xs = generate(model, task, system, conds, text, steps, seed, cfg_scale=cfg_scale)
            (folder / "generated").mkdir(parents=True, exist_ok=True)
            for x, cond in zip(xs, conds, strict=True):
                write_output(task, x, cond, folder / "generated", clip, loaded.codecs)
            report = evaluate(folder / "generated", data, settings, cache=cache, only=set(ids))
            rep.write_report(report, folder)
            rows[system] = report.rows["model"]
            rows.setdefault("ceiling", report.rows["ceiling"])
            rows.setdefault("floor", report.rows.get("floor") or {})
        results[task] = {"clips": len(conds), "rows": rows}
    results["wall_s"] = round(time.perf_counter() - started, 1)
    return results


def markdown(results: dict[str, Any]) -> str:
    cfg = results.get("cfg_scale", 1.0)  # scores written before guidance was an option had none
    guidance = "no guidance" if cfg == 1.0 else f"guidance {cfg:g}"
    lines = [f"# Shipped checkpoint on the SyncBench test split ({results['steps']} Euler steps, seed "
             f"{results['seed']}, captions as prompts, {guidance})", ""]
    for task in ("v2a", "a2v"):
        block = results[task]
        metrics = [m for m in KEY_METRICS[task] if any(r.get(m) is not None for r in block["rows"].values())]
        lines += [f"## {task.upper()} ({block['clips']} clips)", "", "| system | " + " | ".join(metrics) + " |",
                  "|---|" + "---:|" * len(metrics)]
        for system in ("ceiling", *SYSTEMS[task], "floor"):
            row = block["rows"].get(system, {})
            cells = ["" if row.get(m) is None else f"{row[m]:.3f}" for m in metrics]
            lines.append(f"| {LABELS[system]} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def write_scores(ckpt: Path, results: dict[str, Any]) -> None:
    """scores.json / scores.md beside the parts, and each part's card gets its rows."""
    text = json.dumps(results, indent=2)
    atomic_write(ckpt / "scores.json", lambda tmp: tmp.write_text(text + "\n"))
    md = markdown(results)
    atomic_write(ckpt / "scores.md", lambda tmp: tmp.write_text(md))
    common = {"split": "test", "steps": results["steps"], "seed": results["seed"],
              "cfg_scale": results.get("cfg_scale", 1.0)}

    def update(name: str, change) -> None:
        path = ckpt / name
        card = json.loads(path.read_text())
        change(card)
        body = json.dumps(card, indent=2)
        atomic_write(path, lambda tmp: tmp.write_text(body + "\n"))

    def fusion(card: dict) -> None:
        for task in ("v2a", "a2v"):
            rows = results[task]["rows"]
            card[task]["eval"] = {**common, "clips": results[task]["clips"], "model": rows["avlink"],
                                  "no_fusion": rows[SYSTEMS[task][1]], "ceiling": rows["ceiling"],
                                  "floor": rows["floor"]}

    update("fusion.card.json", fusion)
    update("audio_dit.card.json", lambda c: c.update(eval={**common, "t2a_alone": results["v2a"]["rows"]["t2a_alone"]}))
    update("video_dit.card.json", lambda c: c.update(eval={**common, "t2v_alone": results["a2v"]["rows"]["t2v_alone"]}))
    update("classifiers.card.json", lambda c: c.update(eval={
        **common, "audio_class_acc": results["v2a"]["rows"]["ceiling"].get("class_acc"),
        "video_class_acc": results["a2v"]["rows"]["ceiling"].get("class_acc")}))
