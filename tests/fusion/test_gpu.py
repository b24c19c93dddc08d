import pytest
import torch

from helpers import tiny_batch, tiny_link

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("task", ["v2a", "a2v"])
def test_link_trains_under_bf16_autocast_on_gpu(task):
    model = tiny_link().cuda()
    audio, video = (x.cuda() for x in tiny_batch(model.cfg))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(task, audio, video)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is None for p in model.audio.parameters())
