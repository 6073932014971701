"""Fault injection (issue 23): kill -9, damaged files and bad inputs thrown at the real `walt` commands.

Every case runs the commands a user runs (``python -m walt fit/sample/encode/evaluate``) as subprocesses, on the
CPU, with tiny models (a 2-layer backbone on 5x4x4 latents, the "tiny" tokenizer on 5x16x16 clips), in a fresh
work folder, and checks what they leave behind:

  kill     `walt fit` killed with SIGKILL (os.kill, no handler runs) at a random step, mid-epoch, at a random
           moment, during a checkpoint write with $TMPDIR on another filesystem; the tokenizer too. The resumed
           run (`--ckpt_path .../last.ckpt`) must lose at most the checkpoint interval and then match the run
           that was never killed bit for bit: every step's loss and batch, the final weights, EMA and optimizer.
  corrupt  4 bytes flipped inside a weight or an optimizer moment of last.ckpt, or inside a weight of walt
           encode's vae.safetensors; an empty file, random bytes, a truncated file and a malicious pickle given to
           `walt sample`, `walt encode` and `walt fit --ckpt_path`: each must exit non-zero with one line naming
           the file, write nothing, and run no pickled code. Two sweeps flip 4 bytes at hundreds of random
           offsets of a last.ckpt and a vae.safetensors and read each copy in this process, through the readers
           every command uses (walt.checkpoint): refused by name, or read back identical, never different.
  input    out-of-range options and config values, an unknown class, --context for a model without context
           frames, a missing checkpoint, a tokenizer at lr 1e10: a short message and a non-zero exit, no
           traceback, before the expensive work (nothing written).
  output   `walt sample` into a folder of older samples, `walt encode` killed midway then read as LatentShards,
           `walt evaluate` over hidden temporary files and over a 0-byte cached statistics file.

It prints one markdown row per case (case | what was done | expected | observed | verdict) and a summary; the
exit code is 1 if any case fails.

  python tools/fault_injection.py                           # 42 cases: ~9 minutes on 2 CPU cores
  python tools/fault_injection.py --quick                   # 2 cases, ~1 minute (tests/test_fault_injection.py)
  python tools/fault_injection.py --cases kill,corrupt-empty-sample --seed 3 --out faults.json
  python tools/fault_injection.py --list                    # the cases and their groups

``--seed`` draws the kill points and the damaged bytes (each case from its own stream, so a subset draws what
the whole campaign does); ``--jobs`` runs that many cases at once (default 2); ``--work-dir`` says where the work
folder goes (default: the system's temporary folder), ``--keep`` keeps it. Most of the time is the ~55 `walt`
processes' start-up (~12 s of imports each on one core); the trainings themselves take seconds.
The subprocesses run on one thread each (OMP_NUM_THREADS=1), so a resumed run adds up its sums in the same order
as the uninterrupted one, and the comparison can ask for equality.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from walt.atomic import write_atomic  # noqa: E402
from walt.checkpoint import CheckpointError, read_checkpoint, read_weights, write_weights  # noqa: E402
from walt.tokenizer import CausalVAE, presets  # noqa: E402

# The base model's run: 8 latents in batches of 2 (4 batches per epoch), 14 steps, last.ckpt every 3 steps, so
# every checkpoint but step 12's falls mid-epoch. The tokenizer's: 12 clips in batches of 2 (6 per epoch), the
# discriminator from batch 4 on (two optimizer steps per batch after it), 16 steps, a checkpoint every 4.
BASE_STEPS, BASE_EVERY, BASE_BATCHES_PER_EPOCH = 14, 3, 4
TOKENIZER_STEPS, TOKENIZER_EVERY = 16, 4
# The kill tests' callbacks (a step recorder, a pause to be killed in, checkpoint ballast, a dataset that pauses),
# loaded by class_path in `walt fit` / `walt encode`.
KILL_POINTS = "tests._kill_points"
SUBPROCESS_TIMEOUT = 600.0


# ---- rows -----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One case's line of the table, and the figures the summary adds up."""

    case: str
    group: str
    done: str = ""
    expected: str = ""
    observed: str = ""
    passed: bool = False
    # A damaged input accepted, output written after a refusal, or a resumed run that went elsewhere, unsaid.
    silent_garbage: bool = False
    steps_lost: int | None = None
    interval: int | None = None
    bit_identical: bool | None = None
    seconds: float = 0.0


@dataclass
class Case:
    name: str
    group: str
    run: Callable[[Work, Row], None]
    quick: bool = False
    needs: tuple[str, ...] = ()  # the trained runs it starts from (PREPARE), built before the cases start


CASES: list[Case] = []


def case(name: str, group: str, quick: bool = False, needs: tuple[str, ...] = ()) -> Callable:
    def register(run: Callable[[Work, Row], None]) -> Callable[[Work, Row], None]:
        CASES.append(Case(name, group, run, quick, needs))
        return run

    return register


# ---- the work folder, its shared inputs, and the commands -----------------------------------------------------


