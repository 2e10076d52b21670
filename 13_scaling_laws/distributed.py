"""Data-parallel training on torch.distributed: 00_utils' training loop on W processes, replicated or sharded.

    DDP   every rank holds the whole model and AdamW state and computes on its 1/W of the global batch;
          backward averages the gradients across ranks (all-reduce of N * 4 bytes; a ring sends and receives
          2 (W - 1) / W of that per rank), so every rank takes the step one process would take on the whole batch.
    ZeRO  (stage 1, torch's ZeroRedundancyOptimizer) the same, but each rank keeps AdamW's two moments for
          about 1/W of the parameter tensors, updates only those and broadcasts them: optimizer memory / W.

Backends: gloo on CPU, NCCL on CUDA. Rank 0 prints and writes the checkpoint (00_utils' save_checkpoint).

    torchrun --standalone --nproc_per_node 2 13_scaling_laws/distributed.py --strategy ddp     # 2 local processes
    torchrun --nnodes 2 --node_rank 0|1 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 --rdzv_id run1 13_scaling_laws/distributed.py             # 2 machines

Contents: DataParallelSettings; shard_batches (each rank's rows of the global batch), global_batches,
build_model, schedule_for (shared by the ranks and the one-process reference); the counted all-reduce hook; make_optimizer_for (AdamW or ZeRO with the shared loop's parameter groups); train_data_parallel (one
process); spawn_local (W processes on this machine, for tests and benchmarks); main (the torchrun entry).
"""

import argparse
import json
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: E402,F401  (torchrun runs this file as a script: make the topic folders importable)

from data import random_batch  # noqa: E402
from lab import char_shakespeare_data, lab_model_config, lab_train_config  # noqa: E402
from scaling import measured_state_bytes  # noqa: E402
from training import make_optimizer, save_checkpoint, train  # noqa: E402
from transformer import MiniFormer  # noqa: E402

STRATEGIES = ("ddp", "zero")
DATASETS = ("shakespeare", "random")


