"""Export to transformers: the same logits as our model, and Hugging Face generate() on the same weights."""

import pytest
import torch

from hf_export import hf_gpt2_from_miniformer
from hf_interop import miniformer_from_hf_gpt2
from inference import external_engines, hf_generate, naive_generate
from sampler import SamplingConfig
from testing import require
from transformer import MiniFormer, TransformerConfig

transformers = require("transformers")


def lab_shaped(**overrides) -> MiniFormer:
    torch.manual_seed(0)
    settings = dict(vocab_size=65, context_length=32, num_layers=3, num_heads=4, embed_dim=64)
    settings.update(overrides)
    model = MiniFormer(TransformerConfig(**settings)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from the init so every tensor matters
            parameter.add_(0.05 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("overrides", [{}, {"tie_weights": False}, {"gelu_approximate": "tanh"},
                                       {"ffn_hidden_size": 96}])
def test_exported_gpt2_gives_the_same_logits(overrides):
    model = lab_shaped(**overrides)
    hf_model = hf_gpt2_from_miniformer(model)
    assert isinstance(hf_model, transformers.GPT2LMHeadModel)
    tokens = torch.randint(0, 65, (3, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(tokens).logits, model(tokens), rtol=1e-5, atol=1e-5)


def test_round_trip_through_04s_import_is_the_identity():
    model = lab_shaped()
    back = miniformer_from_hf_gpt2(hf_gpt2_from_miniformer(model))
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0, msg=name)


def test_hf_generate_greedy_equals_the_naive_loop():
    model = lab_shaped()
    hf_model = hf_gpt2_from_miniformer(model)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    greedy = SamplingConfig(temperature=0)
    assert hf_generate(hf_model, prompt, 20, greedy) == naive_generate(model, prompt, 20, greedy)
    sampled = hf_generate(hf_model, prompt, 20, SamplingConfig(temperature=0.8, top_k=10), seed=4)
    assert len(sampled) == 20 and sampled == hf_generate(hf_model, prompt, 20, SamplingConfig(temperature=0.8,
                                                                                              top_k=10), seed=4)


@pytest.mark.parametrize("overrides, field", [({"position": "rope"}, "position"), ({"norm": "rmsnorm"}, "norm"),
                                              ({"ffn": "swiglu"}, "ffn"), ({"num_kv_heads": 2}, "num_kv_heads"),
                                              ({"bias": False}, "bias")])
def test_models_gpt2_cannot_express_are_refused_by_name(overrides, field):
    with pytest.raises(ValueError, match=field):
        hf_gpt2_from_miniformer(lab_shaped(**overrides))


def test_external_engines_report_why_they_are_skipped():
    report = external_engines()
    assert set(report) == {"vllm", "exllamav2", "llama_cpp"}
    for name, message in report.items():
        assert message is None or "not installed" in message