@dataclass
class Done:
    """A finished command: exit code, output, and how long it ran."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    def last_line(self) -> str:
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ""


class Work:
    """The campaign's work folder: per-case folders, the inputs several cases share (built once, by whichever
    case asks first), the environment of every command, and the processes still running (killed on exit)."""

    def __init__(self, root: Path, seed: int, tmpdir: Path) -> None:
        self.root, self.seed, self.tmpdir = root, seed, tmpdir
        self._locks: dict[str, threading.Lock] = {}
        self._built: dict[str, Any] = {}
        self._guard = threading.Lock()
        self.running: set[subprocess.Popen] = set()
        self.stopping = False  # set on an interruption: no command starts after it
        self.quick = False  # --quick: fewer flips in the sweeps

    def rng(self, name: str) -> random.Random:
        """The case's own random stream: the same kill points and bytes whatever else runs, in whatever order."""
        return random.Random(f"{self.seed}:{name}")

    def folder(self, name: str) -> Path:
        path = self.root / name.replace("/", "_")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def once(self, name: str, build: Callable[[], Any]) -> Any:
        """``build()``'s result, computed by the first caller; the others wait for it. A failure is kept too: the
        cases that need a run that failed fail with its reason, rather than each running it again."""
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:
            if name not in self._built:
                try:
                    self._built[name] = build()
                except Exception as err:
                    self._built[name] = err
            if isinstance(self._built[name], Exception):
                raise RuntimeError(f"{name}: {self._built[name]}")
            return self._built[name]

    def show(self, text: str) -> str:
        """``text`` without this machine's paths (they go into RESULTS.md)."""
        return (
            text.replace(str(self.tmpdir), "$TMPDIR")
            .replace(str(self.root) + "/", "")
            .replace(str(ROOT) + "/", "")
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            **extra,
        }
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        return env

    def start(self, args: list[str], cwd: Path, log: Path, **env: str) -> subprocess.Popen:
        """``python -m walt <args>``, its output to ``log`` (a pipe could fill up and stall a killed run)."""
        with log.open("wb") as out:
            return self._popen(args, cwd, env, stdout=out, stderr=out)

    def _popen(self, args: list[str], cwd: Path, env: dict[str, str], **streams: Any) -> subprocess.Popen:
        with self._guard:  # stop_all() takes the same lock: a command starts before it, or not at all
            if self.stopping:
                raise RuntimeError("the campaign was interrupted")
            process = subprocess.Popen(
                [sys.executable, "-m", "walt", *args], cwd=cwd, env=self.env(**env), **streams
            )
            self.running.add(process)
        return process

    def walt(self, args: list[str], cwd: Path, **env: str) -> Done:
        """``python -m walt <args>`` to the end."""
        start = time.monotonic()
        process = self._popen(args, cwd, env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT)
        finally:
            self.stop(process)
        return Done(process.returncode, out, err, time.monotonic() - start)

    def kill_when(self, process: subprocess.Popen, ready: Callable[[], bool], log: Path) -> float:
        """SIGKILL ``process`` as soon as ``ready()`` holds, as the OOM killer or a preempted node does: no handler,
        no cleanup. Returns when it was killed (time.monotonic())."""
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not ready():
            if process.poll() is not None:
                raise RuntimeError(f"the run ended before its kill point:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the kill point never came")
            time.sleep(0.002)
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        process.wait()
        self.running.discard(process)
        if process.returncode != -signal.SIGKILL:
            raise RuntimeError(f"the run exited with {process.returncode} before the kill")
        return killed

    def stop(self, process: subprocess.Popen) -> None:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        self.running.discard(process)

    def stop_all(self) -> None:
        """Kills every command still running, and lets no other start (the end of the campaign, or its
        interruption: the cases waiting on these commands then end too)."""
        with self._guard:
            self.stopping = True
            running = list(self.running)
        for process in running:
            self.stop(process)


# ---- configs --------------------------------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """Tuples to lists (YAML's safe dumper writes no tuples)."""
    return json.loads(json.dumps(value))


def callback(name: str, **init_args: Any) -> dict:
    return {"class_path": f"{KILL_POINTS}.{name}", "init_args": init_args}


def quiet_trainer(config: dict, folder: Path, max_steps: int) -> None:
    """CPU, no logger, validation or progress bar: a run that only trains and checkpoints."""
    config["trainer"].pop("max_epochs", None)
    config["trainer"].update(
        accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, limit_val_batches=0,
        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(folder / "run"),
    )  # fmt: skip


def base_config(
    folder: Path,
    latents: Path,
    name: str,
    callbacks: Sequence[dict] = (),
    every: int = BASE_EVERY,
    max_steps: int = BASE_STEPS,
    edit: Callable[[dict], None] | None = None,
) -> Path:
    """configs/base/quickstart.yaml at CPU size (2 layers, width 32, the tiny tokenizer) on ``latents``, a
    checkpoint every ``every`` steps (by steps only, so kill points do not depend on the machine's speed), each
    step recorded to ``<folder>/<name>.jsonl``; ``edit`` changes the config last. Written as ``<name>.yaml``."""
    config = yaml.safe_load((ROOT / "configs/base/quickstart.yaml").read_text())
    config["checkpoint"] = {"every_n_train_steps": every, "train_time_interval": None}
    model = config["model"]["init_args"]
    model["backbone"]["init_args"].update(
        in_channels=4, depth=2, hidden_size=32, num_heads=2, input_size=[5, 4, 4]
    )
    model["tokenizer"]["init_args"] = plain({**presets["tiny"], "variational": False})
    model.update(
        tokenizer_weights=str(latents / "vae.safetensors"), compile=False, sample_steps=2, num_log_samples=0,
        warmup_steps=2,
    )  # fmt: skip
    data = config["data"]["init_args"]
    for split in ("train", "val"):
        data[split]["init_args"]["root"] = str(latents)
    data.update(batch_size=2, num_workers=0)
    quiet_trainer(config, folder, max_steps)
    config["trainer"]["check_val_every_n_epoch"] = None
    config["trainer"]["callbacks"] = [callback("RecordSteps", path=str(folder / f"{name}.jsonl")), *callbacks]
    if edit is not None:
        edit(config)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def tokenizer_config(
    folder: Path,
    name: str,
    callbacks: Sequence[dict] = (),
    every: int = TOKENIZER_EVERY,
    max_steps: int = TOKENIZER_STEPS,
    lr: float | None = None,
    train: dict | None = None,
) -> Path:
    """configs/tokenizer/quickstart.yaml at CPU size: the tiny preset on 12 clips of 5x16x16, variational (as the
    UCF-101 / Kinetics configs are: posterior samples draw from the random stream), the discriminator from batch 4
    on; ``train`` replaces the training dataset."""
    config = yaml.safe_load((ROOT / "configs/tokenizer/quickstart.yaml").read_text())
    config["checkpoint"] = {"every_n_train_steps": every, "train_time_interval": None}
    model = config["model"]["init_args"]
    model["vae"]["init_args"] = plain({**presets["tiny"], "variational": True})
    model["loss"]["init_args"]["gan_start_step"] = 4
    model["num_log_videos"] = 0
    if lr is not None:
        model["optimizer"]["init_args"]["lr"] = lr
    data = config["data"]["init_args"]
    data["train"]["init_args"].update(num_samples=12, num_frames=5, resolution=16)
    data["val"]["init_args"].update(num_samples=2, num_frames=5, resolution=16)
    if train is not None:
        data["train"] = train
    data.update(batch_size=2, num_workers=0)
    quiet_trainer(config, folder, max_steps)
    config["trainer"]["callbacks"] = [callback("RecordSteps", path=str(folder / f"{name}.jsonl")), *callbacks]
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# ---- shared inputs --------------------------------------------------------------------------------------------


def latents(work: Work) -> Path:
    """A `walt encode`-style folder (tiny tokenizer weights, 8 latents of 17x32x32 circles, index.json), written
    here rather than encoded: every base run reads this one folder."""

    def build() -> Path:
        from walt.data import (
            SyntheticVideos,
        )  # walt.data imports Lightning (~10 s): only the cases that need it

        folder = work.folder("latents")
        torch.manual_seed(work.seed)
        vae = CausalVAE(**presets["tiny"], variational=False)
        write_weights(vae.state_dict(), folder / "vae.safetensors", {"role": "tokenizer"})
        videos = SyntheticVideos(
            num_samples=8,
            num_frames=17,
            resolution=32,
            shapes=["circle"],
            motions=["left", "right"],
            seed=work.seed,
        )  # the 8 classes of the quickstart config (4 colours x 2 motions)
        with torch.no_grad():
            encoded = vae.encode(torch.stack([videos[i]["video"] for i in range(8)]))  # (8, 4, 5, 4, 4)
        labels = torch.tensor([videos[i]["label"] for i in range(8)])
        save_file(
            {"latents": encoded.contiguous(), "labels": labels}, str(folder / "shard-00000.safetensors")
        )
        index = {"shards": [{"file": "shard-00000.safetensors", "num_samples": 8}], "classes": videos.classes}
        (folder / "index.json").write_text(json.dumps(index))
        return folder

    return work.once("latents", build)


