"""The ``walt`` command: Lightning's fit/validate/test/predict plus walt's own subcommands.

Training runs through :class:`WaltCLI` (a LightningCLI): model and data are given in YAML by ``class_path`` and
``init_args``, so any LightningModule and LightningDataModule can be configured, and a bad config fails while
parsing, before anything is built or trained.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.warnings import PossibleUserWarning

import walt

__all__ = ["WaltCLI", "main"]

# `predict` is left out: generation goes through `walt sample` (the pipeline), not a predict loop.
LIGHTNING_COMMANDS = ("fit", "validate", "test")


class WaltCLI(LightningCLI):
    """LightningCLI with any LightningModule / LightningDataModule chosen by ``class_path`` in the config."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        from walt.lightning.checkpoint import PeriodicCheckpoint

        # Every run gets one: a `checkpoint:` section in a config tunes it, none can leave it out by omission.
        parser.add_lightning_class_args(PeriodicCheckpoint, "checkpoint")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> L.Trainer:
        # LightningCLI's own (private) hook, where the config's callbacks and the `checkpoint:` one meet the
        # trainer's settings: the public instantiate_trainer would have to copy its body.
        from walt.lightning.checkpoint import PeriodicCheckpoint, install_atomic_io

        if config.get("enable_checkpointing") is False:  # Lightning refuses a checkpoint callback then
            callbacks = [c for c in callbacks if not isinstance(c, PeriodicCheckpoint)]
        trainer = super()._instantiate_trainer(config, callbacks)
        _checked_fsdp(trainer)
        install_atomic_io(trainer)
        return trainer

    def parse_arguments(self, parser: LightningArgumentParser, args: object) -> None:
        super().parse_arguments(parser, args)
        # Lightning reads --ckpt_path right after parsing (for its hyperparameters), with a bare torch.load whose
        # failures are raw tracebacks: an EOFError for an empty file, an UnpicklingError for a malicious pickle,
        # an IndexError or KeyError for some garbage. walt's reader goes first, so the run stops here, before
        # anything is built, with one line naming the file and what is wrong with it (main() prints it): not a
        # checkpoint, refused unread, or weights that changed since they were written (their hash). The resume
        # reads the file again (AtomicCheckpointIO, the strategy's checkpoint reader), with the same checks.
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if ckpt_path and Path(ckpt_path).is_file():
            from walt.checkpoint import read_checkpoint

            read_checkpoint(ckpt_path)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps a constructor's ValueError (an out-of-range setting: "label_dropout must be a
            # probability in [0, 1], got 3.0") in an error that prints the whole parsed config; the innermost
            # one says what to fix.
            command = f"walt {self.subcommand}" if self.subcommand else "walt"
            raise SystemExit(f"{command}: {_innermost_value_error(err)}") from None

    def before_fit(self) -> None:
        from walt.lightning.checkpoint import continue_log_versions

        _stable_checkpoint_folder(self.trainer)
        _one_writer_of_last(self.trainer)
        continue_log_versions(self.trainer, self.config.get(f"{self.subcommand}.ckpt_path"))
        if type(self.model).__module__.startswith("walt."):
            # walt's modules keep their frozen parts in eval mode on purpose (the tokenizer, the EMA copy, a
            # distillation teacher, a perceptual network), which Lightning reports at every fit as "Found 267
            # module(s) in eval mode"; the warning stays on for other modules.
            warnings.filterwarnings(
                "ignore", message=r"Found \d+ module\(s\) in eval mode", category=PossibleUserWarning
            )

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


def _innermost_value_error(err: ValueError) -> ValueError:
    """The first ValueError in ``err``'s chain of causes, counting from the innermost."""
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    return next(e for e in reversed(chain) if isinstance(e, ValueError))


def _checked_fsdp(trainer: L.Trainer) -> None:
    """Lightning's FSDPStrategy (``class_path: lightning.pytorch.strategies.FSDPStrategy``, ``strategy: fsdp``)
    reads and writes checkpoints itself, past walt's checks: made walt's subclass, which only changes how
    checkpoints are read and written (:class:`walt.lightning.strategies.WaltFSDPStrategy`), its settings kept.
    The strategy exists only as the Trainer's, built moments ago: nothing holds the old class."""
    from lightning.pytorch.strategies import FSDPStrategy

    from walt.lightning.strategies import WaltFSDPStrategy

    if type(trainer.strategy) is FSDPStrategy:
        trainer.strategy.__class__ = WaltFSDPStrategy


