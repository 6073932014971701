"""What a denoiser is conditioned on: the Conditioning dataclass, the text encoders, and the low-res input of
super-resolution."""

from walt.conditioning.lowres import (
    augment_lowres,
    downsample_video,
    highres_latent_shape,
    lowres_latent,
    upsample_latent,
    upsample_video,
)
from walt.conditioning.text import MiniLMTextEncoder, T5TextEncoder, TextEncoder, TransformersTextEncoder
from walt.conditioning.types import Conditioning

__all__ = [
    "Conditioning",
    "MiniLMTextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "TransformersTextEncoder",
    "augment_lowres",
    "downsample_video",
    "highres_latent_shape",
    "lowres_latent",
    "upsample_latent",
    "upsample_video",
]