def read_rows(path: Path) -> list[dict]:
    """The steps a run recorded (tests/_kill_points.py RecordSteps); a last line cut short by the kill is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def finished_run(work: Work, folder: Path, config: Path, log_name: str) -> dict:
    """Runs `walt fit --config <config>` to the end in ``folder``: its recorded steps, last.ckpt, and how long
    it trained (from its first recorded step to its last), which the random-moment kill draws from."""
    steps, log = folder / f"{log_name}.jsonl", folder / f"{log_name}.log"
    process = work.start(["fit", "--config", str(config)], folder, log)
    first = None
    while process.poll() is None:
        if first is None and steps.exists():
            first = time.time()
        time.sleep(0.005)
    work.stop(process)
    if process.returncode != 0:
        raise RuntimeError(f"walt fit failed:\n{log.read_text()[-3000:]}")
    training = steps.stat().st_mtime - first if first is not None else 0.0
    last = folder / "run/checkpoints/last.ckpt"
    return {"folder": folder, "config": config, "rows": read_rows(steps), "last": last, "training": training}


def base_reference(work: Work) -> dict:
    """The base run that is never killed: what every killed and resumed base run must match."""

    def build() -> dict:
        folder = work.folder("reference-base")
        return finished_run(work, folder, base_config(folder, latents(work), "steps"), "steps")

    return work.once("base", build)


def tokenizer_reference(work: Work) -> dict:
    def build() -> dict:
        folder = work.folder("reference-tokenizer")
        return finished_run(work, folder, tokenizer_config(folder, "steps"), "steps")

    return work.once("tokenizer", build)


def encoded(work: Work) -> Path:
    """`walt encode` of the reference tokenizer: a folder with vae.safetensors (weights + latent statistics)."""

    def build() -> Path:
        reference = tokenizer_reference(work)
        out = work.root / "encoded"
        args = ["encode", "--config", str(reference["config"]), "--checkpoint", str(reference["last"]),
                "--output", str(out), "--num-workers", "0", "--stats-samples", "4", "--batch-size", "2",
                "--shard-size", "4", "--device", "cpu"]  # fmt: skip
        done = work.walt(args, cwd=work.root)
        if done.returncode != 0:
            raise RuntimeError(f"walt encode failed:\n{done.stderr[-3000:]}")
        return out

    return work.once("encoded", build)


# ---- comparisons ------------------------------------------------------------------------------------------------


def same(a: Any, b: Any) -> bool:
    """Equal to the bit: tensors by dtype, shape and bytes (NaN equals NaN), containers entry by entry."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and bytes(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
            == bytes(b.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
        )
    return type(a) is type(b) and a == b


def training_state(path: Path) -> dict:
    """What a resumed run must end with: weights (EMA included), optimizer state, step."""
    checkpoint = read_checkpoint(path)
    return {k: checkpoint[k] for k in ("state_dict", "optimizer_states", "global_step")}


def step_span(rows: list[dict]) -> str:
    return f"steps {rows[0]['step']}-{rows[-1]['step']}" if rows else "no steps"


def resume_and_compare(
    work: Work,
    row: Row,
    reference: dict,
    folder: Path,
    config: Callable[[str], Path],
    trained: int,
    interval: int,
) -> None:
    """After a kill: what last.ckpt holds, the steps lost, then `walt fit --ckpt_path last.ckpt` (a fresh start when
    the kill came before the first checkpoint) and the comparison with ``reference``, filling ``row``."""
    last = folder / "run/checkpoints/last.ckpt"
    saved = read_checkpoint(last)["global_step"] if last.exists() else 0
    lost = trained - saved
    row.steps_lost, row.interval = lost, interval
    resume = ["--ckpt_path", str(last)] if last.exists() else []
    done = work.walt(["fit", "--config", str(config("resumed")), *resume], cwd=folder)
    if done.returncode != 0:
        row.observed = f"the resumed run failed: {work.show(done.last_line())}"
        return
    expected_rows = [r for r in reference["rows"] if r["step"] > saved]
    resumed_rows = read_rows(folder / "resumed.jsonl")
    same_steps = resumed_rows == expected_rows
    same_state = same(training_state(last), training_state(reference["last"]))
    row.bit_identical = same_steps and same_state
    row.silent_garbage = not row.bit_identical
    start = f"last.ckpt at step {saved}" if saved else "no last.ckpt yet (restarted from step 0)"
    row.observed = (
        f"{start}: {lost} step(s) lost; resumed {step_span(resumed_rows)}: losses and batches "
        f"{'identical' if same_steps else 'DIFFERENT'}; final weights, EMA, optimizer "
        f"{'identical' if same_state else 'DIFFERENT'}"
    )
    row.passed = 0 <= lost <= interval and row.bit_identical


# ---- kill -9 ----------------------------------------------------------------------------------------------------

RESUME_EXPECTED = (
    "lost <= {every} steps; the resumed run's losses, batches, final weights, EMA and optimizer bit-identical to "
    "the uninterrupted run"
)


def kill_base_at_step(work: Work, row: Row, step: int, how: str) -> None:
    reference = base_reference(work)
    folder = work.folder(row.case)
    flag = folder / "paused"
    pause = callback("PauseAt", step=step, flag=str(flag))  # the process waits there, before that step's save
    config = lambda name: base_config(folder, latents(work), name, [pause] if name == "killed" else [])
    process = work.start(["fit", "--config", str(config("killed"))], folder, folder / "killed.log")
    work.kill_when(process, flag.exists, folder / "killed.log")
    row.done = f"`walt fit` (base) killed -9 after step {step} ({how}), resumed from last.ckpt"
    row.expected = RESUME_EXPECTED.format(every=BASE_EVERY)
    resume_and_compare(work, row, reference, folder, config, step, BASE_EVERY)
    saved = row.steps_lost is not None and step - row.steps_lost
    if saved and saved % BASE_BATCHES_PER_EPOCH:
        epoch, batch = divmod(saved, BASE_BATCHES_PER_EPOCH)
        row.observed += f" (resumed mid-epoch: from batch {batch + 1} of epoch {epoch})"


@case("kill-base-mid-epoch", "kill", quick=True, needs=("base",))
def kill_base_mid_epoch(work: Work, row: Row) -> None:
    # A step whose last checkpoint is mid-epoch: 4 batches per epoch, a save every 3 steps (3, 6, 9 are mid-epoch).
    step = work.rng(row.case).choice([4, 5, 7, 8, 10, 11])
    kill_base_at_step(work, row, step, "random step; its last checkpoint falls mid-epoch")


