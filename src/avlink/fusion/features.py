"""Pretrained features in place of the conditioning generator's activations (Table 2, "Conditioning features
type": the paper's CLIP and CAVP rows against its diffusion features).

The paper feeds "various pretrained feature extractors in place of frozen generator activations as inputs to the
Fusion Blocks" (Sec. 4.4). Here an extractor is anything that follows `ConditioningFeatures`: it takes the clean
conditioning modality in the flow's space (what the codec encodes) and gives per-time features with the start
time of each, in seconds. The implementations read media through the evaluation's embedders (eval/features.py),
which this layer may not import; whoever builds the link (training, the ablation) passes one in.

`FeatureStream` stands in for the conditioning backbone: a stream of no blocks whose state before the first
fusion point is the features. The rest of the link is unchanged, so a feature row differs from the fusion row in
the conditioning stream's source alone:
- the features enter every Fusion Block through the same joint attention with time-aligned RoPE, at their own
  times (an extractor's steps need not match the generator's tokens; the RoPE positions are seconds x eta_v);
- with reinjection (injection "fusion", "cross_attention") the fused conditioning tokens of one block are the
  next block's input, as the generator's would be after its blocks in between, of which there are none here;
  without it ("static", "direct", "text_concat") every point reads the extractor's features as they are;
- the extractor sees the clean conditioning clip, not the noised one: it was trained on clean media, and the
  paper's feature baselines (Diff-Foley's CAVP, V2A-Mapper's CLIP) read clean frames. The conditioning flow time
  still reaches the blocks' modulation, as in every row. Features are computed once per clip, without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from avlink.backbones.protocol import StreamState


@runtime_checkable
class ConditioningFeatures(Protocol):
    name: str  # what `FusionConfig.features` names it
    modality: Literal["audio", "video"]  # the conditioning modality it reads
    dim: int  # width of its features

    def __call__(self, x_clean: Tensor) -> tuple[Tensor, Tensor]:
        """The clean conditioning modality in the flow's space (B, ...) -> features (B, N, dim) on x_clean's
        device and the (N,) start time in seconds (float64) of each, from the clip's first frame or sample."""
        ...


@dataclass
class FeatureStream:
    """The conditioning stream of a feature row: no blocks; its state is the extractor's features."""

    extractor: ConditioningFeatures
    num_blocks: int = 0

    @property
    def hidden_dim(self) -> int:
        return self.extractor.dim

    def state(self, x_clean: Tensor, t_cond: Tensor) -> StreamState:
        """The features of x_clean as a stream state. Only a backbone's own blocks and head read the fields
        besides x and times; they are left empty."""
        with torch.no_grad():
            x, times = self.extractor(x_clean)
        b = x_clean.shape[0]
        assert x.ndim == 3 and x.shape[0] == b and x.shape[2] == self.extractor.dim, (
            f"{self.extractor.name}: features {tuple(x.shape)}, expected ({b}, N, {self.extractor.dim})")
        assert times.shape == (x.shape[1],), f"{self.extractor.name}: {times.shape[0]} times for {x.shape[1]} steps"
        return StreamState(x=x, t=t_cond, c=x.new_zeros(b, 0), times=times.to(x.device, torch.float64), angles=None,
                           text=x.new_zeros(b, 0, x.shape[2]), text_mask=torch.zeros(b, 0, dtype=torch.bool,
                                                                                     device=x.device),
                           grid=(x.shape[1],))

    def run_blocks(self, state: StreamState, start: int, stop: int) -> StreamState:
        assert start == stop == 0, f"a feature stream has no blocks to run ({start} .. {stop})"
        return state
