"""Tests for the shared helpers: data, batching, runtime, results, the training loop, checkpoints."""

import json
import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import data
from data import CharVocab, encode_bytes, pydoc_text, random_batch, train_val_split
from demo_cli import demo_parser, start_demo
from results import write_results
from run_all import run_demo
from runtime import Timer, pick_device, seed_everything, time_function, track_peak_memory
from testing import missing
from training import (CheckpointError, TrainConfig, learning_rate_at, load_checkpoint, save_checkpoint, train)


# ----- data -----

def test_pydoc_corpus_is_real_english_and_offline():
    text = pydoc_text()
    assert len(text) > 100_000
    assert "the" in text.split()


def test_shakespeare_cache_is_used_when_checksum_matches(tmp_path, monkeypatch):
    shared = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
    if not shared.is_file():
        missing("../shared/data/tinyshakespeare.txt not present")
    (tmp_path / data.SHAKESPEARE_FILENAME).write_bytes(shared.read_bytes())
    monkeypatch.setenv("LLM_LAB_DATA", str(tmp_path))
    text = data.shakespeare_text(download=False)
    assert len(text.encode()) == 1_115_394 and text.startswith("First Citizen")


def test_corrupt_cache_is_never_used(tmp_path, monkeypatch):
    (tmp_path / data.SHAKESPEARE_FILENAME).write_text("First Citizen: a tampered copy\n")
    monkeypatch.setenv("LLM_LAB_DATA", str(tmp_path))
    with pytest.raises(data.CorpusUnavailableError):
        data.shakespeare_path(download=False)
    # A download that fails (unreachable address) must raise a message naming LLM_LAB_DATA.
    with pytest.raises(data.CorpusUnavailableError, match="LLM_LAB_DATA"):
        data.shakespeare_path(download=True, url="http://127.0.0.1:9/none.txt", timeout=2)
    assert (tmp_path / data.SHAKESPEARE_FILENAME).read_text().startswith("First Citizen: a tampered")


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """An empty cache folder and an unreachable download address; the fallback message not yet printed."""
    monkeypatch.setenv("LLM_LAB_DATA", str(tmp_path))
    monkeypatch.setattr(data.shakespeare_path, "__defaults__", (True, "http://127.0.0.1:9/none.txt", 2.0))
    monkeypatch.setattr(data, "_fallback_reported", False)
    return tmp_path


def test_auto_corpus_falls_back_to_pydoc_offline(offline):
    text, name = data.load_corpus("auto")
    assert name == "pydoc" and text == pydoc_text()
    with pytest.raises(ValueError, match="corpus name"):
        data.load_corpus("wikipedia")


def test_fallback_message_prints_once_per_process(offline, capsys):
    for _ in range(3):
        assert data.load_corpus("auto")[1] == "pydoc"
    assert capsys.readouterr().err.count("Shakespeare unavailable") == 1


def test_failed_download_leaves_no_part_file(offline):
    for _ in range(2):
        with pytest.raises(data.CorpusUnavailableError):
            data.shakespeare_path()
    assert list(offline.iterdir()) == []


def test_folder_at_the_cache_path_falls_back_with_a_message(offline, capsys):
    (offline / data.SHAKESPEARE_FILENAME).mkdir()
    with pytest.raises(data.CorpusUnavailableError, match="not a file"):
        data.shakespeare_path(download=False)
    assert data.load_corpus("auto")[1] == "pydoc"
    assert "not a file" in capsys.readouterr().err


def test_char_vocab_round_trip_and_unknown_characters():
    vocab = CharVocab("hello world")
    assert vocab.decode(vocab.encode("hold low")) == "hold low"
    assert vocab.size == len(set("hello world"))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.encode("xyz")


@pytest.mark.parametrize("ids", [[-1], [0, 8], torch.tensor([3, -2])])
def test_char_vocab_decode_bad_ids(ids):
    with pytest.raises(ValueError, match=r"ids must be in \[0, 8\)"):
        CharVocab("hello world").decode(ids)  # 8 distinct characters


def test_byte_encoding_matches_utf8():
    assert encode_bytes("héllo ✓").tolist() == list("héllo ✓".encode("utf-8"))
    empty = encode_bytes("")
    assert empty.shape == (0,) and empty.dtype == torch.long


def test_batches_have_right_shapes_and_stay_inside_data():
    data_ids = torch.arange(1000)
    train_ids, val_ids = train_val_split(data_ids, 0.1)
    assert len(train_ids) == 900 and len(val_ids) == 100 and val_ids[0] == 900
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = random_batch(val_ids, batch_size=8, context_length=16, generator=generator)
        assert x.shape == y.shape == (8, 16)
        assert x.min() >= 900 and y.max() <= 999
        assert torch.equal(y[:, :-1], x[:, 1:])  # targets are inputs shifted by one
        assert torch.equal(y - x, torch.ones_like(x))  # consecutive ids: each window is contiguous


