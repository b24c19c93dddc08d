"""The text encoder a published generator ships in its folder (codecs.text.PretrainedTextEncoder)."""

from __future__ import annotations

import pytest
import torch

from avlink.codecs.text import PretrainedTextEncoder
from avlink.errors import UserError
from tiny_text import tiny_text_encoder


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_states_come_padded_to_the_pipelines_length_with_the_padding_masked(tmp_path, kind):
    folder = tiny_text_encoder(tmp_path / kind, kind)
    encoder = PretrainedTextEncoder(folder, length=8, download="a test model")
    text = encoder.encode(["a dog barks", "glass breaks"])
    assert text.tokens.shape == (2, 8, 16)
    # "a dog barks </s>" is 4 tokens, "glass breaks </s>" 3: the rest is padding, masked
    assert text.mask.sum(1).tolist() == [4, 3]
    assert torch.equal(text.tokens[1, 3:], torch.zeros(5, 16))
    # the states of a caption do not depend on what it is batched with
    alone = encoder.encode(["glass breaks"])
    torch.testing.assert_close(alone.tokens, text.tokens[1:], rtol=0, atol=1e-6)


def test_a_folder_without_an_encoder_or_with_pickled_weights_is_refused_in_one_line(tmp_path):
    with pytest.raises(UserError, match=r"no text_encoder/ with its config.json and tokenizer/ there; download the "
                                        r"whole diffusers folder of Org/Model"):
        PretrainedTextEncoder(tmp_path / "nothing", 8, "Org/Model")
    folder = tiny_text_encoder(tmp_path / "t5")
    for weights in (folder / "text_encoder").glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(UserError, match=r"text_encoder: no .safetensors weights \(pickled .bin files are never"):
        PretrainedTextEncoder(folder, 8, "Org/Model")
