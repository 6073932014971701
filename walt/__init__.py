"""walt: latent video diffusion with window-attention transformers (W.A.L.T) in PyTorch + Lightning."""

__version__ = "0.1.0"