@pytest.mark.parametrize("data_ids, kwargs, name", [
    (torch.arange(100), {"batch_size": 0, "context_length": 4}, "batch_size"),
    (torch.arange(100), {"batch_size": 2, "context_length": 100}, "context_length"),
    (torch.arange(100).view(10, 10), {"batch_size": 2, "context_length": 4}, "data must be a 1-D"),
])
def test_bad_batch_arguments(data_ids, kwargs, name):
    with pytest.raises(ValueError, match=name):
        random_batch(data_ids, **kwargs)
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(torch.arange(10), 1.5)


# ----- runtime and results -----

def test_pick_device_and_bad_names():
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ValueError, match="device"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            pick_device("cuda")


def test_seeding_repeats_random_draws():
    seed_everything(3)
    a = torch.randn(5)
    seed_everything(3)
    assert torch.equal(a, torch.randn(5))


def test_timer_and_time_function_measure_positive_time():
    with Timer("cpu") as t:
        sum(range(10_000))
    assert t.seconds > 0
    assert time_function(lambda: sum(range(1000)), "cpu", repeats=2) > 0
    with pytest.raises(ValueError, match="repeats"):
        time_function(lambda: None, "cpu", repeats=0)


def test_peak_memory_sees_a_large_allocation():
    with track_peak_memory("cpu") as stats:
        block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched by the fill
        block.add_(1)
        del block
    assert stats["peak_bytes"] >= 48 * 1024 * 1024


def test_results_json_records_environment_and_sanitises(tmp_path):
    path = write_results(tmp_path / "results.json", {"loss": torch.tensor(1.5), "bad": float("nan")}, "cpu",
                         topic="x")
    document = json.loads(path.read_text())
    assert document["results"] == {"loss": 1.5, "bad": "nan"}
    assert document["environment"]["torch"] == torch.__version__ and document["topic"] == "x"


def test_results_json_records_commit_cpu_threads_and_load(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
    path = write_results(tmp_path / "results.json", {}, "cpu", load_at_start=1.25)
    env = json.loads(path.read_text())["environment"]
    assert env["environment_variables"]["OMP_NUM_THREADS"] == "3"
    assert env["environment_variables"]["MKL_NUM_THREADS"] is None and "OMP_WAIT_POLICY" in env["environment_variables"]
    assert env["torch_threads"] == torch.get_num_threads() and env["cpu_cores"] == os.cpu_count()
    assert env["cpu"] and env["cpu"] in env["hardware"]
    assert env["load_average_1min"]["start"] == 1.25 and env["load_average_1min"]["end"] >= 0
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True)
    if head.returncode == 0:  # a git checkout: the commit is HEAD's and the dirty flag a bool
        assert env["git_commit"] == head.stdout.strip() and isinstance(env["git_dirty"], bool)


def test_results_json_accepts_numpy_arrays_and_scalars(tmp_path):
    path = write_results(tmp_path / "r.json", {"array": np.arange(3), "scalar": np.float32(0.5)}, "cpu")
    assert json.loads(path.read_text())["results"] == {"array": [0, 1, 2], "scalar": 0.5}