@case("kill-base-random-step", "kill", needs=("base",))
def kill_base_random_step(work: Work, row: Row) -> None:
    step = work.rng(row.case).randint(1, BASE_STEPS - 1)
    kill_base_at_step(work, row, step, f"random step of 1-{BASE_STEPS - 1}")


@case("kill-base-random-time", "kill", needs=("base",))
def kill_base_random_time(work: Work, row: Row) -> None:
    """Killed at a random moment once training has started: between steps, inside one, or inside a save."""
    reference = base_reference(work)
    folder = work.folder(row.case)
    config = lambda name: base_config(folder, latents(work), name)
    process = work.start(["fit", "--config", str(config("killed"))], folder, folder / "killed.log")
    # A random moment of the uninterrupted run's training (a second or so here, after ~15 s of start-up).
    wait = work.rng(row.case).uniform(0.0, reference["training"])
    kill_at: list[float] = []

    def first_step_then_wait() -> bool:
        if not kill_at and (folder / "killed.jsonl").exists():
            kill_at.append(time.monotonic() + wait)
        return bool(kill_at) and time.monotonic() >= kill_at[0]

    work.kill_when(process, first_step_then_wait, folder / "killed.log")
    trained = max((r["step"] for r in read_rows(folder / "killed.jsonl")), default=0)
    row.done = (
        f"`walt fit` (base) killed -9 {wait:.2f} s after its first step (random; it had trained {trained} steps), "
        "resumed"
    )
    row.expected = RESUME_EXPECTED.format(every=BASE_EVERY)
    resume_and_compare(work, row, reference, folder, config, trained, BASE_EVERY)


@case("kill-tokenizer-random-step", "kill", needs=("tokenizer",))
def kill_tokenizer(work: Work, row: Row) -> None:
    """The tokenizer: variational (posterior noise from the random stream), two optimizers once the GAN starts."""
    reference = tokenizer_reference(work)
    steps = [r["step"] for r in reference["rows"]]  # 1, 2, 3, 4, 6, 8, ...: two per batch once the GAN starts
    step = work.rng(row.case).choice(steps[1:-1])
    folder = work.folder(row.case)
    flag = folder / "paused"
    pause = callback("PauseAt", step=step, flag=str(flag))
    config = lambda name: tokenizer_config(folder, name, [pause] if name == "killed" else [])
    process = work.start(["fit", "--config", str(config("killed"))], folder, folder / "killed.log")
    work.kill_when(process, flag.exists, folder / "killed.log")
    row.done = f"`walt fit` (tokenizer, variational, GAN from batch 4) killed -9 after step {step}, resumed"
    row.expected = RESUME_EXPECTED.format(every=TOKENIZER_EVERY)
    resume_and_compare(work, row, reference, folder, config, step, TOKENIZER_EVERY)


@case("kill-during-checkpoint-write", "kill")
def kill_during_write(work: Work, row: Row) -> None:
    """A checkpoint every step, each with 128 MB of ballast so that writing one takes a while, $TMPDIR on another
    filesystem (tmpfs): killed while the n-th write is under way (its temporary file growing beside last.ckpt)."""
    write = work.rng(row.case).randint(2, 4)
    folder = work.folder(row.case)
    tmpdir = work.tmpdir / row.case
    tmpdir.mkdir(parents=True, exist_ok=True)
    checkpoints = folder / "run/checkpoints"
    ballast = callback("Ballast", megabytes=128)
    config = lambda name, steps=BASE_STEPS, extra=(): base_config(
        folder, latents(work), name, list(extra), every=1, max_steps=steps
    )
    process = work.start(
        ["fit", "--config", str(config("killed", extra=[ballast]))], folder, folder / "killed.log",
        TMPDIR=str(tmpdir),
    )  # fmt: skip
    seen: set[Path] = set()

    def temporary() -> list[Path]:
        return sorted(checkpoints.glob(".last.ckpt.*.tmp")) if checkpoints.exists() else []

    def nth_write_under_way() -> bool:
        current = []
        for path in temporary():
            with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
                if path.stat().st_size > 0:
                    current.append(path)
        seen.update(current)
        return bool(current) and len(seen) == write

    work.kill_when(process, nth_write_under_way, folder / "killed.log")
    row.done = f"`walt fit` killed -9 during its checkpoint write #{write} (128 MB each, $TMPDIR on tmpfs), then resumed"
    row.expected = "last.ckpt = the previous checkpoint, loadable; no temporary file left after the resume"
    orphans = [p.name for p in temporary()]
    last = checkpoints / "last.ckpt"
    try:
        before = read_checkpoint(last)["global_step"]
    except (CheckpointError, FileNotFoundError) as err:
        row.observed = f"last.ckpt unreadable after the kill: {work.show(str(err))}"
        return
    done = work.walt(
        ["fit", "--config", str(config("resumed", steps=write + 1)), "--ckpt_path", str(last)], folder
    )
    after = read_checkpoint(last)["global_step"] if done.returncode == 0 else None
    left = [p.name for p in temporary()] + [p.name for p in tmpdir.iterdir()]
    row.steps_lost, row.interval = write - before, 1
    row.observed = (
        f"{len(orphans)} temporary file after the kill; last.ckpt loads, step {before}; resumed to step {after}; "
        f"{len(left)} temporary file(s) left"
    )
    row.passed = before == write - 1 and len(orphans) == 1 and after == write + 1 and not left


# ---- damaged files ----------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this runs ``touch <path>``: a stand-in for malicious code in a file posing as a checkpoint."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def flip(raw: bytes, at: int) -> bytes:
    """``raw`` with the 4 bytes at ``at`` inverted."""
    return raw[:at] + bytes(b ^ 0xFF for b in raw[at : at + 4]) + raw[at + 4 :]


