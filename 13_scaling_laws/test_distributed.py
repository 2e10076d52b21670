"""Tests of distributed.py with 2 local gloo processes: after N steps the DDP and the ZeRO runs hold the weights
of one process trained on the same global batch; ZeRO's optimizer state per rank is smaller (measured); DDP
all-reduces exactly the gradient bytes each step; rank 0 writes a checkpoint; bad arguments raise ValueError."""

import pathlib

import pytest
import torch

from distributed import (DataParallelSettings, build_model, global_batches, schedule_for, shard_batches,
                         spawn_local)
from training import load_checkpoint, make_optimizer, train

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("this torch build has no gloo backend", allow_module_level=True)

STEPS = 4


def settings_for(strategy: str, out_dir) -> DataParallelSettings:
    return DataParallelSettings(strategy=strategy, steps=STEPS, global_batch_size=4, context_length=16,
                                # no biases: the key bias gets a zero gradient (softmax ignores it), and AdamW
                                # turns its rounding noise (~1e-10) into steps of size lr that differ run to run
                                model=dict(num_layers=1, num_heads=2, embed_dim=32, bias=False), learning_rate=3e-3,
                                data="random", out_dir=str(out_dir))


@pytest.fixture(scope="module")
def single_process_weights():
    """One process, the whole global batch each step, the same seed, schedule and optimizer."""
    settings = settings_for("ddp", ".")
    batch_fn, vocab_size = global_batches(settings, "cpu")
    model = build_model(settings, vocab_size, "cpu")
    config = schedule_for(settings)
    train(model, batch_fn, config, optimizer=make_optimizer(model, config))
    return model.state_dict(), model


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both strategies, one after the other in the same 2 processes: {strategy: (rank records, out_dir)}."""
    settings = [settings_for(strategy, tmp_path_factory.mktemp(strategy)) for strategy in ("ddp", "zero")]
    return {s.strategy: (records, s.out_dir) for s, records in zip(settings, spawn_local(settings, world_size=2))}


@pytest.mark.parametrize("strategy", ["ddp", "zero"])
def test_two_processes_equal_one_process_on_the_global_batch(strategy, runs, single_process_weights):
    expected, model = single_process_weights
    records, out_dir = runs[strategy]
    checkpoint = pathlib.Path(out_dir) / "checkpoint.pt"
    trained = build_model(settings_for(strategy, "."), 32, "cpu")
    saved = load_checkpoint(checkpoint, trained)
    assert saved["step"] == STEPS and saved["metadata"] == {"strategy": strategy, "world_size": 2}
    initial = build_model(settings_for(strategy, "."), 32, "cpu").state_dict()
    moved = 0.0
    for name, value in trained.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
        moved = max(moved, (value - initial[name]).abs().max().item())
    assert moved > 1e-3  # training moved the weights, so equality is not the initial weights twice
    assert records[0]["final_train_loss"] != records[1]["final_train_loss"]  # the ranks saw different rows


def test_zero_shards_the_optimizer_state(runs, single_process_weights):
    ddp, zero = runs["ddp"][0], runs["zero"][0]
    _, model = single_process_weights
    full_state = 2 * 4 * model.num_parameters()  # two fp32 moments
    assert all(r["optimizer_bytes"] >= full_state for r in ddp)  # replicated: every rank holds all of it
    assert all(r["optimizer_bytes"] < 0.8 * ddp[0]["optimizer_bytes"] for r in zero)
    assert sum(r["optimizer_bytes"] for r in zero) == ddp[0]["optimizer_bytes"]  # the shards partition it


def test_ddp_all_reduces_every_gradient_byte_once_per_step(runs, single_process_weights):
    _, model = single_process_weights
    for record in runs["ddp"][0]:
        assert record["allreduce_bytes_per_step"] == 4 * model.num_parameters()


def test_shards_cover_the_global_batch_once():
    x = torch.arange(12).view(6, 2)
    shards = [shard_batches(lambda split: (x, x + 1), rank, 3)("train") for rank in range(3)]
    assert torch.equal(torch.cat([s[0] for s in shards]), x)
    with pytest.raises(ValueError, match="world_size"):
        shard_batches(lambda split: (x, x), 0, 4)("train")


@pytest.mark.parametrize("overrides, name", [
    (dict(strategy="fsdp"), "strategy"), (dict(data="web"), "data"), (dict(device="tpu"), "device"),
    (dict(steps=0), "steps"), (dict(global_batch_size=2.5), "global_batch_size"),
])
def test_bad_settings_raise_value_error_naming_them(overrides, name):
    with pytest.raises(ValueError, match=name):
        DataParallelSettings(**overrides)


def test_bad_world_and_rank_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="global_batch_size"):
        spawn_local([settings_for("ddp", tmp_path)], world_size=3)
    with pytest.raises(ValueError, match="world_size"):
        spawn_local([settings_for("ddp", tmp_path)], world_size=0)
    with pytest.raises(ValueError, match="rank"):
        shard_batches(lambda split: None, 2, 2)
