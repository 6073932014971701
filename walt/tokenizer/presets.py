"""Named CausalVAE configurations: `CausalVAE(**presets[name])`."""

presets: dict[str, dict] = {
    # About 0.27M parameters: unit tests and the CPU quickstart.
    "tiny": dict(
        latent_channels=4,
        channels=8,
        multipliers=(1, 1, 2, 2),
        num_res_blocks=1,
        temporal_downsample=(True, True, False),
        num_groups=4,
    ),
    # 25.7M parameters: the MovingDigits study's tokenizer (configs/moving_digits/tokenizer.yaml); trains in
    # minutes on one GPU.
    "small": dict(
        latent_channels=8,
        channels=48,
        multipliers=(1, 2, 2, 4),
        num_res_blocks=1,
        temporal_downsample=(True, True, False),
        num_groups=16,
    ),
    # W.A.L.T / MAGVIT-v2 widths: base 128 channels, multipliers (1, 2, 2, 4), 8 latent channels (226M).
    "walt": dict(
        latent_channels=8,
        channels=128,
        multipliers=(1, 2, 2, 4),
        num_res_blocks=2,
        temporal_downsample=(True, True, False),
        num_groups=32,
    ),
}
