"""Two DDP processes on the CPU (gloo, launched by torchrun) train with identical weights on both ranks, and
torchrun's elastic restart after a killed worker resumes from the newest checkpoint.

Every checkpoint stores the SHA-256 of each rank's model and EMA weights (gathered from all ranks before
rank 0 writes); the trainer stops if they differ, and this test reads them from the final state.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from tests.tiny_training import contrast_tiff_pairs, run_python, tiny_overrides
from training.state import checksum, load_state, prefixed, state_path, unprefixed

STEPS = 4

# training/train.py for torchrun, except that rank 0 SIGKILLs itself right after the checkpoint at step
# argv[1] on the first attempt (TORCHELASTIC_RESTART_COUNT 0): torchrun must restart both workers, which
# resume from that checkpoint.
KILLER = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
from training import train, trainer
save = trainer.Trainer.save
def save_then_die(self):
    path = save(self)
    first_attempt = os.environ["TORCHELASTIC_RESTART_COUNT"] == "0"
    if first_attempt and self.rank == 0 and self.step == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return path
trainer.Trainer.save = save_then_die
sys.exit(train.main(sys.argv[2:]))
"""


def test_two_ranks_end_with_identical_weights_across_an_elastic_restart(tmp_path: Path) -> None:
    script = tmp_path / "train_and_die.py"
    script.write_text(KILLER)
    run_dir = tmp_path / "run"
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    overrides = tiny_overrides(
        run_dir,
        f"train.steps={STEPS}",
        "train.grad_accum=2",
        "checkpoint.every=2",
        "log.val_every=2",  # validation is all-reduced over the ranks' shards
        f"log.sample_every={STEPS}",  # rank 0 samples alone while rank 1 waits at the next collective
    )
    done = run_python([*torchrun, str(script), str(STEPS // 2), *overrides], timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"at step {STEPS // 2}" in done.stderr, done.stderr  # the restarted workers resumed

    tensors, info = load_state(state_path(run_dir / "checkpoints", STEPS))
    assert info["world_size"] == 2
    assert sorted(name.split(".")[1] for name in tensors if name.startswith("rng.") and "noise" in name) == ["0", "1"]
    first, second = info["weight_digests"]
    weights = {**prefixed("model.", unprefixed("model.", tensors)), **prefixed("ema.", unprefixed("ema.", tensors))}
    assert first == second == checksum(weights)
    # One optimiser step sees batch_size * grad_accum * world_size images.
    assert info["images_seen"] == STEPS * 4 * 2 * 2
    assert (run_dir / "model.safetensors").is_file()
    assert (run_dir / "samples" / f"samples-{STEPS:09d}.png").is_file()
    assert info["last_val_loss"] is not None and math.isfinite(info["last_val_loss"])
    assert not [name for name in os.listdir(run_dir) if name.startswith("rank")]  # only rank 0 writes


def test_bad_data_on_one_rank_stops_every_rank(tmp_path: Path) -> None:
    # p3's 1e6 pixel is read mid-run by one rank only; both must stop with its message rather than wait forever.
    root = contrast_tiff_pairs(tmp_path / "pairs", 8, bad=3)
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    overrides = tiny_overrides(
        tmp_path / "run", "model.num_classes=2", "data.source=tiff", f"data.path={root}", "data.normalization_images=1"
    )
    done = run_python([*torchrun, "training/train.py", *overrides], timeout=120)
    assert done.returncode != 0
    message = f"error: {root / 'p3.tif'}: a pixel of 1e+06 lies"
    assert done.stderr.count(message) == 2, done.stderr  # one line from each rank
    assert "exitcode  : 2" in done.stderr, done.stderr