def test_demo_cli_defaults_and_out(tmp_path):
    args = demo_parser("test").parse_args(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    run = start_demo(args, str(Path(__file__)))
    assert run.quick and run.device.type == "cpu" and run.out_dir == tmp_path.resolve()
    run.finish({"answer": 42})
    assert json.loads((tmp_path / "results.json").read_text())["results"]["answer"] == 42


# ----- plotting -----

@pytest.mark.parametrize("constrained", [False, True])
def test_panels_flat_axes_and_constrained_layout(constrained):
    from matplotlib.layout_engine import ConstrainedLayoutEngine
    from plotting import panels, plt

    fig, axes = panels(2, 3, width=2.0, height=1.5, title="t", constrained=constrained)
    assert len(axes) == 6 and tuple(fig.get_size_inches()) == (6.0, 3.0)
    assert isinstance(fig.get_layout_engine(), ConstrainedLayoutEngine) == constrained
    plt.close(fig)


# ----- training loop and checkpoints -----

def test_learning_rate_schedule_shape():
    config = TrainConfig(steps=100, learning_rate=1.0, warmup_steps=10, min_lr_fraction=0.1)
    assert learning_rate_at(0, config) == pytest.approx(0.1)
    assert learning_rate_at(9, config) == pytest.approx(1.0)
    assert learning_rate_at(10, config) == pytest.approx(1.0)
    assert learning_rate_at(55, config) == pytest.approx(0.55)  # cosine midpoint between 1.0 and 0.1
    assert learning_rate_at(100, config) == pytest.approx(0.1)


def test_docstring_warmup_formula_is_the_one_the_code_uses():
    import training

    assert "lr_max * (step + 1) / warmup" in training.__doc__  # it once said step / warmup
    config = TrainConfig(steps=50, learning_rate=3e-3, warmup_steps=8)
    for step in range(config.warmup_steps):
        assert learning_rate_at(step, config) == pytest.approx(3e-3 * (step + 1) / 8)


@pytest.mark.parametrize("field, value", [("steps", 0), ("learning_rate", -1.0), ("min_lr_fraction", 2.0),
                                          ("grad_clip", 0.0), ("warmup_steps", -1)])
def test_bad_train_config(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


class Bigram(torch.nn.Module):
    def __init__(self, vocab=8):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, x):
        return self.table(x)


def _cyclic_batches(split):
    start = torch.randint(0, 8, (16, 1))
    seq = (start + torch.arange(9)) % 8  # 0 1 2 ... 7 0 1: each token determines the next
    return seq[:, :-1], seq[:, 1:]


def test_loss_decreases_on_a_tiny_problem():
    torch.manual_seed(0)
    model = Bigram()
    history = train(model, _cyclic_batches, TrainConfig(steps=150, learning_rate=0.1, warmup_steps=10,
                                                        eval_interval=50, eval_batches=2, progress=False))
    assert history.val_loss[0] > math.log(8) - 0.5
    assert history.val_loss[-1] < 0.2 < history.val_loss[0]
    assert len(history.train_loss) == 150 and history.eval_steps == [0, 50, 100, 150]
    assert not history.diverged and history.tokens_seen == 150 * 16 * 8


def test_on_eval_runs_after_each_evaluation_with_the_step():
    torch.manual_seed(0)
    steps_trained, seen = [0], []

    def counting_loss(model, x, y):  # counts the optimisation steps (evaluation runs in eval mode)
        steps_trained[0] += model.training
        return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    history = train(Bigram(), _cyclic_batches, TrainConfig(steps=10, eval_interval=4, eval_batches=1, progress=False),
                    loss_fn=counting_loss, on_eval=lambda step: seen.append((step, steps_trained[0])))
    assert [step for step, _ in seen] == history.eval_steps == [0, 4, 8, 10]
    assert [trained for _, trained in seen] == [0, 4, 8, 10]  # after those steps trained, not before


def test_divergence_is_detected():
    model = Bigram()

    def exploding_loss(model, x, y):
        return model(x).sum() * float("inf")

    history = train(model, _cyclic_batches, TrainConfig(steps=20, progress=False, eval_batches=1),
                    loss_fn=lambda m, x, y: exploding_loss(m, x, y) if m.training else torch.tensor(1.0))
    assert history.diverged and len(history.train_loss) == 1


def test_checkpoint_round_trip(tmp_path):
    model = Bigram()
    optimizer = torch.optim.AdamW(model.parameters())
    path = save_checkpoint(tmp_path / "ckpt.pt", model, optimizer, step=7, metadata={"note": "hi"})
    restored = Bigram()
    info = load_checkpoint(path, restored, torch.optim.AdamW(restored.parameters()))
    assert info == {"step": 7, "metadata": {"note": "hi"}}
    assert torch.equal(restored.table.weight, model.table.weight)
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("metadata, where", [
    ({"path": Path("runs/a")}, r"metadata\['path'\]"),
    ({"loss": np.float64(1.5)}, r"metadata\['loss'\]"),
    ({"losses": [1.0, object()]}, r"metadata\['losses'\]\[1\]"),
    ({3: "not a str key"}, "metadata keys must be str"),
])
def test_save_checkpoint_refuses_metadata_its_loader_would_refuse(tmp_path, metadata, where):
    with pytest.raises(TypeError, match=where):
        save_checkpoint(tmp_path / "ckpt.pt", Bigram(), metadata=metadata)
    assert not list(tmp_path.iterdir())  # nothing written
    plain = {"note": "hi", "loss": float("nan"), "sizes": [1, 2], "nested": {"ok": None, "flag": True}}
    path = save_checkpoint(tmp_path / "ok.pt", Bigram(), metadata=plain)
    assert load_checkpoint(path, Bigram())["metadata"]["nested"] == {"ok": None, "flag": True}


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", Bigram())
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path, Bigram())
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_checkpoint(path, Bigram())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", Bigram())


def test_checkpoint_for_another_model_is_rejected(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt.pt", Bigram(vocab=8))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(path, Bigram(vocab=9))


def test_unsafe_pickle_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo unsafe",))

    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"model": Evil()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(path, Bigram())


# ----- run_all -----

FAKE_DEMOS = {  # each fake demo.py ignores its flags except --out
    "ok": "import pathlib, sys; pathlib.Path(sys.argv[sys.argv.index('--out') + 1], 'results.json').write_text('{}')",
    "fails": "raise SystemExit(3)",
    "hangs": "import time; time.sleep(60)",
}


@pytest.mark.parametrize("behaviour, status", [("ok", "ok"), ("fails", "FAILED (3)"), ("hangs", "TIMEOUT (2 s)")])
def test_run_all_marks_failed_runs_and_never_leaves_old_results_current(tmp_path, behaviour, status):
    script = tmp_path / "99_fake" / "demo.py"
    script.parent.mkdir()
    script.write_text(FAKE_DEMOS[behaviour])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "results.json").write_text('{"from": "the previous run"}')
    row = run_demo(script, quick=True, device="cpu", out_dir=out_dir, timeout=2)
    assert row["status"] == status
    if behaviour == "ok":
        assert (out_dir / "results.json").read_text() == "{}" and not (out_dir / "results.previous.json").exists()
    else:
        assert not (out_dir / "results.json").exists()
        assert "previous run" in (out_dir / "results.previous.json").read_text()
