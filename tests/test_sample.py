import torch

from avlink.backbones.protocol import TextCond
from avlink.sample import generated_shape, sample_backbone, sample_link

from helpers import tiny_batch, tiny_link


def text(b, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextCond(torch.randn(b, 3, 16, generator=g), torch.ones(b, 3, dtype=torch.bool))


def test_generated_length_covers_the_condition():
    model = tiny_link()
    audio, video = tiny_batch(model.cfg)
    assert generated_shape(model, "v2a", video) == audio.shape
    assert generated_shape(model, "a2v", audio) == video.shape
    # any length: 12 frames at 6 fps = 2 s of audio
    long_video = torch.zeros(1, 3, 12, 16, 16)
    assert generated_shape(model, "v2a", long_video)[1] == model.cfg.clip.audio.num_tokens(2.0)


def test_untrained_link_samples_what_the_backbone_samples():
    """Zero gates: V2A sampling equals T2A sampling from the same noise, step for step."""
    model = tiny_link()
    audio, video = tiny_batch(model.cfg, b=1)
    linked = sample_link(model, "v2a", video, text_gen=text(1), steps=4, seed=7, cfg_scale=2.0)
    alone = sample_backbone(model.audio, tuple(audio.shape), text=text(1), steps=4, seed=7, cfg_scale=2.0)
    torch.testing.assert_close(linked, alone, atol=1e-5, rtol=1e-5)


def test_sampling_is_reproducible_by_seed_and_varies_with_it():
    model = tiny_link()
    _, video = tiny_batch(model.cfg, b=1)
    a = sample_link(model, "v2a", video, steps=3, seed=1)
    b = sample_link(model, "v2a", video, steps=3, seed=1)
    c = sample_link(model, "v2a", video, steps=3, seed=2)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    audio, _ = tiny_batch(model.cfg, b=1)
    assert sample_link(model, "a2v", audio, steps=2, method="heun").shape == video.shape
