"""Tests of the GGUF export: our Q8_0 / Q4_0 blocks are byte-identical to gguf.quants (the reference Python
port of ggml) on the same weights, including halves, ties and all-zero blocks; our decoder equals gguf's; a
model written to GGUF and read back by gguf's own reader equals our quantized model exactly."""

import numpy as np
import pytest
import torch

from testing import require

gguf = require("gguf")
from gguf_export import (QTYPES, dequantize_blocks, export_gguf, ggml_quantize, load_gguf,  # noqa: E402
                         quantize_model_ggml, round_half_away_from_zero)
from transformer import MiniFormer, TransformerConfig  # noqa: E402


def awkward_weight():
    """Normal weights plus the cases that break a careless port: exact halves, ties for the largest |x|
    (with opposite signs), an all-zero block, tiny values."""
    weight = torch.randn(6, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[1, :32] = torch.arange(32) - 15.5  # every code lands on x.5 before rounding
    weight[2, :32] = 0.0
    weight[3, 32:64] = torch.tensor([0.25, -0.25] * 16)
    weight[4, 64:96] *= 1e-6
    return weight


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("make", [awkward_weight, lambda: torch.randn(64, 256, generator=torch.Generator().manual_seed(7))])
def test_blocks_are_byte_identical_to_gguf_quants(qtype, make):
    weight = make()
    ours = ggml_quantize(weight, qtype).blocks.numpy()
    reference = gguf.quants.quantize(weight.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    assert ours.dtype == reference.dtype == np.uint8 and ours.shape == reference.shape
    assert np.array_equal(ours, reference)
    ours_decoded = dequantize_blocks(torch.from_numpy(reference), qtype).numpy()
    assert np.array_equal(ours_decoded, gguf.quants.dequantize(reference, getattr(gguf.GGMLQuantizationType, qtype)))


def test_round_half_away_from_zero_by_hand():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, 2.4])
    assert round_half_away_from_zero(x).tolist() == [1, 2, 3, -1, -3, 0, 2]
    assert torch.round(x[:3]).tolist() == [0, 2, 2]  # torch rounds halves to even: not ggml's rule


def test_block_sizes():
    weight = torch.randn(4, 64)
    assert ggml_quantize(weight, "Q8_0").nbytes == 4 * 2 * 34
    assert ggml_quantize(weight, "Q4_0").nbytes == 4 * 2 * 18


def tiny_model():
    torch.manual_seed(0)
    return MiniFormer(TransformerConfig(vocab_size=31, context_length=16, num_layers=2, num_heads=2,
                                        embed_dim=32)).eval()


@pytest.mark.parametrize("qtype", ["F32", *QTYPES])
def test_gguf_file_read_back_by_gguf_equals_our_model(qtype, tmp_path):
    model = tiny_model()
    path = export_gguf(model, tmp_path / f"lab-{qtype}.gguf", qtype, chars=[chr(65 + i) for i in range(31)])
    loaded, metadata = load_gguf(path)
    ours = model if qtype == "F32" else quantize_model_ggml(model, qtype)
    x = torch.randint(0, 31, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
    assert metadata["chars"][0] == "A" and metadata["tensor_types"]["blk.0.attn_qkv.weight"] == qtype
    reader = gguf.GGUFReader(path)  # the file is what gguf expects of a gpt2 model
    assert reader.fields["general.architecture"].contents() == "gpt2"
    assert {t.name for t in reader.tensors} >= {"token_embd.weight", "position_embd.weight", "blk.1.ffn_down.weight"}


def test_bad_export_arguments(tmp_path):
    with pytest.raises(ValueError, match="qtype must be one of"):
        export_gguf(tiny_model(), tmp_path / "x.gguf", "Q5_K")
    with pytest.raises(ValueError, match="divisible by 32"):
        ggml_quantize(torch.randn(4, 48), "Q8_0")
    rope = MiniFormer(TransformerConfig(vocab_size=31, context_length=16, num_layers=1, num_heads=2, embed_dim=32,
                                        position="rope"))
    with pytest.raises(ValueError, match="GPT-2-shaped"):
        export_gguf(rope, tmp_path / "y.gguf")
