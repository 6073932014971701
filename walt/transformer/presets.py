"""Model sizes. S and B follow DiT; L and XL are W.A.L.T's (313M and 460M parameters with AdaLN-LoRA r=2)."""

presets: dict[str, dict[str, int]] = {
    "S": {"depth": 12, "hidden_size": 384, "num_heads": 6},
    "B": {"depth": 12, "hidden_size": 768, "num_heads": 12},
    "L": {"depth": 24, "hidden_size": 1024, "num_heads": 16},
    "XL": {"depth": 28, "hidden_size": 1152, "num_heads": 16},
}
