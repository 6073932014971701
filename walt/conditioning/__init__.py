"""walt.conditioning: the Conditioning dataclass and the text encoders."""

from walt.conditioning.text import MiniLMTextEncoder, T5TextEncoder, TextEncoder, TransformersTextEncoder
from walt.conditioning.types import Conditioning

__all__ = ["Conditioning", "MiniLMTextEncoder", "T5TextEncoder", "TextEncoder", "TransformersTextEncoder"]
