"""Resume equivalence: a run killed right after its checkpoint at N/2 and resumed ends with the same weights
as an uninterrupted run of N steps.

Every run is its own process with one thread (OMP_NUM_THREADS=1) on the CPU, so the same floating-point
operations run in the same order on the same data: the result must be bit-identical, not merely close.
That holds only if the resumed run restores everything that influences the rest of the run: weights, EMA
and its image counter (the ramp-up), optimiser moments, learning-rate schedule, the position in the data
order, the noise generator and the global RNG (dropout). The config turns each of these on (dropout,
accumulation, validation and sample grids at the checkpoint step), so forgetting any of them fails the test.
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import torch
from tests.tiny_training import run_python, tiny_overrides
from training.state import load_state, state_path

STEPS = 8

# train.main in a process that SIGKILLs itself right after writing the checkpoint of step argv[1]: no
# cleanup, no finally blocks, exactly what a node failure or an OOM kill leaves behind.
KILLER = """
import os, signal, sys
from training import train, trainer
save = trainer.Trainer.save
def save_then_die(self):
    path = save(self)
    if self.step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
trainer.Trainer.save = save_then_die
sys.exit(train.main(sys.argv[2:]))
"""

EXTRA = [
    f"train.steps={STEPS}",
    "train.grad_accum=2",
    "model.dropout=0.1",
    "log.val_every=4",
    "log.sample_every=4",
    f"checkpoint.every={STEPS // 2}",
]


def _final_state(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    return load_state(state_path(run_dir / "checkpoints", STEPS))


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    entries = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e.get("loss", e.get("val_loss"))) for e in entries]


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path: Path) -> None:
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = run_python(["-m", "training.train", *tiny_overrides(straight, *EXTRA)])
    assert done.returncode == 0, done.stderr

    crashed = run_python(["-c", KILLER, str(STEPS // 2), *tiny_overrides(killed, *EXTRA)])
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert not (killed / "model.safetensors").exists()
    resumed = run_python(["-m", "training.train", *tiny_overrides(killed, *EXTRA)])
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {STEPS // 2}" in resumed.stderr  # it really resumed, not restarted from scratch

    expected_tensors, expected_info = _final_state(straight)
    tensors, info = _final_state(killed)
    assert sorted(tensors) == sorted(expected_tensors)
    differing = [name for name in tensors if not torch.equal(tensors[name], expected_tensors[name])]
    assert differing == [], f"tensors that differ after the resume: {differing[:10]}"
    for key in ("images_seen", "micro_batches", "best_val_loss", "scheduler", "weight_digests"):
        assert info[key] == expected_info[key], key
    assert info["images_seen"] == STEPS * 4 * 2  # the EMA counter continued: batch 4, 2 micro-steps per step
    assert _losses(killed) == _losses(straight)  # the resumed log continues the interrupted one, no duplicates