def tensor_offset(raw: bytes, tensor: torch.Tensor, rng: random.Random) -> int | None:
    """A random 4-byte-aligned offset inside ``tensor``'s data in a file that stores it raw, or None when its
    bytes do not occur exactly once (a checkpoint's zip entries and safetensors hold tensors as they are)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(data)
    if at < 0 or raw.find(data, at + 1) >= 0 or len(data) < 8:
        return None
    return at + 4 * rng.randrange(len(data) // 4 - 1)


def flip_inside(
    source: Path, dest: Path, rng: random.Random, pick: Callable[[dict], list[torch.Tensor]]
) -> None:
    """Copies ``source`` to ``dest`` with 4 bytes flipped inside one of the tensors ``pick`` returns."""
    raw = source.read_bytes()
    tensors = pick(torch.load(source, map_location="cpu", weights_only=True))
    rng.shuffle(tensors)
    at = next(at for t in tensors if (at := tensor_offset(raw, t, rng)) is not None)
    dest.write_bytes(flip(raw, at))


def damaged(kind: str, source: Path | None, dest: Path, rng: random.Random, marker: Path) -> str:
    """Writes ``dest``, a damaged ``source`` of the given kind; returns what was done, in words."""
    if kind == "flip-weight":
        flip_inside(
            source, dest, rng, lambda c: [v for k, v in c["state_dict"].items() if v.is_floating_point()]
        )
        return "4 bytes flipped inside a weight"
    if kind == "empty":
        dest.write_bytes(b"")
        return "a 0-byte file"
    if kind == "random":
        dest.write_bytes(rng.randbytes(65536))
        return "64 KiB of random bytes"
    if kind == "truncated":
        raw = source.read_bytes()
        keep = rng.uniform(0.1, 0.9)
        dest.write_bytes(raw[: int(len(raw) * keep)])
        return f"cut to {keep:.0%} of its size"
    if kind == "malicious":
        torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": Payload(marker)}, dest)
        return "a pickle whose loading runs `touch`, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"
    raise ValueError(kind)


def refused(work: Work, row: Row, done: Done, path: Path, nothing_written: bool) -> None:
    """A command given a damaged file must exit non-zero, without a traceback, naming the file, writing nothing."""
    line = work.show(done.last_line())
    named = str(path) in done.stderr
    traceback = "Traceback" in done.stderr
    row.silent_garbage = done.returncode == 0 or not nothing_written
    row.passed = done.returncode > 0 and named and not traceback and nothing_written
    detail = []
    if traceback:
        detail.append("with a traceback")
    if not named:
        detail.append("file not named")
    if not nothing_written:
        detail.append("OUTPUT WRITTEN")
    suffix = f" [{', '.join(detail)}]" if detail else ""
    row.observed = f"exit {done.returncode}: {shorten(line)}{suffix}"


def shorten(text: str, limit: int = 150) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sample_args(model: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(model), "--output", str(out), "--num-samples", "1", "--steps", "1",
            "--device", "cpu", *extra]  # fmt: skip


def files_in(folder: Path) -> list[Path]:
    """The files under ``folder`` (an empty folder left by a refused command holds nothing to mistake for output)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def corruption_case(kind: str, target: str) -> None:
    """Registers case ``corrupt-<kind>-<target>``: the damaged file given to `walt sample`, `walt encode` or `walt
    fit --ckpt_path` (a base model's last.ckpt for sample and resume, the tokenizer's for encode)."""

    def run(work: Work, row: Row) -> None:
        folder = work.folder(row.case)
        rng = work.rng(row.case)
        marker = folder / "payload_ran"
        env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if kind == "malicious" else {}
        # Only flips and cuts start from a real checkpoint (which takes a training run to make).
        reference = tokenizer_reference if target == "encode" else base_reference
        source = reference(work)["last"] if kind in ("flip-weight", "truncated") else None
        bad = folder / "last.ckpt"
        what = damaged(kind, source, bad, rng, marker)
        out = folder / "out"
        if target == "sample":
            done = work.walt(sample_args(bad, out), folder, **env)
        elif target == "encode":
            config = tokenizer_config(folder, "tokenizer")
            args = ["encode", "--config", str(config), "--checkpoint", str(bad), "--output", str(out),
                    "--num-workers", "0", "--stats-samples", "2", "--device", "cpu"]  # fmt: skip
            done = work.walt(args, folder, **env)
        else:
            config = base_config(folder, latents(work), "resumed", max_steps=BASE_STEPS + 2)
            done = work.walt(["fit", "--config", str(config), "--ckpt_path", str(bad)], folder, **env)
            out = folder / "run/checkpoints"
        command = {"sample": "`walt sample`", "encode": "`walt encode`", "resume": "`walt fit --ckpt_path`"}[
            target
        ]
        row.done = f"{command} on last.ckpt: {what}"
        row.expected = "exit != 0, one line naming the file, no output" + (
            ", no code run" * (kind == "malicious")
        )
        refused(work, row, done, bad, nothing_written=not files_in(out) and not marker.exists())
        if marker.exists():
            row.observed += " [THE PAYLOAD RAN]"

    needs = ("tokenizer" if target == "encode" else "base",) if kind in ("flip-weight", "truncated") else ()
    case(f"corrupt-{kind}-{target}", "corrupt", needs=needs)(run)


for _kind in ("flip-weight", "empty", "random", "truncated", "malicious"):
    for _target in ("sample", "encode", "resume"):
        corruption_case(_kind, _target)


@case("corrupt-flip-optimizer-resume", "corrupt", needs=("base",))
def corrupt_optimizer(work: Work, row: Row) -> None:
    """The weights hash alone let this through: the run resumed on a damaged optimizer moment, without a word."""
    folder = work.folder(row.case)
    bad = folder / "last.ckpt"
    flip_inside(
        base_reference(work)["last"], bad, work.rng(row.case),
        lambda c: [v for s in c["optimizer_states"] for p in s["state"].values() for v in p.values() if v.numel() > 1],
    )  # fmt: skip
    config = base_config(folder, latents(work), "resumed", max_steps=BASE_STEPS + 2)
    done = work.walt(["fit", "--config", str(config), "--ckpt_path", str(bad)], folder)
    row.done = "`walt fit --ckpt_path` on last.ckpt: 4 bytes flipped inside an Adam moment (not a weight)"
    row.expected = "exit != 0, one line naming the file, no output"
    refused(work, row, done, bad, nothing_written=not files_in(folder / "run/checkpoints"))


@case("corrupt-flip-vae-encode", "corrupt", needs=("tokenizer",))
def corrupt_vae(work: Work, row: Row) -> None:
    folder = work.folder(row.case)
    bad = folder / "vae.safetensors"
    source = encoded(work) / "vae.safetensors"
    raw = source.read_bytes()
    state = read_weights(source)
    rng = work.rng(row.case)
    tensors = [v for v in state.values() if v.numel() > 1]
    rng.shuffle(tensors)
    at = next(at for t in tensors if (at := tensor_offset(raw, t, rng)) is not None)
    bad.write_bytes(flip(raw, at))
    out = folder / "out"
    args = ["encode", "--config", str(tokenizer_reference(work)["config"]), "--checkpoint", str(bad), "--output",
            str(out), "--num-workers", "0", "--stats-samples", "0", "--device", "cpu"]  # fmt: skip
    done = work.walt(args, folder)
    row.done = (
        "`walt encode --checkpoint vae.safetensors` (walt encode's export): 4 bytes flipped inside a weight"
    )
    row.expected = "exit != 0, one line naming the file, no output"
    refused(work, row, done, bad, nothing_written=not files_in(out))


