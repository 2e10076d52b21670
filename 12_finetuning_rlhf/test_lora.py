"""LoRA and QLoRA checked against peft's LoRA layers, 14's NF4 dequantization, hand counts and byte counts."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lora import (DEFAULT_TARGETS, LoRALinear, apply_lora, apply_qlora, count_parameters, lora_layers, merge_lora,
                  training_memory, unmerge_lora)
from quantization import quantize_nf4
from quantized_model import QuantizedLinear
from testing import require
from training import TrainConfig, train
from transformer import MiniFormer, TransformerConfig

V, E, H, H_KV, L = 13, 8, 2, 1, 2  # GQA (H_kv = 1) so qkv's output width differs from its input's


def tiny_model(ffn="gelu", seed=0) -> MiniFormer:
    torch.manual_seed(seed)
    return MiniFormer(TransformerConfig(vocab_size=V, context_length=8, num_layers=L, num_heads=H, embed_dim=E,
                                        num_kv_heads=H_KV, ffn=ffn)).eval()


def randomize_adapters(model, seed=1):
    """Give every B a nonzero value (a fresh B = 0 would hide any error in how B A enters the output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=generator) * 0.3)


def nf4_base(linear: nn.Linear) -> QuantizedLinear:
    return QuantizedLinear(quantize_nf4(linear.weight, 8, double_quant=True), linear.bias)


def ids(batch=2, length=6, seed=3):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_twin(model, base, rank, alpha, targets=DEFAULT_TARGETS):
    """peft's LoRA on a copy of the base model, with our adapters' A and B copied into it."""
    peft = require("peft")
    twin = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=rank, lora_alpha=alpha,
                                                                               target_modules=list(targets)))
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                theirs = twin.base_model.model.get_submodule(name)
                theirs.lora_A["default"].weight.copy_(module.lora_A)
                theirs.lora_B["default"].weight.copy_(module.lora_B)
    return twin.eval()


def lora_model(rank=2, alpha=6.0, targets=DEFAULT_TARGETS, ffn="gelu"):
    """(the model with LoRA applied, an untouched copy of its base)."""
    base = tiny_model(ffn)
    model = copy.deepcopy(base)
    apply_lora(model, rank, alpha, targets)
    return model, base


# --- the reference: peft ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank, alpha", [(1, 1.0), (2, 6.0), (4, 2.0)])
def test_forward_equals_peft_lora_with_the_same_adapters(rank, alpha):
    model, base = lora_model(rank, alpha)
    randomize_adapters(model)
    twin = peft_twin(model, base, rank, alpha)
    assert twin.base_model.model.blocks[0].attn.qkv.scaling["default"] == alpha / rank
    ours, theirs = model(ids()), twin(ids())
    assert not torch.allclose(ours, base(ids()), atol=1e-3)  # the adapters do change the output
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)


def test_merged_weights_equal_peft_merge_and_unload():
    model, base = lora_model(rank=3, alpha=5.0)
    randomize_adapters(model)
    merged_by_peft = peft_twin(model, base, 3, 5.0).merge_and_unload()
    merge_lora(model)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            torch.testing.assert_close(module.base.weight, merged_by_peft.get_submodule(name).weight, rtol=0, atol=1e-6)


# --- merge, unmerge and the fresh adapter -------------------------------------------------------------------

def test_merge_then_unmerge_restores_the_weights_and_keeps_the_output():
    model, base = lora_model()
    randomize_adapters(model)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    unmerged_logits = model(ids())
    merge_lora(model)
    assert all(layer.merged for layer in lora_layers(model))
    assert not torch.equal(model.blocks[0].attn.qkv.base.weight, before["blocks.0.attn.qkv.base.weight"])
    torch.testing.assert_close(model(ids()), unmerged_logits, rtol=0, atol=1e-5)  # the update is not added twice
    unmerge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model))
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(ids()), unmerged_logits, rtol=0, atol=1e-6)


def test_merging_twice_or_unmerging_an_unmerged_layer_raises():
    layer = LoRALinear(nn.Linear(4, 3), rank=2, alpha=2.0)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_lora(tiny_model())
    with pytest.raises(ValueError, match="no LoRA layers"):
        unmerge_lora(tiny_model())


def test_a_fresh_adapter_leaves_the_logits_exactly_unchanged():
    model, base = lora_model()
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in lora_layers(model))
    assert all(torch.count_nonzero(layer.lora_A) > 0 for layer in lora_layers(model))
    assert torch.equal(model(ids()), base(ids()))


def test_a_is_initialised_like_nn_linear_kaiming_uniform():
    torch.manual_seed(5)
    layer = LoRALinear(nn.Linear(64, 3), rank=256, alpha=1.0)
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a = sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.95 * bound
    assert abs(layer.lora_A.std().item() - bound / math.sqrt(3)) < 0.01


