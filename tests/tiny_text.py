"""A tiny text encoder and tokenizer in a published generator's folder layout (text_encoder/, tokenizer/), built
offline: a word-level tokenizer over a few words and a randomly initialised T5 or UMT5 encoder."""

from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "</s>", "<unk>", "a", "dog", "barks", "drum", "hit", "glass", "breaks"]


def tiny_text_encoder(folder: Path, kind: str = "t5", dim: int = 16, seed: int = 0) -> Path:
    """Write folder/tokenizer and folder/text_encoder (safetensors) for a `kind` ("t5" or "umt5") of width dim."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(folder / "tokenizer")
    config_cls, model_cls = ((transformers.T5Config, transformers.T5EncoderModel) if kind == "t5"
                             else (transformers.UMT5Config, transformers.UMT5EncoderModel))
    config = config_cls(vocab_size=len(WORDS), d_model=dim, d_kv=dim // 2, num_heads=2, d_ff=2 * dim,
                        num_layers=1, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(seed)
    model_cls(config).save_pretrained(folder / "text_encoder", safe_serialization=True)
    return folder