def sweep(work: Work, row: Row, source: Path, count: int, read: Callable[[Path], Any], what: str) -> None:
    """Flips 4 bytes at ``count`` random offsets anywhere in ``source`` (headers, pickle, zip directory, tensor
    data alike), one copy each, and reads every copy as walt's loaders do (``read``): each must be refused by
    name, or read back exactly as the original (bytes nothing reads: zip padding, unused header space)."""
    folder = work.folder(row.case)
    raw = source.read_bytes()
    original = read(source)
    # What loaders use: a checkpoint's integrity record itself is not (a flip in its key names is harmless).
    used = lambda loaded: {k: v for k, v in loaded.items() if k != "walt_integrity"}
    rng = work.rng(row.case)
    counts = {"refused": 0, "identical": 0, "silent": 0, "unclear": 0}
    examples: list[str] = []
    for _ in range(count):
        at = rng.randrange(len(raw) - 4)
        bad = folder / source.name
        bad.write_bytes(flip(raw, at))
        try:
            loaded = read(bad)
        except CheckpointError as err:
            counts["refused" if str(bad) in str(err) else "unclear"] += 1
            continue
        except Exception as err:  # any other error is one the commands do not name
            counts["unclear"] += 1
            examples.append(f"offset {at}: {type(err).__name__}")
            continue
        if same(used(loaded), used(original)):
            counts["identical"] += 1
        else:
            counts["silent"] += 1
            examples.append(f"offset {at}")
    row.done = f"4 bytes flipped at {count} random offsets of {what}, each copy read as the loaders read it"
    row.expected = "each refused naming the file, or read back identical (bytes nothing reads); 0 silent"
    row.observed = (
        f"{counts['refused']} refused, {counts['identical']} identical, {counts['silent']} silently different, "
        f"{counts['unclear']} other errors" + (f" (e.g. {', '.join(examples[:3])})" if examples else "")
    )
    row.silent_garbage = counts["silent"] > 0
    row.passed = counts["silent"] == 0 and counts["unclear"] == 0


@case("corrupt-flip-sweep-ckpt", "corrupt", quick=True, needs=("base",))
def sweep_checkpoint(work: Work, row: Row) -> None:
    count = 100 if work.quick else 300
    sweep(work, row, base_reference(work)["last"], count, read_checkpoint, "a base model's last.ckpt")


@case("corrupt-flip-sweep-vae", "corrupt", needs=("tokenizer",))
def sweep_vae(work: Work, row: Row) -> None:
    sweep(work, row, encoded(work) / "vae.safetensors", 200, read_weights, "walt encode's vae.safetensors")


# ---- bad inputs -------------------------------------------------------------------------------------------------


def bad_input(work: Work, row: Row, args: list[str], message: str, folder: Path, written: list[Path]) -> None:
    """The command must exit non-zero with a short message holding ``message``, no traceback, and write none of
    ``written``."""
    done = work.walt(args, folder)
    line = work.show(done.last_line())
    traceback = "Traceback" in done.stderr
    nothing = not any(files_in(p) for p in written)
    row.expected = f"exit != 0, no traceback, nothing written; says '{message}'"
    row.observed = f"exit {done.returncode} after {done.seconds:.0f} s: {shorten(line)}" + (
        " [with a traceback]" if traceback else ""
    )
    row.silent_garbage = done.returncode == 0
    row.passed = done.returncode > 0 and not traceback and nothing and message in done.stderr


def sample_input_case(name: str, extra: list[str], message: str, quick: bool = False) -> None:
    def run(work: Work, row: Row) -> None:
        folder = work.folder(row.case)
        model = base_reference(work)["last"] if name in ("unknown-class", "context") else folder / "none.ckpt"
        if name == "context":
            from walt.data import write_video

            write_video(folder / "clip.mp4", torch.zeros(5, 32, 32, 3, dtype=torch.uint8).numpy(), fps=8)
        out = folder / "out"
        args = ["sample", "--model", str(model), "--output", str(out), "--device", "cpu", *extra]
        row.done = f"`walt sample {' '.join(extra)}`" + (
            "" if model.exists() else " (model path not even read)"
        )
        bad_input(work, row, args, message, folder, [out])

    case(
        f"input-sample-{name}",
        "input",
        quick,
        needs=("base",) if name in ("unknown-class", "context") else (),
    )(run)


sample_input_case("guidance-nan", ["--guidance", "nan"], "--guidance: must be a finite number")
sample_input_case("num-samples-0", ["--num-samples", "0"], "--num-samples: must be >= 1")
sample_input_case("num-samples-negative", ["--num-samples", "-3"], "--num-samples: must be >= 1")
sample_input_case("batch-size-0", ["--batch-size", "0"], "--batch-size: must be >= 1")
sample_input_case("fps-0", ["--fps", "0"], "--fps: must be a finite number > 0")
sample_input_case("steps-0", ["--steps", "0"], "--steps: must be >= 1")
sample_input_case("unknown-class", ["--class", "purple"], "unknown class 'purple'")
sample_input_case("context", ["--context", "clip.mp4"], "not trained with context frames")


def config_input_case(name: str, edit: Callable[[dict], None], message: str) -> None:
    def run(work: Work, row: Row) -> None:
        folder = work.folder(row.case)
        config = base_config(folder, latents(work), "bad", edit=edit)
        row.done = f"`walt fit` with {name} in the config"
        bad_input(work, row, ["fit", "--config", str(config)], message, folder, [folder / "run"])

    case(f"input-config-{name.split(':')[0]}", "input")(run)


def _set(section: str, key: str, value: Any) -> Callable[[dict], None]:
    def edit(config: dict) -> None:
        if section == "data":
            config["data"]["init_args"][key] = value
        elif section == "backbone":
            config["model"]["init_args"]["backbone"]["init_args"][key] = value
        elif section == "conditioner":
            config["model"]["init_args"]["conditioner"][key] = value
        else:
            config["model"]["init_args"][key] = value

    return edit


config_input_case("batch_size: 0", _set("data", "batch_size", 0), "batch_size must be an integer >= 1")
config_input_case(
    "label_dropout: 3.0",
    _set("conditioner", "label_dropout", 3.0),
    "label_dropout must be a probability in [0, 1]",
)
config_input_case(
    "warmup_steps: -1", _set("model", "warmup_steps", -1), "warmup_steps must be an integer >= 0"
)
config_input_case(
    "in_channels: null", _set("backbone", "in_channels", None), "in_channels must be an integer >= 1"
)


@case("input-encode-missing-checkpoint", "input")
def encode_missing(work: Work, row: Row) -> None:
    folder = work.folder(row.case)
    config = tokenizer_config(folder, "tokenizer")
    out = folder / "out"
    args = ["encode", "--config", str(config), "--checkpoint", "missing.ckpt", "--output", str(out)]
    row.done = "`walt encode --checkpoint missing.ckpt`"
    bad_input(work, row, args, "missing.ckpt: no such file", folder, [out])


