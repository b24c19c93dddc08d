"""`avlink demo`: the main job on the embedded default.

The demo generates sound for SyncBench test clips and video for their audio with the shipped tiny checkpoints.
Those checkpoints are not part of this release yet, so the command says so and stops.
"""

from __future__ import annotations

import argparse
import sys

from avlink.config import get_preset
from avlink.params import format_table, parameter_table


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")


def run(args: argparse.Namespace) -> int:
    print("avlink demo: the shipped tiny checkpoints are not in this release yet, so there is nothing to generate "
          "with. What is here: the model (see `avlink params`), the data pipeline and the test suite (`make test`).",
          file=sys.stderr)
    print(format_table("tiny", parameter_table(get_preset("tiny"))))
    return 0
