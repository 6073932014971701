"""walt.conditioning"""

from walt.conditioning.types import Conditioning

__all__ = ["Conditioning"]