@case("input-tokenizer-lr-1e10", "input")
def tokenizer_diverges(work: Work, row: Row) -> None:
    folder = work.folder(row.case)
    config = tokenizer_config(folder, "steps", lr=1e10, max_steps=8)
    row.done = "`walt fit` (tokenizer) at lr 1e10, a checkpoint every 4 steps"
    bad_input(work, row, ["fit", "--config", str(config)], "non-finite loss", folder, [])
    written = sorted(p.name for p in (folder / "run/checkpoints").glob("*.ckpt"))
    steps = [r["step"] for r in read_rows(folder / "steps.jsonl")]
    row.expected = "stops at the first non-finite loss: exit != 0, no traceback, no checkpoint written"
    row.observed += f"; {len(steps)} step(s) trained, checkpoints written: {written or 'none'}"
    row.passed = row.passed and not written
    row.silent_garbage = row.silent_garbage or bool(written)


# ---- output folders ---------------------------------------------------------------------------------------------


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files_in(folder)}


@case("output-sample-over-older-samples", "output", needs=("base",))
def sample_over_older(work: Work, row: Row) -> None:
    folder = work.folder(row.case)
    model = base_reference(work)["last"]
    out = folder / "samples"
    first = work.walt(sample_args(model, out, "--seed", "0"), folder)
    before = digest(out)
    again = work.walt(sample_args(model, out, "--seed", "5"), folder)
    kept = digest(out) == before
    overwritten = work.walt(sample_args(model, out, "--seed", "5", "--overwrite"), folder)
    seeds = (
        [e["seed"] for e in json.loads((out / "samples.json").read_text())]
        if overwritten.returncode == 0
        else []
    )
    row.done = "`walt sample` into a folder of an earlier run's samples, then again with --overwrite"
    row.expected = "refused (exit != 0, names --overwrite), old files untouched; --overwrite replaces them"
    row.observed = (
        f"first run exit {first.returncode}; second: exit {again.returncode}: {shorten(work.show(again.last_line()), 110)}; "
        f"old files {'untouched' if kept else 'CHANGED'}; --overwrite: exit {overwritten.returncode}, seeds {seeds}"
    )
    row.silent_garbage = again.returncode == 0 or not kept
    row.passed = (
        first.returncode == 0 and again.returncode > 0 and "--overwrite" in again.stderr and kept
        and "Traceback" not in again.stderr and overwritten.returncode == 0 and seeds == [5]
    )  # fmt: skip


@case("output-encode-killed", "output", needs=("tokenizer",))
def encode_killed(work: Work, row: Row) -> None:
    folder = work.folder(row.case)
    pause_at = work.rng(row.case).randint(2, 7)
    flag = folder / "paused"
    pausing = {"class_path": f"{KILL_POINTS}.PausingVideos", "init_args": {
        "pause_at": pause_at, "flag": str(flag), "num_samples": 8, "num_frames": 5, "resolution": 16}}  # fmt: skip
    config = tokenizer_config(folder, "tokenizer", train=pausing)
    out = folder / "latents"
    args = ["encode", "--config", str(config), "--checkpoint", str(tokenizer_reference(work)["last"]), "--output",
            str(out), "--num-workers", "0", "--stats-samples", "2", "--shard-size", "2", "--batch-size", "2",
            "--device", "cpu"]  # fmt: skip
    process = work.start(args, folder, folder / "encode.log")
    work.kill_when(process, flag.exists, folder / "encode.log")
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    from walt.data import LatentShards

    try:
        LatentShards(out)
        read = "READ AS A DATASET"
    except FileNotFoundError as err:
        read = f"LatentShards refused: {shorten(work.show(str(err)), 90)}"
    again = work.walt(args, folder)
    row.done = f"`walt encode` killed -9 while reading clip {pause_at} of 8; LatentShards on its folder; encode again"
    row.expected = "LatentShards refuses (no index.json); a new encode into it is refused without --overwrite"
    row.observed = f"left {', '.join(left) or 'nothing'}; {read}; encode again: exit {again.returncode}"
    row.silent_garbage = read.startswith("READ")
    row.passed = (
        "index.json" in read
        and not row.silent_garbage
        and again.returncode > 0
        and "Traceback" not in (again.stderr)
    )


def evaluation_folders(work: Work) -> tuple[Path, Path]:
    """Two clips of MovingDigits train (real) and test (generated), 16 frames at 32x32, as MP4 files."""

    def build() -> tuple[Path, Path]:
        from walt.data import MovingDigits, to_uint8, write_video

        folders = []
        for split in ("train", "test"):
            folder = work.folder(f"evaluate-{split}")
            dataset = MovingDigits(split=split, num_samples=2, num_frames=16, resolution=32)
            for i in range(2):
                write_video(folder / f"clip_{i}.mp4", to_uint8(dataset[i]["video"]).numpy(), fps=8)
            folders.append(folder)
        return folders[0], folders[1]

    return work.once("evaluation", build)


def evaluate_args(real: Path, fake: Path, cache: Path, output: Path) -> list[str]:
    return ["evaluate", "fvd2048_16f", "--real", str(real), "--fake", str(fake), "--num-real", "2", "--num-fake",
            "2", "--cache-dir", str(cache), "--output", str(output), "--no-progress", "--device", "cpu"]  # fmt: skip


@case("output-evaluate-hidden-temporary", "output")
def evaluate_hidden(work: Work, row: Row) -> None:
    from walt.metrics.evaluate import select_units

    real, fake_source = evaluation_folders(work)
    folder = work.folder(row.case)
    fake = folder / "samples"
    shutil.copytree(fake_source, fake, dirs_exist_ok=True)
    # What killed writers leave: hidden temporary videos of the current name form and of an older one
    # (.tmp.mp4, whose suffix alone would pass for a video), unreadable. Hidden names sort first: enough of them
    # that the seeded selection of 2 files would pick one, were they listed.
    (fake / ".sample_002.mp4.0badc0de.tmp").write_bytes(b"half a video")
    hidden = 0
    while hidden < 2 or all(i >= hidden for i in select_units(hidden + 2, 2, 0, fake, "--num-fake")):
        (fake / f".sample_{hidden:03d}.tmp.mp4").write_bytes(b"half a video")
        hidden += 1
    done = work.walt(evaluate_args(real, fake, folder / "cache", folder / "fvd.json"), folder)
    result = json.loads((folder / "fvd.json").read_text()) if done.returncode == 0 else {}
    row.done = (
        f"`walt evaluate` on 2 samples beside {hidden + 1} hidden temporary files (`.x.mp4.<hex>.tmp`, `.x.tmp.mp4`; "
        "listed, one would be drawn)"
    )
    row.expected = "the hidden files are skipped: exit 0, FVD of the 2 samples"
    row.observed = f"exit {done.returncode}: FVD {result.get('value')}, counts {result.get('counts')}" + (
        f"; {shorten(work.show(done.last_line()))}" if done.returncode else ""
    )
    row.passed = done.returncode == 0 and result.get("counts") == {"real": 2, "fake": 2}