@dataclass
class DataParallelSettings:
    strategy: str = "ddp"  # "ddp" (replicated optimizer state) | "zero" (sharded optimizer state)
    steps: int = 50
    global_batch_size: int = 16  # split evenly over the ranks
    context_length: int = 32
    model: dict = field(default_factory=lambda: dict(num_layers=2, num_heads=2, embed_dim=64))  # 04's lab model
    learning_rate: float = 1e-3
    data: str = "shakespeare"  # "shakespeare" | "random" (a fixed random token stream: no corpus needed)
    seed: int = 0
    out_dir: str = "."  # checkpoint.pt and rank<r>.json go here
    device: str = "cpu"  # "cpu" (gloo) | "cuda" (NCCL, one GPU per local rank)

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.data not in DATASETS:
            raise ValueError(f"data must be one of {DATASETS}, got {self.data!r}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        for name in ("steps", "global_batch_size", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def shard_batches(batch_fn, rank: int, world_size: int):
    """Every rank draws the same global batch (same generator seed) and keeps its block of rows
    [rank * b, (rank + 1) * b), b = global / world_size. Together the ranks cover the global batch exactly
    once, so their averaged gradient is the global batch's gradient."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank}, world_size {world_size}")

    def shard_fn(split: str):
        x, y = batch_fn(split)  # (B_global, T) each
        if x.shape[0] % world_size:
            raise ValueError(f"global_batch_size ({x.shape[0]}) must be divisible by world_size ({world_size})")
        rows = x.shape[0] // world_size
        return x[rank * rows:(rank + 1) * rows], y[rank * rows:(rank + 1) * rows]  # (B_global / W, T)

    return shard_fn


def global_batches(settings: DataParallelSettings, device):
    """(batch_fn of the global batch, vocab_size): the same on every rank and in a single process."""
    if settings.data == "shakespeare":
        data = char_shakespeare_data(settings.context_length, settings.global_batch_size, device, settings.seed)
        return data.batch_fn, data.vocab.size
    generator = torch.Generator().manual_seed(settings.seed)
    stream = torch.randint(0, 32, (20_000,), generator=generator)
    splits = {"train": stream[:18_000], "val": stream[18_000:]}
    return (lambda split: random_batch(splits[split], settings.global_batch_size, settings.context_length,
                                       generator=generator, device=device)), 32


def build_model(settings: DataParallelSettings, vocab_size: int, device) -> MiniFormer:
    """04's lab model with settings.model, seeded: the same initial weights on every rank and in one process."""
    torch.manual_seed(settings.seed)
    return MiniFormer(lab_model_config(vocab_size, context_length=settings.context_length, **settings.model)).to(device)


def schedule_for(settings: DataParallelSettings, progress: bool = False):
    """04's schedule at settings.steps: warmup a tenth, cosine decay, evaluation at the start and the end."""
    return lab_train_config(steps=settings.steps, learning_rate=settings.learning_rate,
                            warmup_steps=max(1, settings.steps // 10), eval_interval=settings.steps, eval_batches=2,
                            progress=progress)


def counted_allreduce(state: dict, bucket):
    """DDP communication hook: torch's own all-reduce, after adding the bucket's bytes to state['bytes']."""
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    return default_hooks.allreduce_hook(state["group"], bucket)


def make_optimizer_for(model: torch.nn.Module, strategy: str, config):
    """The shared loop's AdamW (decay on matrices only); for "zero" the same groups in a ZeroRedundancyOptimizer."""
    optimizer = make_optimizer(model, config)
    if strategy == "ddp":
        return optimizer
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=config.learning_rate,
                                   betas=config.betas)


def local_optimizer(optimizer):
    """The optimizer whose state this rank holds (ZeRO keeps its shard's AdamW in .optim)."""
    return getattr(optimizer, "optim", optimizer)


def train_data_parallel(rank: int, world_size: int, settings: DataParallelSettings, init_method: str = "env://") -> dict:
    """One process of a data-parallel run: join the group, train with the shared loop, rank 0 checkpoints.
    Writes out_dir/rank<r>.json (timing, bytes) and returns the same numbers."""
    backend = "nccl" if settings.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    try:
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}" if settings.device == "cuda" else "cpu")
        batch_fn, vocab_size = global_batches(settings, device)
        model = build_model(settings, vocab_size, device)
        ddp_model = DistributedDataParallel(model)
        traffic = {"group": dist.group.WORLD, "bytes": 0}
        ddp_model.register_comm_hook(traffic, counted_allreduce)
        config = schedule_for(settings, progress=rank == 0)
        optimizer = make_optimizer_for(ddp_model.module, settings.strategy, config)
        history = train(ddp_model, shard_batches(batch_fn, rank, world_size), config, device=device,
                        optimizer=optimizer)
        state_bytes = measured_state_bytes(model, local_optimizer(optimizer))
        if settings.strategy == "zero":
            optimizer.consolidate_state_dict(to=0)  # every rank sends its shard; collective, so all ranks call it
        out_dir = Path(settings.out_dir)
        if rank == 0:
            save_checkpoint(out_dir / "checkpoint.pt", model, optimizer, step=settings.steps,
                            metadata={"strategy": settings.strategy, "world_size": world_size})
        record = {"rank": rank, "world_size": world_size, "strategy": settings.strategy,
                  "optimizer_bytes": state_bytes["optimizer"], "weights_bytes": state_bytes["weights"],
                  "allreduce_bytes_per_step": traffic["bytes"] / settings.steps,
                  "train_seconds": history.train_seconds, "seconds_per_step": history.train_seconds / settings.steps,
                  "tokens_per_second": history.tokens_per_second * world_size,  # global batch tokens
                  "final_train_loss": history.train_loss[-1], "final_val_loss_rank_shard": history.final_val_loss,
                  "num_parameters": model.num_parameters()}
        (out_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=2))
        if rank == 0:
            print(f"{settings.strategy} x {world_size}: {record['seconds_per_step'] * 1000:.1f} ms/step, "
                  f"{record['tokens_per_second']:,.0f} tokens/s, loss {record['final_train_loss']:.3f}, "
                  f"optimizer state on rank 0 {record['optimizer_bytes']:,} bytes")
        return record
    finally:
        dist.destroy_process_group()


def _spawned(rank: int, world_size: int, runs: list, folder: str) -> None:
    torch.set_num_threads(1)  # W processes share the cores
    for index, settings in enumerate(runs):  # one process group per run, the processes (and imports) reused
        train_data_parallel(rank, world_size, settings, init_method=f"file://{folder}/rendezvous{index}")


def spawn_local(runs: list, world_size: int = 2) -> list:
    """Run each DataParallelSettings of `runs` on W processes of this machine (torch.multiprocessing, gloo), one
    after the other in the same processes; returns, per run, the list of each rank's record."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}")
    for settings in runs:
        if settings.global_batch_size % world_size:
            raise ValueError(f"global_batch_size ({settings.global_batch_size}) must be divisible by world_size "
                             f"({world_size})")
        Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_spawned, args=(world_size, list(runs), folder), nprocs=world_size)
    return [[json.loads((Path(s.out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)] for s in runs]


def main():
    parser = argparse.ArgumentParser(description="Train the lab model data-parallel; run it under torchrun.")
    defaults = DataParallelSettings()
    parser.add_argument("--strategy", choices=STRATEGIES, default=defaults.strategy)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--global-batch-size", type=int, default=defaults.global_batch_size)
    parser.add_argument("--data", choices=DATASETS, default=defaults.data)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=defaults.device)
    parser.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "llm_lab_distributed"))
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run me under torchrun, e.g. torchrun --standalone --nproc_per_node 2 "
                     "13_scaling_laws/distributed.py")
    settings = DataParallelSettings(strategy=args.strategy, steps=args.steps, global_batch_size=args.global_batch_size,
                                    data=args.data, device=args.device, out_dir=args.out)
    Path(settings.out_dir).mkdir(parents=True, exist_ok=True)
    if int(os.environ["RANK"]) == 0:
        print(f"settings: {asdict(settings)}")
    train_data_parallel(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), settings)


if __name__ == "__main__":
    main()