def _stable_checkpoint_folder(trainer: L.Trainer) -> None:
    """Checkpoints go to ``<default_root_dir>/checkpoints`` rather than a new ``lightning_logs/version_N`` per run,
    so a resumed run keeps updating the same ``last.ckpt`` that cascades, exports and scripts point at."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")


def _one_writer_of_last(trainer: L.Trainer) -> None:
    """Two callbacks saving ``last.ckpt`` in one folder would make Lightning write ``last-v1.ckpt`` beside it,
    and resuming from ``last.ckpt`` would silently go back to the older of the two."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from walt.lightning.checkpoint import PeriodicCheckpoint

    periodic_folders = {c.dirpath for c in trainer.checkpoint_callbacks if isinstance(c, PeriodicCheckpoint)}
    for callback in trainer.checkpoint_callbacks:
        another = isinstance(callback, ModelCheckpoint) and not isinstance(callback, PeriodicCheckpoint)
        if another and callback.save_last and callback.dirpath in periodic_folders:
            raise ValueError(
                f"trainer.callbacks has a ModelCheckpoint with save_last in {callback.dirpath}, where walt fit "
                "already keeps last.ckpt (walt.lightning.PeriodicCheckpoint): remove save_last from that "
                "callback (or the callback), and set the `checkpoint:` section instead, e.g. "
                "checkpoint: {every_n_train_steps: 5000, save_top_k: -1}"
            )


def _sample(argv: Sequence[str]) -> int:
    from walt.sample import sample_main  # imported on use: keeps `walt --help` fast

    return sample_main(list(argv))


def _evaluate(argv: Sequence[str]) -> int:
    from walt.metrics import evaluate_main  # imported on use: keeps `walt --help` fast

    return evaluate_main(list(argv))


def _export(argv: Sequence[str]) -> int:
    from walt.pipeline.export import export_main  # imported on use: keeps `walt --help` fast

    return export_main(list(argv))


def _encode(argv: Sequence[str]) -> int:
    from walt.tokenizer.encode import encode_main  # imported on use: keeps `walt --help` fast

    return encode_main(list(argv))


def _serve(argv: Sequence[str]) -> int:
    from walt.serve import serve_main  # imported on use: Gradio only loads for `walt serve`

    return serve_main(list(argv))


# Subcommands outside Lightning's trainer entry points: name -> (one-line help, implementation(argv) -> exit code).
EXTRA_COMMANDS: dict[str, tuple[str, Callable[[Sequence[str]], int]]] = {
    "sample": ("generate videos from a trained checkpoint", _sample),
    "evaluate": ("compute FVD/FID under a named protocol", _evaluate),
    "encode": ("encode a dataset to latent shards with a trained tokenizer", _encode),
    "export": (
        "write a trained model (or a cascade) as a shareable folder: safetensors, JSON, model card",
        _export,
    ),
    "serve": ("a web page to generate videos from a trained model (Gradio; the serve extra)", _serve),
}

USAGE = """\
usage: walt <command> [options]

training (Lightning CLI; `walt <command> --help` lists every option):
  fit        train a model:           walt fit --config configs/<stage>/<name>.yaml
  validate   the validation loss:     walt validate --config <config> --ckpt_path <ckpt>
  test       the loss on the test split (data.init_args.test): walt test --config <config> --ckpt_path <ckpt>

walt commands:
{extra}
"""


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``walt`` console script and ``python -m walt``."""
    from_shell = argv is None
    argv = list(sys.argv[1:] if from_shell else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"walt {walt.__version__}")
        sys.exit(0)
    if not argv or argv[0] in ("-h", "--help"):
        extra = "\n".join(f"  {name:<10} {help_}" for name, (help_, _) in EXTRA_COMMANDS.items())
        print(USAGE.format(extra=extra))
        sys.exit(0 if argv else 2)
    if argv[0] in EXTRA_COMMANDS:
        sys.exit(EXTRA_COMMANDS[argv[0]][1](argv[1:]))
    if argv[0] == "predict":
        print(
            "walt: generation runs through `walt sample` (or walt.pipeline.Pipeline), not a predict loop",
            file=sys.stderr,
        )
        sys.exit(2)
    if argv[0] not in LIGHTNING_COMMANDS:
        known = ", ".join((*LIGHTNING_COMMANDS, *EXTRA_COMMANDS))
        print(f"walt: unknown command {argv[0]!r}; choose one of: {known}", file=sys.stderr)
        sys.exit(2)
    from walt.checkpoint import CheckpointError

    try:
        WaltCLI(args=None if from_shell else argv)
    except CheckpointError as err:  # a --ckpt_path walt refuses: its name and the problem, no traceback
        print(f"walt {argv[0]}: {err}", file=sys.stderr)
        sys.exit(1)
    except FloatingPointError as err:
        # A diverged run (walt.lightning.WaltModule: a non-finite loss, or weights it refuses to save): the message
        # says what happened and what was kept; a traceback through Lightning's loops would only bury it.
        print(f"walt {argv[0]}: {err}", file=sys.stderr)
        sys.exit(1)