@case("output-evaluate-empty-cache", "output")
def evaluate_empty_cache(work: Work, row: Row) -> None:
    real, fake = evaluation_folders(work)
    folder = work.folder(row.case)
    cache = folder / "cache"
    first = work.walt(evaluate_args(real, fake, cache, folder / "first.json"), folder)
    cached = sorted(cache.glob("*.npz"))
    for path in cached:
        path.write_bytes(b"")
    again = work.walt(evaluate_args(real, fake, cache, folder / "again.json"), folder)
    values = [
        json.loads((folder / n).read_text())["value"]
        for n in ("first.json", "again.json")
        if (folder / n).exists()
    ]
    warned = "computing the statistics again" in again.stderr
    whole = all(p.stat().st_size > 0 for p in cached)
    row.done = "`walt evaluate` with its cached real statistics truncated to 0 bytes"
    row.expected = "a warning, the statistics recomputed (same FVD), the cache file whole again"
    row.observed = (
        f"exit {first.returncode} then {again.returncode}; warning {'printed' if warned else 'MISSING'}; "
        f"FVD {values}; cache {'whole' if whole else 'STILL EMPTY'}"
    )
    row.passed = (
        first.returncode == 0 and again.returncode == 0 and warned and whole and len(values) == 2
        and values[0] == values[1] and bool(cached)
    )  # fmt: skip


# ---- the campaign -----------------------------------------------------------------------------------------------

PREPARE: dict[str, Callable[[Work], Any]] = {"base": base_reference, "tokenizer": tokenizer_reference}


def select(patterns: list[str] | None, quick: bool) -> list[Case]:
    """The cases named (a name, a group, or a glob of names), or the quick ones, or all."""
    if patterns:
        chosen = [
            c for c in CASES if any(p in (c.name, c.group) or fnmatch.fnmatch(c.name, p) for p in patterns)
        ]
        unknown = [
            p
            for p in patterns
            if not any(p in (c.name, c.group) or fnmatch.fnmatch(c.name, p) for c in CASES)
        ]
        if unknown:
            raise SystemExit(f"fault_injection: no case matches {', '.join(unknown)} (see --list)")
        return chosen
    return [c for c in CASES if c.quick] if quick else list(CASES)


def run_case(work: Work, selected: Case) -> Row:
    row = Row(case=selected.name, group=selected.group)
    start = time.monotonic()
    try:
        selected.run(work, row)
    except Exception as err:  # a case that cannot run fails, with the reason, and the others go on
        row.passed = False
        row.observed = f"{row.observed} [the case could not run: {type(err).__name__}: {shorten(work.show(str(err)), 300)}]"
    row.seconds = round(time.monotonic() - start, 1)
    print(
        f"  {'PASS' if row.passed else 'FAIL'} {row.case} ({row.seconds:.0f} s)", file=sys.stderr, flush=True
    )
    return row


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def table(rows: list[Row]) -> str:
    lines = ["| case | what was done | expected | observed | verdict |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {' | '.join(cell(x) for x in (r.case, r.done, r.expected, r.observed))} | "
                     f"{'PASS' if r.passed else '**FAIL**'} |")  # fmt: skip
    return "\n".join(lines)


def summary(rows: list[Row], seconds: float) -> dict:
    lost = [(r.steps_lost, r.interval) for r in rows if r.steps_lost is not None]
    resumed = [r for r in rows if r.bit_identical is not None]
    return {
        "cases": len(rows),
        "passed": sum(r.passed for r in rows),
        "failed": [r.case for r in rows if not r.passed],
        "silent_garbage": sum(r.silent_garbage for r in rows),
        "max_steps_lost": max((n for n, _ in lost), default=None),
        "max_steps_lost_over_interval": max((n / i for n, i in lost), default=None),
        "resumes_bit_identical": f"{sum(r.bit_identical for r in resumed)} of {len(resumed)}",
        "seconds": round(seconds),
    }


def summary_line(s: dict, rows: list[Row]) -> str:
    lost = [f"{r.steps_lost}/{r.interval}" for r in rows if r.steps_lost is not None]
    return (
        f"{s['cases']} cases, {s['passed']} pass, {len(s['failed'])} fail; silent garbage: {s['silent_garbage']}; "
        f"steps lost / checkpoint interval: {', '.join(lost) or '-'} (never more than one interval: "
        f"{'yes' if (s['max_steps_lost_over_interval'] or 0) <= 1 else 'NO'}); resumed runs bit-identical: "
        f"{s['resumes_bit_identical']}; wall time {s['seconds']} s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", help="comma-separated case names, groups or globs (default: all)")
    parser.add_argument("--quick", action="store_true", help="the small subset of the CI test")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill points and damaged bytes")
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--out", type=Path, help="write the rows and the summary as JSON")
    parser.add_argument("--work-dir", type=Path, help="work folder (default: a new temporary one, removed)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    args = parser.parse_args(argv)
    if args.list:
        for c in CASES:
            print(f"{c.group:8} {c.name}{'  (quick)' if c.quick else ''}")
        return 0
    selected = select(args.cases.split(",") if args.cases else None, args.quick)
    root = Path(tempfile.mkdtemp(prefix="walt-faults-", dir=args.work_dir))
    # $TMPDIR of the runs killed during a checkpoint write: another filesystem than the checkpoints' (tmpfs).
    shm = Path("/dev/shm")
    tmpdir = Path(tempfile.mkdtemp(prefix="walt-faults-", dir=shm if shm.is_dir() else None))
    work = Work(root, args.seed, tmpdir)
    work.quick = args.quick
    print(f"fault injection: {len(selected)} cases, seed {args.seed}, {args.jobs} at a time", file=sys.stderr)
    start = time.monotonic()
    pool = ThreadPoolExecutor(max_workers=max(1, args.jobs))
    if threading.current_thread() is threading.main_thread():  # SIGTERM ends the campaign as Ctrl-C does
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        # The trained runs the cases start from go first, side by side, so no case waits long for one.
        needed = [n for n in PREPARE if any(n in c.needs for c in selected)]
        prepared = [pool.submit(PREPARE[n], work) for n in needed]
        futures = [pool.submit(run_case, work, c) for c in selected]
        rows = [f.result() for f in futures]
        for f in prepared:
            f.exception()  # a failure shows in the rows of the cases that needed it
    finally:
        # On an interruption the running commands are killed first, so that the threads waiting on them end.
        work.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(tmpdir, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.monotonic() - start
    facts = summary(rows, seconds)
    print(table(rows))
    print()
    print(summary_line(facts, rows))
    if args.keep:
        print(f"work folder kept: {root}", file=sys.stderr)
    if args.out is not None:
        record = {"seed": args.seed, "quick": args.quick, "summary": facts, "rows": [asdict(r) for r in rows]}
        write_atomic(args.out, json.dumps(record, indent=1) + "\n")
    return 0 if not facts["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
