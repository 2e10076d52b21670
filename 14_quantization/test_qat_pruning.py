"""Tests of quantization-aware training and pruning: the QAT forward equals the quantized model's forward, the
straight-through gradient equals the gradient of the float layer at the quantized weight, a few QAT steps
lower the low-bit loss; magnitude pruning zeroes exactly the requested fraction (the smallest weights), 2:4
keeps exactly 2 of every 4, and bad arguments are refused."""

import pytest
import torch
import torch.nn.functional as F

from pruning import magnitude_mask, prune_model, two_four_mask
from qat import QATLinear, fake_quantize, prepare_qat
from quantized_model import quantize_model
from transformer import MiniFormer, TransformerConfig


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=23, context_length=16, num_layers=2, num_heads=2, embed_dim=32)
    return MiniFormer(config)


def ids(seed=0, batch=4):
    return torch.randint(0, 23, (batch, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits,group_size", [(8, None), (4, 16), (2, None)])
def test_qat_forward_equals_the_quantized_model(bits, group_size):
    model = tiny_model()
    qat_model = prepare_qat(tiny_model(), bits, group_size=group_size)
    x = ids()[:, :-1]
    with torch.no_grad():
        assert torch.equal(qat_model(x), quantize_model(model, "rtn", bits, group_size)(x))


def test_straight_through_gradient_is_the_float_gradient_at_the_quantized_weight():
    weight = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(5, 32)
    F.linear(x, fake_quantize(weight, 3)).square().sum().backward()
    frozen = fake_quantize(weight, 3).detach().requires_grad_(True)
    F.linear(x, frozen).square().sum().backward()
    assert torch.allclose(weight.grad, frozen.grad)


def test_a_few_qat_steps_lower_the_low_bit_loss():
    model = prepare_qat(tiny_model(), 2)
    batch = ids(1, batch=8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def loss():
        logits = model(batch[:, :-1])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    before = loss().item()
    for _ in range(30):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before - 0.1


def test_prepare_qat_replaces_block_linears_only():
    model = prepare_qat(tiny_model(), 4)
    assert sum(isinstance(m, QATLinear) for m in model.modules()) == 8
    assert type(model.head) is torch.nn.Linear and model.head.weight is model.token_embedding.weight


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.9, 0.999])
def test_magnitude_pruning_fraction_is_exact_and_drops_the_smallest(sparsity):
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(3))
    keep = magnitude_mask(weight, sparsity)
    assert (~keep).sum().item() == round(sparsity * weight.numel())
    if 0 < sparsity:
        assert weight[~keep].abs().max() <= weight[keep].abs().min()


def test_magnitude_pruning_ties_still_give_the_exact_count():
    keep = magnitude_mask(torch.ones(10), 0.3)
    assert keep.tolist() == [False] * 3 + [True] * 7


def test_two_four_keeps_the_two_largest_of_every_four():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.0]])
    assert two_four_mask(weight).tolist() == [[False, True, True, False, True, True, False, False]]
    random = torch.randn(16, 64)
    assert (two_four_mask(random).reshape(-1, 4).sum(dim=1) == 2).all()


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.3), ("2:4", 0.5)])
def test_prune_model_fraction_is_exact(pattern, sparsity):
    model = tiny_model()
    fraction = prune_model(model, sparsity, pattern)
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"]
    zeros = sum((m.weight == 0).sum().item() for m in linears)
    assert fraction == zeros / sum(m.weight.numel() for m in linears)
    assert fraction == pytest.approx(sparsity, abs=1e-3)
    assert (model.token_embedding.weight != 0).all()  # the tied head is skipped


def test_bad_pruning_and_qat_arguments():
    with pytest.raises(ValueError, match="sparsity must be a finite number in \\[0, 1\\)"):
        magnitude_mask(torch.randn(4, 4), 1.0)
    with pytest.raises(ValueError, match="sparsity must be"):
        magnitude_mask(torch.randn(4, 4), float("nan"))
    with pytest.raises(ValueError, match="divisible by 4"):
        two_four_mask(torch.randn(4, 6))
    with pytest.raises(ValueError, match="pattern must be"):
        prune_model(tiny_model(), 0.5, "4:8")
    with pytest.raises(ValueError, match="bits must be an integer in"):
        prepare_qat(tiny_model(), 1)
    with pytest.raises(ValueError, match="group_size must be a positive integer that divides"):
        prepare_qat(tiny_model(), 4, group_size=24)