def test_the_adapter_formula_on_one_layer():
    base = nn.Linear(5, 4)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 5)
    expected = x @ base.weight.T + base.bias + 1.5 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


def test_dropout_acts_on_the_adapter_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(6, 6), rank=3, alpha=3.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    plain = layer.base(x) + F.linear(F.linear(x, layer.lora_A), layer.lora_B)
    torch.testing.assert_close(layer.eval()(x), plain)
    torch.manual_seed(7)
    dropped = layer.train()(x)
    torch.manual_seed(7)
    expected = layer.base(x) + F.linear(F.linear(F.dropout(x, 0.5, training=True), layer.lora_A), layer.lora_B)
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, plain)


# --- training: only the adapters learn ----------------------------------------------------------------------

def test_only_adapter_parameters_require_and_receive_gradients():
    model, base = lora_model()
    randomize_adapters(model)
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    model(ids()).logsumexp(-1).mean().backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


@pytest.mark.parametrize("quantized", [False, True])
def test_00_utils_train_moves_only_the_adapters(quantized):
    model = tiny_model()
    if quantized:
        apply_qlora(model, 2, 4.0, nf4_base)
    else:
        apply_lora(model, 2, 4.0)
    frozen_before = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    generator = torch.Generator().manual_seed(0)

    def batch_fn(split):
        x = torch.randint(0, V, (4, 8), generator=generator)
        return x, torch.roll(x, -1, dims=1)

    train(model, batch_fn, TrainConfig(steps=3, warmup_steps=0, eval_interval=3, eval_batches=1, progress=False))
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in lora_layers(model))
    assert all(torch.equal(p, frozen_before[name]) for name, p in model.named_parameters() if not p.requires_grad)


def test_the_tied_head_is_never_wrapped_and_stays_tied():
    model, base = lora_model(targets=("qkv", "out", "up", "down"))
    assert type(model.head) is nn.Linear and model.head.weight is model.token_embedding.weight
    assert not model.head.weight.requires_grad


def test_parameter_counts_match_the_hand_formula():
    rank = 3
    model, base = lora_model(rank=rank)
    D = E // H
    shapes = {"qkv": (E, (H + 2 * H_KV) * D), "out": (E, E), "up": (E, 4 * E), "down": (4 * E, E)}  # (in, out)
    expected = L * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
    counts = count_parameters(model)
    assert counts["trainable"] == expected == 3 * L * (8 + 16 + 16 + 40 + 40)
    assert counts["frozen"] == base.num_parameters()  # the tied head counted once
    assert counts["total"] == counts["trainable"] + counts["frozen"]


def test_apply_lora_returns_the_wrapped_names_and_reaches_swiglu_gate():
    model, base = lora_model(targets=("gate",), ffn="swiglu")
    assert [name for name, module in model.named_modules() if isinstance(module, LoRALinear)] == \
        ["blocks.0.ffn.gate", "blocks.1.ffn.gate"]
    assert apply_lora(tiny_model(), 1, 1.0, ("out",)) == ["blocks.0.attn.out", "blocks.1.attn.out"]


# --- QLoRA: the base is 14's NF4 ----------------------------------------------------------------------------

def test_qlora_base_is_14s_dequantized_nf4_and_the_forward_adds_the_adapter():
    base = tiny_model()
    model = copy.deepcopy(base)
    names = apply_qlora(model, 2, 4.0, nf4_base)
    randomize_adapters(model)
    x = torch.randn(3, 5, E)
    for name in names:
        layer, original = model.get_submodule(name), base.get_submodule(name)
        assert isinstance(layer.base, QuantizedLinear)
        dequantized = quantize_nf4(original.weight.detach(), 8, double_quant=True).dequantize()
        assert torch.equal(layer.base.quantized.dequantize(), dequantized)
        assert not torch.equal(dequantized, original.weight)  # 4 bits do round
        inputs = x if layer.in_features == E else torch.randn(3, 5, layer.in_features)
        expected = F.linear(inputs, dequantized, original.bias) + 2.0 * (inputs @ layer.lora_A.T @ layer.lora_B.T)
        torch.testing.assert_close(layer(inputs), expected, rtol=0, atol=1e-5)


def test_qlora_cannot_merge_and_trains_only_the_adapters():
    model = tiny_model()
    apply_qlora(model, 2, 4.0, nf4_base)
    with pytest.raises(TypeError, match="re-quantized"):
        merge_lora(model)
    with pytest.raises(TypeError, match="re-quantized"):
        model.blocks[0].attn.qkv.unmerge()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(name.endswith(("lora_A", "lora_B")) for name in trainable)
    model(ids()).logsumexp(-1).mean().backward()  # the gradient reaches every B through the 4-bit layers above it
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in lora_layers(model))
    assert all(p.grad is None for name, p in model.named_parameters() if name not in trainable)
    assert count_parameters(model) == count_parameters(lora_model(rank=2, alpha=4.0)[0])  # same weights, other storage


