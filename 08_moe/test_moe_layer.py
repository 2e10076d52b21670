"""Tests of moe_layer.py: the layer == Hugging Face Mixtral's sparse MoE block on the same weights; the balancing
loss == transformers' load_balancing_loss_func; z-loss and capacity by hand and against a brute-force queue;
the auxiliary losses reach the gradient; parameter and FLOP counts == torch's FlopCounterMode; it plugs into
04's MiniFormer; bad arguments."""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_layer import (MoELayer, MoESettings, active_parameters, capacity_mask, expert_capacity, forward_flops,
                       load_balancing_loss, model_active_parameters, moe_layers, register_moe, reset_utilisation,
                       route, router_z_loss, total_parameters)
from testing import require
from transformer import MiniFormer, TransformerConfig, unregister


def tiny_config(**overrides) -> TransformerConfig:
    settings = dict(vocab_size=29, context_length=16, num_layers=2, num_heads=4, embed_dim=32, bias=False)
    settings.update(overrides)
    return TransformerConfig(**settings)


def build_layer(seed=0, std=0.3, config=None, **settings) -> MoELayer:
    """A layer with large random weights, so routing is far from uniform and mistakes show."""
    torch.manual_seed(seed)
    layer = MoELayer(config or tiny_config(), MoESettings(**settings))
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.normal_(0.0, std)
    return layer


def random_input(batch=3, length=7, dim=32, seed=1):
    return torch.randn(batch, length, dim, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# The layer against Mixtral, and against the dense mixture it reduces to
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (4, 2), (8, 2), (8, 3)])
def test_layer_equals_hugging_face_mixtral_sparse_moe_block(num_experts, top_k):
    transformers = require("transformers")
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hidden = 48
    hf_config = transformers.MixtralConfig(hidden_size=32, intermediate_size=hidden, num_local_experts=num_experts,
                                           num_experts_per_tok=top_k, num_attention_heads=4, num_key_value_heads=2,
                                           num_hidden_layers=1, vocab_size=29)
    reference = MixtralSparseMoeBlock(hf_config).eval()
    ours = build_layer(num_experts=num_experts, top_k=top_k, expert="swiglu", expert_hidden_size=hidden).eval()
    with torch.no_grad():
        reference.gate.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ours.experts):
            reference.experts.gate_up_proj[e].copy_(torch.cat([expert.gate.weight, expert.up.weight]))
            reference.experts.down_proj[e].copy_(expert.down.weight)
        x = random_input()
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
    assert len(torch.unique(ours.last.routing.expert_index)) == num_experts  # every expert was exercised


def test_top_k_equal_to_num_experts_is_the_dense_softmax_mixture():
    layer = build_layer(num_experts=4, top_k=4, expert="gelu", expert_hidden_size=16)
    x = random_input()
    with torch.no_grad():
        probs = torch.softmax(layer.router(x), dim=-1)  # (B, T, N)
        mixture = sum(probs[..., e, None] * expert(x) for e, expert in enumerate(layer.experts))
        torch.testing.assert_close(layer(x), mixture, rtol=1e-5, atol=1e-6)


def test_raw_weights_are_the_router_probabilities_for_top_1():
    logits = torch.randn(10, 4, generator=torch.Generator().manual_seed(0))
    routing = route(logits, top_k=1, normalize_weights=False)
    torch.testing.assert_close(routing.weight[:, 0], torch.softmax(logits, -1).max(-1).values)
    assert torch.equal(route(logits, top_k=1).weight, torch.ones(10, 1))  # renormalised top-1 is always 1


# ------------------------------------------------------------------------------------------------
# Auxiliary losses
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_experts,top_k", [(4, 1), (8, 2), (6, 3)])
def test_balancing_loss_equals_hugging_face_load_balancing_loss_func(num_experts, top_k):
    require("transformers")
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    logits = 2.0 * torch.randn(50, num_experts, generator=torch.Generator().manual_seed(top_k))
    routing = route(logits, top_k)
    ours = load_balancing_loss(routing.probs, routing.expert_index)
    torch.testing.assert_close(ours, load_balancing_loss_func((logits,), num_experts, top_k), rtol=1e-6, atol=1e-6)


