"""Tests of the lab helpers: the reference sizes, same-seed variants, the unigram baseline, and the cached
trained lab model (trained once, loaded with weights_only, a corrupt or stale file retrained, never used)."""

import math

import pytest
import torch

import lab
from lab import (char_shakespeare_batches, char_shakespeare_data, lab_model_config, short_schedule,
                 train_lab_variant, trained_lab_model, unigram_loss)


def test_lab_model_config_is_the_nanogpt_reference_size():
    config = lab_model_config(65, dropout=0.1)
    assert (config.num_layers, config.num_heads, config.embed_dim, config.context_length) == (4, 4, 128, 64)
    assert (config.norm_placement, config.norm, config.ffn, config.position) == ("pre", "layernorm", "gelu", "learned")
    assert config.tie_weights and config.dropout == 0.1


def test_char_shakespeare_batches_shapes_and_targets():
    batch_fn, vocab, _ = char_shakespeare_batches(context_length=16, batch_size=3, device="cpu",
                                                  generator=torch.Generator().manual_seed(0))
    for split in ("train", "val"):
        x, y = batch_fn(split)
        assert x.shape == y.shape == (3, 16)
        assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
        assert int(x.max()) < vocab.size
    with pytest.raises(ValueError, match="split"):
        batch_fn("test")


def test_short_schedule_shrinks_warmup_and_evaluations():
    schedule = short_schedule(400)
    assert (schedule.steps, schedule.warmup_steps, schedule.eval_interval) == (400, 40, 50)
    assert short_schedule(5000).warmup_steps == 100


def test_variants_with_the_same_seed_are_identical_and_see_the_same_batches():
    data = char_shakespeare_data(context_length=16, batch_size=4, seed=0)
    schedule = short_schedule(6, eval_batches=2)
    first, history = train_lab_variant(data, schedule, seed=3, num_layers=1, embed_dim=32)
    second, _ = train_lab_variant(data, schedule, seed=3, num_layers=1, embed_dim=32)
    assert first.config.context_length == 16 and len(history.train_loss) == 6
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_unigram_loss_equals_the_entropy_of_uniform_ids_within_sampling_error():
    """On i.i.d. uniform characters the best context-free guess scores log(V): the closed form."""
    vocabulary = 8
    generator = torch.Generator().manual_seed(0)

    def batch_fn(split):
        x = torch.randint(0, vocabulary, (32, 16), generator=generator)
        return x, torch.randint(0, vocabulary, (32, 16), generator=generator)

    data = lab.LabData(batch_fn, type("V", (), {"size": vocabulary})(), "uniform", generator, 16, 32)
    assert unigram_loss(data, batches=50) == pytest.approx(math.log(vocabulary), abs=0.01)


@pytest.fixture
def tiny_preset(monkeypatch, tmp_path):
    """A 4-step preset cached in a temporary folder."""
    monkeypatch.setenv("LLM_LAB_MODELS", str(tmp_path))
    monkeypatch.setitem(lab.PRESETS, "quick", dict(model=dict(num_layers=1, num_heads=2, embed_dim=16),
                                                   train=dict(steps=4, warmup_steps=1, eval_interval=4,
                                                              eval_batches=1)))
    return tmp_path


def test_trained_lab_model_is_cached_and_reloaded_with_equal_weights(tiny_preset):
    first = trained_lab_model("quick", verbose=False)
    assert not first.record["from_cache"] and len(list(tiny_preset.glob("lab-quick-*.pt"))) == 1
    second = trained_lab_model("quick", verbose=False)
    assert second.record["from_cache"] and second.record["val_loss"] == first.record["val_loss"]
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)
    assert not second.model.training


def test_a_corrupt_cached_model_is_retrained_not_used(tiny_preset):
    first = trained_lab_model("quick", verbose=False)
    path = next(tiny_preset.glob("lab-quick-*.pt"))
    path.write_bytes(path.read_bytes()[:100])  # truncated mid-write by a crash
    again = trained_lab_model("quick", verbose=False)
    assert not again.record["from_cache"] and again.record["val_loss"] == first.record["val_loss"]


def test_a_stale_cached_model_is_retrained(tiny_preset, monkeypatch):
    trained_lab_model("quick", verbose=False)
    monkeypatch.setattr(lab, "_code_version", lambda: "edited-since")  # the model's code changed
    assert not trained_lab_model("quick", verbose=False).record["from_cache"]
    assert len(list(tiny_preset.glob("lab-quick-*.pt"))) == 2


def test_another_torch_thread_count_trains_its_own_model(tiny_preset):
    """1 and 2 threads sum matmuls in different orders: the cache must not hand one's model to the other."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = trained_lab_model("quick", verbose=False)
        torch.set_num_threads(2)
        two = trained_lab_model("quick", verbose=False)
    finally:
        torch.set_num_threads(threads)
    assert not two.record["from_cache"] and one.record["key"] != two.record["key"]
    assert (one.record["numerics"], two.record["numerics"]) == ("cpu, torch threads=1", "cpu, torch threads=2")


def test_validation_loss_on_fixed_windows_is_the_mean_cross_entropy_and_keeps_the_mode():
    data = char_shakespeare_data(16, 4, "cpu", seed=0)
    windows = lab.fixed_validation_windows(data, 3, seed=0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(windows, lab.fixed_validation_windows(data, 3, seed=0)))
    torch.manual_seed(0)
    model = lab.MiniFormer(lab.lab_model_config(data.vocab.size, num_layers=1, num_heads=2, embed_dim=16,
                                                context_length=16)).train()
    with torch.no_grad():
        expected = sum(torch.nn.functional.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten()).item()
                       for x, y in windows) / 3
    model.train()
    assert lab.validation_loss(model, windows) == pytest.approx(expected, rel=1e-6) and model.training


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="preset"):
        trained_lab_model("huge")


def test_code_version_ignores_docstrings_and_comments_but_not_code(tmp_path, monkeypatch):
    monkeypatch.setattr(lab, "_SOURCES", ())
    import data as data_module

    original = lab._code_version()
    text = open(data_module.__file__).read()
    edited = tmp_path / "data.py"
    edited.write_text(text.replace('"""', '"""Edited. ', 1) + "\n# a comment\n")
    monkeypatch.setattr(data_module, "__file__", str(edited))
    assert lab._code_version() == original
    edited.write_text(text + "\nEXTRA_CONSTANT = 1\n")
    assert lab._code_version() != original


def test_model_cache_dir_ignores_the_corpus_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("LLM_LAB_MODELS", raising=False)
    monkeypatch.setenv("LLM_LAB_DATA", str(tmp_path / "read_only_corpus"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert lab.model_cache_dir() == tmp_path / "cache" / "llm_lab" / "models"
    monkeypatch.setenv("LLM_LAB_MODELS", str(tmp_path / "models"))
    assert lab.model_cache_dir() == tmp_path / "models"