def test_apply_qlora_checks_what_quantize_base_returns():
    with pytest.raises(TypeError, match="quantize_base must be a callable"):
        apply_qlora(tiny_model(), 2, 4.0, "nf4")
    with pytest.raises(TypeError, match="in_features"):
        apply_qlora(tiny_model(), 2, 4.0, lambda linear: nn.Linear(3, 3))


# --- memory: exact byte counts ------------------------------------------------------------------------------

class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(4, 6)  # 24 weights + 6 biases
        self.down = nn.Linear(6, 4, bias=False)  # 24 weights
        self.register_buffer("table", torch.zeros(3))  # 3 floats


def test_training_memory_bytes_by_hand():
    full = training_memory(Toy())  # everything trains: 54 parameters
    assert full == {"frozen_weights": 12, "trainable_weights": 216, "gradients": 216, "optimizer_state": 432,
                    "total": 876}
    toy = Toy()
    apply_lora(toy, rank=2, alpha=4.0, targets=("up",))  # A (2, 4) + B (6, 2) = 20 trainable numbers
    assert training_memory(toy) == {"frozen_weights": 4 * (54 + 3), "trainable_weights": 80, "gradients": 80,
                                    "optimizer_state": 160, "total": 228 + 320}
    assert training_memory(toy, optimizer="sgd")["total"] == 228 + 160
    assert count_parameters(toy) == {"trainable": 20, "frozen": 54, "total": 74}


def test_training_memory_counts_the_quantized_base_as_stored():
    toy = Toy()
    apply_qlora(toy, rank=2, alpha=4.0, quantize_base=nf4_base, targets=("up",))
    # up: 24 weights -> 12 bytes of 4-bit codes; 3 blocks of 8 -> 3 int8 absmax codes + one fp32 scale + fp32 mean
    nf4_bytes = 12 + 3 + 4 + 4
    assert toy.up.base.quantized.nbytes == nf4_bytes
    memory = training_memory(toy)
    assert memory["frozen_weights"] == nf4_bytes + 4 * (6 + 24 + 3)  # + up's bias, down's weight, the buffer
    assert memory["total"] == memory["frozen_weights"] + 80 + 80 + 160
    assert count_parameters(toy) == {"trainable": 20, "frozen": 54, "total": 74}


def test_training_memory_counts_a_tied_head_once():
    model = tiny_model()
    memory = training_memory(model)
    assert memory["trainable_weights"] == 4 * model.num_parameters()
    assert memory["frozen_weights"] == 0  # MiniFormer with learned positions holds no buffers


# --- bad arguments ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, match", [
    ({"rank": 0}, ValueError, "rank must be an integer >= 1"),
    ({"rank": 1.5}, ValueError, "rank must be an integer >= 1"),
    ({"rank": True}, ValueError, "rank must be an integer >= 1"),
    ({"alpha": 0}, ValueError, r"alpha must be a finite number > 0"),
    ({"alpha": -2.0}, ValueError, r"alpha must be a finite number > 0"),
    ({"alpha": float("nan")}, ValueError, r"alpha must be a finite number > 0"),
    ({"alpha": float("inf")}, ValueError, r"alpha must be a finite number > 0"),
    ({"dropout": 1.0}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"dropout": float("nan")}, ValueError, r"dropout must be in \[0, 1\)"),
    ({"base": nn.Conv1d(3, 3, 1)}, TypeError, "base must be an nn.Linear or a quantized linear layer"),
    ({"base": "linear"}, TypeError, "base must be an nn.Linear or a quantized linear layer"),
])
def test_lora_linear_rejects_bad_arguments(kwargs, error, match):
    arguments = {"base": nn.Linear(4, 4), "rank": 2, "alpha": 2.0, "dropout": 0.0, **kwargs}
    with pytest.raises(error, match=match):
        LoRALinear(**arguments)


@pytest.mark.parametrize("targets, match", [
    (("qkv", "wq"), r"unknown \['wq'\]"),
    ("qkv", "non-empty sequence"),
    ((), "non-empty sequence"),
    (("gate",), r"targets \['gate'\] match no nn.Linear"),  # a GELU MLP has no gate
])
def test_apply_lora_rejects_unknown_or_unmatched_targets(targets, match):
    with pytest.raises(ValueError, match=match):
        apply_lora(tiny_model(), 2, 2.0, targets)


def test_applying_lora_twice_raises_instead_of_stacking_adapters():
    model, base = lora_model()
    with pytest.raises(ValueError, match="already wrapped"):
        apply_lora(model, 2, 2.0)


def test_training_memory_rejects_an_unknown_optimizer():
    with pytest.raises(ValueError, match="optimizer must be one of"):
        training_memory(Toy(), optimizer="adam8bit")
