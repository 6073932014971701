"""What a denoiser is conditioned on: the Conditioning dataclass, the Conditioner that builds it for a training
batch, the text encoders, the given frames of frame prediction and the low-res input of super-resolution."""

from walt.conditioning.conditioner import Conditioner, LowresConditioning, pixel_video
from walt.conditioning.frames import context_mask, draw_known_frames, frames_to_generate
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
    "Conditioner",
    "Conditioning",
    "LowresConditioning",
    "MiniLMTextEncoder",
    "T5TextEncoder",
    "TextEncoder",
    "TransformersTextEncoder",
    "augment_lowres",
    "context_mask",
    "downsample_video",
    "draw_known_frames",
    "frames_to_generate",
    "highres_latent_shape",
    "lowres_latent",
    "pixel_video",
    "upsample_latent",
    "upsample_video",
]