def test_balancing_loss_is_k_when_uniform_and_n_k_when_collapsed():
    num_experts, top_k = 4, 2
    uniform = route(torch.zeros(8, num_experts), top_k)  # P_e = 1/N: the loss is k whatever the choices
    assert load_balancing_loss(uniform.probs, uniform.expert_index).item() == pytest.approx(top_k)
    cycled = torch.tensor([[0, 1], [2, 3]] * 4)  # f_e = 1/2 each, with P_e = 1/4: the balanced value k
    assert load_balancing_loss(torch.full((8, 4), 0.25), cycled).item() == pytest.approx(top_k)
    collapsed = torch.zeros(8, num_experts)
    collapsed[:, :top_k] = 30.0  # every token sends half its probability to each of experts 0 and 1
    routing = route(collapsed, top_k)
    assert load_balancing_loss(routing.probs, routing.expert_index).item() == pytest.approx(num_experts, rel=1e-6)


def test_router_z_loss_by_hand():
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])  # logsumexp = log(1 + 3) = log 4
    assert router_z_loss(logits).item() == pytest.approx(math.log(4) ** 2)


def test_auxiliary_losses_reach_the_gradient_as_if_added_to_the_loss():
    settings = dict(num_experts=4, top_k=2, expert="gelu", expert_hidden_size=16, balance_coefficient=0.3,
                    z_loss_coefficient=0.05)
    x = random_input()
    layer = build_layer(std=0.1, **settings).train()
    layer(x).square().mean().backward()  # the layer adds its auxiliary losses to this backward pass itself
    with_hook = layer.router.weight.grad.clone()

    layer.zero_grad()
    layer.eval()  # same routing; in eval mode nothing is added, so add the losses by hand
    output = layer(x)
    explicit = output.square().mean() + 0.3 * layer.last.balance_loss + 0.05 * layer.last.z_loss
    explicit.backward()
    torch.testing.assert_close(with_hook, layer.router.weight.grad, rtol=1e-5, atol=1e-7)

    layer.zero_grad()
    layer(x).square().mean().backward()  # still in eval mode: the task loss alone gives another gradient
    assert not torch.allclose(with_hook, layer.router.weight.grad, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Capacity and token dropping
# ------------------------------------------------------------------------------------------------

def test_capacity_is_ceil_of_factor_times_k_t_over_n():
    assert expert_capacity(10, 4, 1, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(12, 4, 2, 1.25) == 8  # ceil(7.5)
    assert expert_capacity(0, 4, 2, 2.0) == 0


def test_capacity_mask_by_hand_first_choices_before_second_choices():
    # One expert, top-1: first come first served.
    assert capacity_mask(torch.tensor([[0], [0], [1], [0], [0]]), 2, 2).squeeze(1).tolist() == [
        True, True, True, False, False]
    # Expert 0's queue: token 1 (rank 0), token 2 (rank 0), token 0 (rank 1): token 0's second choice is the one
    # dropped, although token 0 comes first (taken token by token, token 2's first choice would be dropped).
    index = torch.tensor([[1, 0], [0, 2], [0, 1]])
    assert capacity_mask(index, 3, 2).tolist() == [[True, False], [True, True], [True, True]]
    index = torch.tensor([[1, 0], [1, 0], [1, 0]])  # expert 1 takes the first two first choices only
    assert capacity_mask(index, 2, 2).tolist() == [[True, True], [True, True], [False, False]]


def brute_force_capacity_mask(expert_index, num_experts, capacity):
    """The rule read literally: walk rank by rank, token by token, each expert counting what it has taken."""
    T, k = expert_index.shape
    taken = [0] * num_experts
    kept = torch.zeros(T, k, dtype=torch.bool)
    for rank in range(k):
        for t in range(T):
            e = int(expert_index[t, rank])
            if taken[e] < capacity:
                kept[t, rank] = True
                taken[e] += 1
    return kept


@pytest.mark.parametrize("top_k,capacity", [(1, 3), (2, 5), (3, 4), (2, 0)])
def test_capacity_mask_equals_the_rule_walked_by_hand(top_k, capacity):
    logits = torch.randn(40, 6, generator=torch.Generator().manual_seed(capacity))
    index = route(logits, top_k).expert_index
    assert torch.equal(capacity_mask(index, 6, capacity), brute_force_capacity_mask(index, 6, capacity))


def test_dropped_assignments_add_nothing_and_are_counted():
    layer = build_layer(num_experts=4, top_k=2, expert="gelu", expert_hidden_size=16, capacity_factor=0.5).eval()
    x = random_input()
    tokens = x.reshape(-1, 32)
    with torch.no_grad():
        output = layer(x).reshape(-1, 32)
        routing = layer.last.routing
        assert layer.last.capacity == math.ceil(0.5 * 2 * 21 / 4)
        assert 0 < int((~routing.kept).sum()) == int(layer.dropped_assignments)
        expected = torch.zeros_like(tokens)
        for t in range(tokens.shape[0]):
            for rank in range(2):
                if routing.kept[t, rank]:
                    e = int(routing.expert_index[t, rank])
                    expected[t] += routing.weight[t, rank] * layer.experts[e](tokens[t:t + 1])[0]
        torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
        assert (layer.assignments_per_expert <= layer.last.capacity).all()


def test_a_large_capacity_factor_drops_nothing_and_changes_nothing():
    unlimited = build_layer(num_experts=4, top_k=2).eval()
    limited = build_layer(num_experts=4, top_k=2, capacity_factor=4.0).eval()  # C = k T: every assignment fits
    x = random_input()
    with torch.no_grad():
        torch.testing.assert_close(limited(x), unlimited(x))
    assert int(limited.dropped_assignments) == 0


# ------------------------------------------------------------------------------------------------
# Utilisation, parameters, FLOPs
# ------------------------------------------------------------------------------------------------

def test_utilisation_counts_every_kept_assignment_and_resets():
    layer = build_layer(num_experts=4, top_k=2)
    with torch.no_grad():
        layer(random_input())
        layer(random_input(seed=2))
    assert int(layer.assignments_per_expert.sum()) == 2 * 2 * 21
    assert layer.utilisation().sum().item() == pytest.approx(1.0)
    layer.reset_utilisation()
    assert int(layer.assignments_per_expert.sum()) == 0 and int(layer.dropped_assignments) == 0


@pytest.mark.parametrize("expert,bias", [("swiglu", False), ("gelu", False), ("gelu", True)])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_forward_flops_equal_flop_counter_mode(expert, bias, capacity_factor):
    layer = build_layer(config=tiny_config(bias=bias), num_experts=4, top_k=2, expert=expert, expert_hidden_size=24,
                        capacity_factor=capacity_factor)
    x = random_input()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        layer(x)
    kept = int(layer.last.routing.kept.sum())
    assert counter.get_total_flops() == forward_flops(layer, 21, kept)
    if capacity_factor is None and not bias:  # then 2 FLOPs per active weight per token
        assert counter.get_total_flops() == 2 * 21 * active_parameters(layer)


def test_parameter_counts_by_hand():
    layer = build_layer(num_experts=8, top_k=2, expert="swiglu", expert_hidden_size=24)  # bias-free
    expert = 3 * 32 * 24
    assert active_parameters(layer) == 32 * 8 + 2 * expert
    assert total_parameters(layer) == 32 * 8 + 8 * expert


# ------------------------------------------------------------------------------------------------
# Plugging into 04
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def moe_name():
    name = register_moe(num_experts=4, top_k=2, expert="gelu", expert_hidden_size=16)
    yield name
    unregister("ffn", name)


def test_plugs_into_miniformer_with_depth_scaled_expert_outputs(moe_name):
    torch.manual_seed(0)
    config = tiny_config(ffn=moe_name, num_layers=8)
    model = MiniFormer(config)
    layers = moe_layers(model)
    assert len(layers) == 8
    downs = torch.cat([expert.down.weight.flatten() for layer in layers for expert in layer.experts])
    ups = torch.cat([expert.up.weight.flatten() for layer in layers for expert in layer.experts])
    assert downs.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)  # mark_residual_projection
    assert ups.std().item() == pytest.approx(0.02, rel=0.05)
    ids = torch.randint(0, 29, (2, 16), generator=torch.Generator().manual_seed(0))
    assert model(ids).shape == (2, 16, 29)
    assert model_active_parameters(model) == model.num_parameters() - 8 * 2 * (2 * 32 * 16)
    reset_utilisation(model)
    assert all(int(layer.assignments_per_expert.sum()) == 0 for layer in layers)


def test_00_utils_train_loop_trains_the_router_with_the_auxiliary_losses_and_records_pure_cross_entropy():
    """One step of the shared training loop, unchanged: the auxiliary losses change the router's update only."""
    from training import TrainConfig, train

    ids = torch.randint(0, 29, (4, 17), generator=torch.Generator().manual_seed(0))
    models, histories = [], []
    for coefficient in (0.0, 1.0):
        name = register_moe(num_experts=4, top_k=2, expert="gelu", expert_hidden_size=16,
                            balance_coefficient=coefficient, z_loss_coefficient=coefficient)
        try:
            torch.manual_seed(0)
            model = MiniFormer(tiny_config(ffn=name))
        finally:
            unregister("ffn", name)
        config = TrainConfig(steps=1, warmup_steps=0, eval_interval=1, eval_batches=1, progress=False, grad_clip=None)
        histories.append(train(model, lambda split: (ids[:, :-1], ids[:, 1:]), config))
        models.append(model)
    assert histories[0].train_loss == histories[1].train_loss  # the recorded loss is the cross-entropy alone
    last_without, last_with = moe_layers(models[0])[-1], moe_layers(models[1])[-1]
    assert not torch.allclose(last_without.router.weight, last_with.router.weight)
    for expert_without, expert_with in zip(last_without.experts, last_with.experts):  # no auxiliary gradient here
        assert torch.equal(expert_without.up.weight, expert_with.up.weight)


def test_same_settings_register_one_name_and_different_settings_two():
    first, again = register_moe(top_k=1), register_moe(top_k=1)
    other = register_moe(top_k=1, capacity_factor=1.25)
    try:
        assert first == again and first != other
    finally:
        unregister("ffn", first)
        unregister("ffn", other)


# ------------------------------------------------------------------------------------------------
# Bad arguments
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings,argument", [
    (dict(num_experts=0), "num_experts"), (dict(num_experts=2.0), "num_experts"), (dict(top_k=0), "top_k"),
    (dict(num_experts=4, top_k=5), "top_k"), (dict(expert="relu"), "expert"),
    (dict(expert_hidden_size=0), "expert_hidden_size"), (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=float("nan")), "capacity_factor"), (dict(capacity_factor=float("inf")), "capacity_factor"),
    (dict(balance_coefficient=-0.1), "balance_coefficient"),
    (dict(z_loss_coefficient=float("nan")), "z_loss_coefficient"),
    (dict(normalize_weights=1), "normalize_weights"),
])
def test_bad_settings_raise_naming_the_argument(settings, argument):
    with pytest.raises(ValueError, match=argument):
        MoESettings(**settings)
    with pytest.raises(ValueError, match=argument):
        register_moe(**settings)


def test_bad_function_arguments_raise_naming_the_argument():
    with pytest.raises(ValueError, match="num_tokens"):
        expert_capacity(-1, 4, 1, 1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(8, 4, 1, -1.0)
    with pytest.raises(ValueError, match="capacity"):
        capacity_mask(torch.zeros(3, 1, dtype=torch.long), 2, -1)
    with pytest.raises(ValueError, match="top_k"):
        route(torch.zeros(3, 4), top_k=5)
    with pytest.raises(ValueError, match="logits"):
        route(torch.zeros(2, 3, 4), top_k=1)
    layer = build_layer(num_experts=4, top_k=2)
    with pytest.raises(ValueError, match="kept_assignments"):
        forward_flops(layer, 10, 21)
    with pytest.raises(ValueError, match="num_tokens"):
        forward_flops(layer, -3)
