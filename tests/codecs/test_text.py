from pathlib import Path

import pytest
import torch

from avlink.backbones.protocol import TextCond
from avlink.codecs.text import MiniLMEncoder, T5Encoder, TextEncoder, load_text_encoder
from avlink.errors import UserError

SENTENCE = "a red ball bounces on the floor blue cube slides and hits wall"
WORDS = ["<pad>", "</s>", "<unk>", *SENTENCE.split(" ")]


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def _tiny_tokenizer():
    """A word-level tokenizer built offline, with T5's conventions (</s> appended, <pad> = 0)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def t5_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5EncoderModel

    folder = tmp_path_factory.mktemp("t5")
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(WORDS), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def test_minilm_states_and_mask(minilm: MiniLMEncoder) -> None:
    assert isinstance(minilm, TextEncoder) and minilm.dim == 384
    assert not minilm.model.training and all(not p.requires_grad for p in minilm.model.parameters())
    captions = ["a red ball bounces twice on a wooden floor", "a beep", ""]
    cond = minilm.encode(captions)
    assert isinstance(cond, TextCond) and cond.tokens.dtype == torch.float32 and cond.mask.dtype == torch.bool
    lengths = [len(minilm.tokenizer(c)["input_ids"]) for c in captions[:2]] + [0]
    assert cond.tokens.shape == (3, max(lengths), 384)
    assert cond.mask.sum(dim=1).tolist() == lengths  # no states for the empty caption: the null text's row
    for i, n in enumerate(lengths):
        assert torch.all(cond.mask[i, :n]) and not torch.any(cond.mask[i, n:])
        assert torch.all(cond.tokens[i, n:] == 0) and torch.all(cond.tokens[i, :n].abs().sum(-1) > 0)
    assert torch.isfinite(cond.tokens).all()


def test_minilm_matches_the_model_run_alone(minilm: MiniLMEncoder) -> None:
    caption = "a blue cube slides and hits the wall"
    batch = minilm.tokenizer([caption], return_tensors="pt")
    with torch.no_grad():
        direct = minilm.model(**batch).last_hidden_state[0]
    cond = minilm.encode(["a beep", caption])
    torch.testing.assert_close(cond.tokens[1, : direct.shape[0]], direct, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(cond.tokens[0, :2], cond.tokens[1, :2])  # different captions differ


def test_minilm_cache_hits_and_identical_states(minilm: MiniLMEncoder) -> None:
    misses, hits = minilm.misses, minilm.hits
    first = minilm.encode(["a metal clang", "a soft thud", "a metal clang"])
    assert minilm.misses - misses == 2 and minilm.hits - hits == 1
    second = minilm.encode(["a soft thud", "a metal clang"])
    assert minilm.misses - misses == 2 and minilm.hits - hits == 3
    assert torch.equal(second.tokens[1], first.tokens[0]) and torch.equal(first.tokens[0], first.tokens[2])


def test_minilm_truncates_and_pads_to(minilm: MiniLMEncoder) -> None:
    cond = minilm.encode([" ".join(["bounce"] * 200)], pad_to=90)
    assert cond.tokens.shape == (1, 90, 384) and cond.mask.sum().item() == 77


def test_t5_from_folder(t5_folder: Path) -> None:
    encoder = load_text_encoder(f"t5:{t5_folder}")
    assert isinstance(encoder, T5Encoder) and encoder.dim == 32
    cond = encoder.encode(["a red ball bounces", "", "Zebra hits wall"])
    assert cond.tokens.shape == (3, 5, 32)
    assert cond.mask.sum(dim=1).tolist() == [5, 0, 4]  # words + </s>; the empty caption has no states
    blank = encoder.encode(["", " "])  # one masked token: the generators read both rows as their null text
    assert blank.tokens.shape == (2, 1, 32) and not blank.mask.any() and not blank.tokens.any()
    assert encoder.misses == 2  # "" was never run through the model
    assert torch.isfinite(cond.tokens).all()


def test_t5_with_a_tokenizer_object(t5_folder: Path) -> None:
    from_files = T5Encoder(t5_folder).encode(["blue cube"])
    given = T5Encoder(t5_folder, tokenizer=_tiny_tokenizer()).encode(["blue cube"])
    torch.testing.assert_close(given.tokens, from_files.tokens)


def test_disk_cache_serves_a_new_encoder(t5_folder: Path, tmp_path: Path) -> None:
    first = T5Encoder(t5_folder, cache_dir=tmp_path)
    a = first.encode(["a red ball", "the wall", "a red ball"])
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 and not list(tmp_path.glob("*.tmp"))
    second = T5Encoder(t5_folder, cache_dir=tmp_path)
    b = second.encode(["the wall", "a red ball"])
    assert second.misses == 0 and second.hits == 2
    assert torch.equal(b.tokens[0, :3], a.tokens[1, :3]) and torch.equal(b.tokens[1], a.tokens[0])
    # Another max length is another encoder name, so it does not read these entries.
    other = T5Encoder(t5_folder, cache_dir=tmp_path, max_length=3)
    other.encode(["a red ball"])
    assert other.misses == 1
    # A damaged entry is recomputed, not fatal.
    path = second.cache_file("a red ball")
    path.write_bytes(b"broken")
    fresh = T5Encoder(t5_folder, cache_dir=tmp_path)
    torch.testing.assert_close(fresh.encode(["a red ball"]).tokens, a.tokens[:1, :4])
    assert fresh.misses == 1


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"no T5 encoder here; put a Hugging Face T5 folder there: config.json"):
        load_text_encoder(f"t5:{tmp_path / 'nothing'}")
    with pytest.raises(UserError, match="needs a local folder"):
        load_text_encoder("t5")
    with pytest.raises(UserError, match="unknown text encoder"):
        load_text_encoder("clip")
    (tmp_path / "config.json").write_text('{"model_type": "t5", "d_model": 8}')
    with pytest.raises(UserError, match="cannot load"):
        T5Encoder(tmp_path)
