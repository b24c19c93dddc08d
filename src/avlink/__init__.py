"""avlink: Video-to-Audio and Audio-to-Video generation with AV-Link Fusion Blocks."""

__version__ = "0.1.0"
