"""benchmarks/profiling.py's memory replay: the peak of an allocator trace and what was alive at it."""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
profiling = importlib.import_module("profiling")


def frame(filename: str, line: int, name: str) -> dict:
    return {"filename": filename, "line": line, "name": name}


def test_the_replay_finds_the_peak_and_the_blocks_alive_at_it():
    """a (100) and b (50) alive: 150; a freed, c (120) allocated: 170, the peak, with b and c alive; then d
    after c is freed stays below it. Frees of blocks from before the recording are ignored."""
    inside = [
        frame("/usr/lib/torch/nn/functional.py", 10, "conv3d"),
        frame("/src/walt/tokenizer/layers.py", 42, "forward"),
    ]
    trace = [
        {"action": "free_requested", "addr": 9, "size": 999},  # allocated before recording started
        {"action": "alloc", "addr": 1, "size": 100, "frames": inside},
        {"action": "alloc", "addr": 2, "size": 50, "frames": []},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},  # the same free, completed: counted once
        {"action": "alloc", "addr": 3, "size": 120, "frames": inside},
        {"action": "free_requested", "addr": 3, "size": 120},
        {"action": "alloc", "addr": 4, "size": 60, "frames": []},
    ]  # fmt: skip
    peak, alive = profiling.live_at_peak(trace)
    assert peak == 170 and sorted(b["addr"] for b in alive) == [2, 3]
    assert profiling.where_allocated(alive[-1]) == "tokenizer/layers.py:42 forward"
    assert profiling.where_allocated({"frames": [frame("/x/y.py", 3, "f")]}) == "/x/y.py:3 f"
    assert profiling.where_allocated({"frames": []}) == "?"
