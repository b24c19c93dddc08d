"""LTX-Video's causal video VAE (diffusers `AutoencoderKLLTXVideo`) as the video codec of a linked LTX generator:
frames in [-1, 1] -> the normalised latents the LTX transformer was trained on, and back.

The VAE encodes the first frame alone and each following 8 frames into one latent frame (a clip holds 1 + 8k
frames), 32x smaller in space, 128 channels. LTXPipeline normalises the latents per channel with the VAE's
latents_mean and latents_std buffers (stored with its weights, not in its config) and its config's scaling_factor,
(z - mean) * scaling_factor / std, and so does this codec. Encoding takes the posterior's mean (deterministic).

Decoding. A VAE with timestep_conditioning (0.9.1 and later) denoises while it decodes: LTXPipeline passes it a
decode timestep (default 0.0) after mixing the latents with noise by decode_noise_scale (default: the decode
timestep, so none); this codec passes timestep 0 and mixes in nothing, the pipeline's default. A VAE without it
(0.9.0) takes no timestep. (0.9.1's decoder also injects unseeded noise inside its blocks, as it does in the
pipeline: its decode is not bit-reproducible either way.)
"""

from __future__ import annotations

from torch import Tensor

from avlink.codecs.causal_vae import CausalVideoCodec
from avlink.seq import VideoGeometry

DOWNLOAD = "Lightricks/LTX-Video (huggingface.co)"


class LTXVideoCodec(CausalVideoCodec):
    name, vae_class, download = "LTX", "AutoencoderKLLTXVideo", DOWNLOAD

    def __init__(self, geometry: VideoGeometry, vae) -> None:
        super().__init__(geometry, vae, (vae.temporal_compression_ratio, vae.spatial_compression_ratio),
                         vae.config.latent_channels, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)

    def decode_latents(self, latents: Tensor) -> Tensor:
        timestep = None
        if self.vae.config.timestep_conditioning:  # LTXPipeline's default decode_timestep 0.0, no noise mixed in
            timestep = latents.new_zeros(latents.shape[0])
        return self.vae.decode(latents, timestep).sample
