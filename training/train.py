"""Train a model: ``torchrun --nproc_per_node=N training/train.py --config CONFIG.yaml [key=value ...]``.

Also ``python -m training.train ...`` (one process). The run resumes from the newest usable checkpoint
in its run_dir (``checkpoint.resume=auto``), which also makes torchrun's ``--max-restarts`` work. Bad
config keys, missing data and data that do not fit the model stop the run before training, with a
message naming the key or file. At the end rank 0 exports the EMA model to run_dir/model.safetensors.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a file (torchrun training/train.py): make the repository root importable.
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)

import torch
import torch.distributed as dist

from napari_iscat_diffusion.diffusion.unet import ConditionalUNet
from napari_iscat_diffusion.io.tiff_pairs import DataError
from training.config import ConfigError, TrainConfig, load_config
from training.data import build_data
from training.finetune import load_initial_weights
from training.trainer import DataErrorOnEveryRank, NonFiniteLossError, Trainer

log = logging.getLogger("training")


def _device(config: TrainConfig, local_rank: int) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: cuda was asked for but no CUDA device is available")
    if wanted == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _init_process_group(backend: str) -> None:
    """Join the process group that torchrun's environment describes, in a store namespace of this attempt.

    torchrun's agent keeps its key-value store across elastic restarts (``--max-restarts``), and the
    process group's keys would be the same in every attempt: the restarted workers then read the
    addresses of the killed ones and fail with "Gloo connectFullMesh failed ... Connection refused"
    (seen with torch 2.13). A prefix per restart keeps the attempts apart.
    """
    store, rank, world_size = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"attempt-{attempt}/", store), rank=rank, world_size=world_size
    )


def run(config: TrainConfig) -> Path | None:
    """Train (and export on rank 0) in this process, which torchrun's environment places in a group.

    Returns the exported model file on rank 0, None on the other ranks.
    """
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _device(config, local_rank)
    if world_size > 1:
        _init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        data = build_data(config, rank, world_size)
        torch.manual_seed(config.seed)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
        model = ConditionalUNet(config.unet_config())
        if config.model.init_from:
            sha256 = load_initial_weights(model, config)
            log.info("starting from the weights of %s (sha256 %s)", config.model.init_from, sha256[:12])
        model = model.to(device)
        trainer = Trainer(
            model,
            config,
            data.train_loader,
            data.val_loader,
            rank,
            world_size,
            pixel_size_nm=data.pixel_size_nm,
            class_names=data.class_names,
        )
        trainer.resume(config.checkpoint.resume)
        try:
            trainer.fit()
        except DataErrorOnEveryRank:
            dist.barrier()  # raised together, so the ranks can leave together (see below)
            raise
        exported = trainer.export() if rank == 0 else None
        if world_size > 1:
            # Leave together: a rank that tears gloo down while rank 0 still exports can abort at exit.
            dist.barrier()
        return exported
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad config or data)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], prog="training/train.py")
    parser.add_argument("--config", help="YAML config file (training/configs/*.yaml); defaults when omitted")
    parser.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=1e-4")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        config = load_config(args.config, args.overrides)
        exported = run(config)
    # OSError: what the file system refuses about a path in the config (a name too long, no permission).
    except (ConfigError, DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # training states are written atomically: the last one is whole
        print("interrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return 130
    if exported is not None:
        log.info("model written to %s", exported)
    return 0


if __name__ == "__main__":
    sys.exit(main())
