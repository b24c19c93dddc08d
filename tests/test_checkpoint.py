import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from avlink.checkpoint import save_link
from avlink.cli import main
from avlink.data.media import write_video
from avlink.system import load_link
from avlink.weights import WeightsError

from helpers import random_checkpoint, tiny_batch, tiny_link


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
    with pytest.raises(WeightsError, match="fusion.safetensors: weight file not found"):
        load_link(tmp_path)
    assert load_link(tmp_path, strict=False) is not None




def _read(path):
    return {k: v.clone() for k, v in load_file(str(path)).items()}  # not the mapped file that is written over


def _edit(path, change):
    state = _read(path)
    change(state)
    save_file(state, str(path))


def _first_matrix(state):
    return next(k for k, v in state.items() if v.ndim == 2 and v.shape[0] != v.shape[1])


def _pickle_renamed(folder):
    torch.save(_read(folder / "fusion.safetensors"), folder / "fusion.safetensors")


def _truncated(folder):
    data = (folder / "vae.safetensors").read_bytes()
    (folder / "vae.safetensors").write_bytes(data[: len(data) // 2])


def _transposed(folder):
    _edit(folder / "audio_dit.safetensors", lambda s: s.update({(k := _first_matrix(s)): s[k].T.contiguous()}))


def _missing_key(folder):
    _edit(folder / "video_dit.safetensors", lambda s: s.pop(next(iter(s))))


def _extra_key(folder):
    _edit(folder / "fusion.safetensors", lambda s: s.update({"v2a.stray.weight": torch.zeros(2)}))


def _nan(folder):
    _edit(folder / "fusion.safetensors", lambda s: next(v for v in s.values() if v.is_floating_point()).fill_(
        float("nan")))


def _integers(folder):
    _edit(folder / "audio_dit.safetensors", lambda s: s.update({(k := _first_matrix(s)): s[k].long()}))


def _config_not_json(folder):
    (folder / "config.json").write_text("{not json")


def _config_wrong_shape(folder):
    (folder / "config.json").write_text(json.dumps({"name": "tiny", "clip": 3}))


def _another_size(folder):
    cfg = json.loads((folder / "config.json").read_text())
    cfg["audio"]["dim"] *= 2
    (folder / "config.json").write_text(json.dumps(cfg))


DAMAGE = {  # how the folder is damaged -> (the file the refusal must name, words it must say)
    "pickle renamed .safetensors": (_pickle_renamed, "fusion.safetensors", "not a readable safetensors file"),
    "truncated": (_truncated, "vae.safetensors", "not a readable safetensors file"),
    "transposed tensor": (_transposed, "audio_dit.safetensors", "has shape"),
    "missing key": (_missing_key, "video_dit.safetensors", "1 missing"),
    "unexpected key": (_extra_key, "fusion.safetensors", "1 unexpected (v2a.stray.weight)"),
    "NaN weights": (_nan, "fusion.safetensors", "NaN or infinite"),
    "integer weights": (_integers, "audio_dit.safetensors", "not floating point"),
    "config not JSON": (_config_not_json, "config.json", "not a readable JSON file"),
    "config of another shape": (_config_wrong_shape, "config.json", "not an avlink model config"),
    "config of another size": (_another_size, "audio_dit.safetensors", "another model size"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_folder_is_one_line_naming_the_file(tmp_path, capsys, damage):
    make, name, words = DAMAGE[damage]
    folder = random_checkpoint(tmp_path / "ckpt")
    make(folder)
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.zeros((6, 16, 16, 3), np.uint8), 6.0)
    assert main(["v2a", str(clip), "--ckpt", str(folder), "--vocoder", "griffinlim", "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    assert f"{folder / name}:" in err and words in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "clip.mp4"]


def test_a_one_direction_export_loads_for_that_direction_and_refuses_the_other(tmp_path, capsys):
    folder = random_checkpoint(tmp_path / "ckpt")
    _edit(folder / "fusion.safetensors", lambda s: [s.pop(k) for k in [k for k in s if not k.startswith("v2a.")]])
    model = load_link(folder)
    assert model.has_task("v2a") and not model.has_task("a2v")
    clip = tmp_path / "clip.mp4"
    write_video(clip, np.zeros((6, 16, 16, 3), np.uint8), 6.0)
    assert main(["v2a", str(clip), "--ckpt", str(folder), "--vocoder", "griffinlim", "--steps", "1"]) == 0
    sound = tmp_path / "beat.wav"
    from avlink.data.media import write_audio

    write_audio(sound, np.zeros(16000, np.float32), 16000)
    assert main(["a2v", str(sound), "--ckpt", str(folder), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "holds v2a Fusion Blocks only, none for a2v" in err and str(folder) in err
    assert not (tmp_path / "beat.a2v.mp4").exists()
