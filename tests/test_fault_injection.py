"""tools/fault_injection.py, the issue-23 campaign of kills, damaged files and bad inputs against the real `walt`
commands: its quick subset (a kill -9 mid-epoch and the resume, a sweep of flipped bytes over a real last.ckpt),
and the whole campaign, which takes about 15 minutes of CPU and is marked slow."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _campaign(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "faults.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "tools/fault_injection.py"), *args, "--out", str(out),
               "--work-dir", str(tmp_path)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    assert out.exists(), done.stdout + done.stderr
    return done, json.loads(out.read_text())


def _check(done: subprocess.CompletedProcess, record: dict) -> None:
    failed = [(r["case"], r["observed"]) for r in record["rows"] if not r["passed"]]
    assert not failed and done.returncode == 0, done.stdout
    assert record["summary"]["silent_garbage"] == 0
    for row in record["rows"]:
        if row["steps_lost"] is not None:
            assert 0 <= row["steps_lost"] <= row["interval"], row
    assert done.stdout.startswith("| case | what was done | expected | observed | verdict |")
    assert (
        f"{len(record['rows'])} cases, {len(record['rows'])} pass, 0 fail; silent garbage: 0" in done.stdout
    )


def test_the_quick_campaign_passes_every_case(tmp_path):
    done, record = _campaign(tmp_path, "--quick", "--seed", "1")
    _check(done, record)
    rows = {r["case"]: r for r in record["rows"]}
    assert set(rows) == {"kill-base-mid-epoch", "corrupt-flip-sweep-ckpt"}
    assert rows["kill-base-mid-epoch"]["bit_identical"] is True
    assert "resumed mid-epoch" in rows["kill-base-mid-epoch"]["observed"]
    assert "0 silently different" in rows["corrupt-flip-sweep-ckpt"]["observed"]
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # the work folder is removed


def test_cases_are_chosen_by_name_group_or_glob(capsys):
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import fault_injection
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert fault_injection.main(["--list"]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in listing} == {"kill", "corrupt", "input", "output"} and len(
        listing
    ) >= 40
    chosen = fault_injection.select(["kill", "corrupt-empty-*"], quick=False)
    assert [c.name for c in chosen][-3:] == [
        "corrupt-empty-sample", "corrupt-empty-encode", "corrupt-empty-resume",
    ]  # fmt: skip
    assert {c.group for c in chosen} == {"kill", "corrupt"}
    with pytest.raises(SystemExit, match="no case matches nothing-like-this"):
        fault_injection.select(["nothing-like-this"], quick=False)


@pytest.mark.slow
def test_the_whole_campaign_passes_every_case(tmp_path):
    done, record = _campaign(tmp_path)
    _check(done, record)
    assert {r["group"] for r in record["rows"]} == {"kill", "corrupt", "input", "output"}
    assert all(
        r["bit_identical"] for r in record["rows"] if r["group"] == "kill" and r["bit_identical"] is not None
    )
