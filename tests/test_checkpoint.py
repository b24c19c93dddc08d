import pytest
import torch

from avlink.checkpoint import atomic_write, load_link, save_link

from helpers import tiny_batch, tiny_link


def test_link_round_trip(tmp_path):
    model = tiny_link()
    with torch.no_grad():
        for p in model.fusion.parameters():
            p.add_(0.01)
    save_link(tmp_path, model)
    loaded = load_link(tmp_path)
    assert loaded.cfg == model.cfg
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    audio, video = tiny_batch(model.cfg)
    cond, cond2 = model.prepare("v2a", video, noise=video * 0), loaded.prepare("v2a", video, noise=video * 0)
    t = torch.rand(2)
    with torch.no_grad():
        assert torch.equal(model(audio, t, cond), loaded(audio, t, cond2))
    assert not any(p.requires_grad for p in loaded.audio.parameters())


def test_missing_part_is_refused_unless_not_strict(tmp_path):
    save_link(tmp_path, tiny_link())
    (tmp_path / "fusion.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="fusion.safetensors"):
        load_link(tmp_path)
    assert load_link(tmp_path, strict=False) is not None


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "x.bin"

    def broken(tmp):
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_gives_normal_permissions(tmp_path):
    import os

    target = tmp_path / "y.txt"
    atomic_write(target, lambda tmp: tmp.write_text("ok"))
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
