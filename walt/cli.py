"""The ``walt`` command: Lightning's fit/validate/test/predict plus walt's own subcommands.

Training runs through :class:`WaltCLI` (a LightningCLI): model and data are given in YAML by ``class_path`` and
``init_args``, so any LightningModule and LightningDataModule can be configured, and a bad config fails while
parsing, before anything is built or trained.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

import lightning as L
from lightning.pytorch.cli import LightningCLI

__all__ = ["WaltCLI", "main"]

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


class WaltCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path`` in the config."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {"parser_mode": "omegaconf"})
        super().__init__(
            model_class=L.LightningModule,
            datamodule_class=L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            **kwargs,
        )


def _sample(argv: Sequence[str]) -> int:
    from walt.lightning.sample import sample_main  # imported on use: keeps `walt --help` fast

    return sample_main(list(argv))


def _evaluate(argv: Sequence[str]) -> int:
    from walt.metrics import evaluate_main  # imported on use: keeps `walt --help` fast

    return evaluate_main(list(argv))


def _encode(argv: Sequence[str]) -> int:
    from walt.tokenizer.encode import encode_main  # imported on use: keeps `walt --help` fast

    return encode_main(list(argv))


# Subcommands outside Lightning's trainer entry points: name -> (one-line help, implementation(argv) -> exit code).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "sample": ("generate videos from a trained checkpoint", _sample),
    "evaluate": ("compute FVD/FID under a named protocol", _evaluate),
    "encode": ("encode a dataset to latent shards with a trained tokenizer", _encode),
}

USAGE = """\
usage: walt <command> [options]

training (Lightning CLI; `walt <command> --help` lists every option):
  fit        train a model:           walt fit --config configs/<stage>/<name>.yaml
  validate   run the validation loop
  test       run the test loop
  predict    run prediction

walt commands:
{extra}
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``walt`` console script and ``python -m walt``."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if from_shell else argv)
    if not argv or argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<10} {help_}" for name, (help_, _) in EXTRA_COMMANDS.items())
        print(USAGE.format(extra=extra))
        sys.exit(0 if argv else 2)
    if argv[0] in EXTRA_COMMANDS:
        sys.exit(EXTRA_COMMANDS[argv[0]][1](argv[1:]))
    if argv[0] not in LIGHTNING_COMMANDS:
        known = ", ".join((*LIGHTNING_COMMANDS, *EXTRA_COMMANDS))
        print(f"walt: unknown command {argv[0]!r}; choose one of: {known}", file=sys.stderr)
        sys.exit(2)
    WaltCLI(args=None if from_shell else argv)
