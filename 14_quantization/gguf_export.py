"""Export the lab model to GGUF (llama.cpp's file format) with ggml's Q8_0 and Q4_0 blocks, and read it back.

ggml quantizes each row in blocks of 32 weights; a block is its scale d as float16 followed by the codes:

    Q8_0  (34 bytes, 8.5 bits/weight)   d = max|x| / 127,  q_i = roundf(x_i / d) in [-127, 127] (int8),  x_i ~ d q_i
    Q4_0  (18 bytes, 4.5 bits/weight)   m = the x with the largest |x| (sign kept),  d = m / -8,
                                        q_i = min(15, trunc(x_i / d + 8.5)) in [0, 15],  x_i ~ d (q_i - 8);
                                        byte j holds q_j in its low nibble and q_{j+16} in its high nibble.

roundf rounds halves away from zero (torch.round rounds them to even) and ggml multiplies by 1/d rather than
dividing by d; both are copied here so our blocks are byte-for-byte those of ggml (tested against gguf.quants).
The lab model is GPT-2-shaped (learned positions, pre-LayerNorm, GELU, tied head), so the file uses the
"gpt2" architecture's tensor names and metadata keys; the character vocabulary is stored as text.

Contents: round_half_away_from_zero, q8_0_blocks, q4_0_blocks, dequantize_blocks, GGMLTensor,
ggml_quantize, quantize_model_ggml, gguf_tensor_names, export_gguf, load_gguf.
"""

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn as nn

from lab import lab_model_config
from quantized_model import QuantizedLinear, linear_layers
from transformer import MiniFormer

BLOCK = 32  # weights per ggml block, for both formats
QTYPES = ("Q8_0", "Q4_0")
FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
              "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}


def round_half_away_from_zero(x: torch.Tensor) -> torch.Tensor:
    """C's roundf: sign(x) (floor|x| + floor(2 frac|x|)); exact in floating point, unlike floor(|x| + 0.5)."""
    magnitude = x.abs()
    whole = magnitude.floor()
    return x.sign() * (whole + (2 * (magnitude - whole)).floor())


def _blocks_of(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2 or weight.shape[1] % BLOCK:
        raise ValueError(f"ggml blocks need a 2-D weight whose row length is divisible by {BLOCK}, got shape "
                         f"{tuple(weight.shape)}")
    return weight.detach().float().reshape(-1, BLOCK)  # (blocks, 32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """1 / d, and 0 where d is 0 (an all-zero block gets all-zero codes)."""
    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def q8_0_blocks(weight: torch.Tensor) -> torch.Tensor:
    """weight (rows, cols) -> Q8_0 bytes (rows, cols / 32 * 34) uint8."""
    blocks = _blocks_of(weight)
    d = blocks.abs().amax(dim=1, keepdim=True) / 127  # (blocks, 1) float32
    codes = round_half_away_from_zero(blocks * _inverse(d)).to(torch.int8)  # (blocks, 32)
    packed = torch.cat([d.half().view(torch.uint8), codes.view(torch.uint8)], dim=1)  # (blocks, 2 + 32)
    return packed.reshape(weight.shape[0], -1)


def q4_0_blocks(weight: torch.Tensor) -> torch.Tensor:
    """weight (rows, cols) -> Q4_0 bytes (rows, cols / 32 * 18) uint8."""
    blocks = _blocks_of(weight)
    largest = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # (blocks, 1), sign kept, first on ties
    d = largest / -8
    codes = torch.trunc(blocks * _inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)  # (blocks, 32)
    nibbles = codes[:, :BLOCK // 2] | (codes[:, BLOCK // 2:] << 4)  # (blocks, 16)
    packed = torch.cat([d.half().view(torch.uint8), nibbles], dim=1)  # (blocks, 2 + 16)
    return packed.reshape(weight.shape[0], -1)


def dequantize_blocks(data: torch.Tensor, qtype: str) -> torch.Tensor:
    """Q8_0 / Q4_0 bytes (rows, row_bytes) -> float32 weights (rows, cols)."""
    block_bytes = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2}[qtype]
    blocks = data.reshape(-1, block_bytes)
    d = blocks[:, :2].contiguous().view(torch.float16).float()  # (blocks, 1)
    if qtype == "Q8_0":
        codes = blocks[:, 2:].contiguous().view(torch.int8).float()
    else:
        nibbles = blocks[:, 2:]
        codes = torch.cat([nibbles & 0x0F, nibbles >> 4], dim=1).float() - 8  # (blocks, 32)
    return (d * codes).reshape(data.shape[0], -1)


@dataclass
class GGMLTensor:
    """A weight held as ggml blocks (the bytes a GGUF file stores); QuantizedLinear runs it."""

    blocks: torch.Tensor  # (rows, row_bytes) uint8
    qtype: str  # "Q8_0" | "Q4_0"
    shape: tuple

    def dequantize(self) -> torch.Tensor:
        return dequantize_blocks(self.blocks, self.qtype)

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    def apply(self, fn) -> "GGMLTensor":
        return replace(self, blocks=fn(self.blocks))


def ggml_quantize(weight: torch.Tensor, qtype: str) -> GGMLTensor:
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    blocks = q8_0_blocks(weight) if qtype == "Q8_0" else q4_0_blocks(weight)
    return GGMLTensor(blocks, qtype, tuple(weight.shape))


@torch.no_grad()
def quantize_model_ggml(model: nn.Module, qtype: str, skip=("head",)) -> nn.Module:
    """A copy of `model` whose linear layers (except `skip`) hold Q8_0 / Q4_0 blocks."""
    quantized_model = copy.deepcopy(model)
    for parent, attribute, _, linear in linear_layers(quantized_model, skip):
        setattr(parent, attribute, QuantizedLinear(ggml_quantize(linear.weight, qtype), linear.bias))
    return quantized_model


def gguf_tensor_names(num_layers: int) -> dict:
    """{our state_dict name: GGUF name} for the lab model (gguf's names for the gpt2 architecture)."""
    names = {"token_embedding.weight": "token_embd.weight", "position_embedding.weight": "position_embd.weight",
             "final_norm.weight": "output_norm.weight", "final_norm.bias": "output_norm.bias"}
    parts = {"norm1": "attn_norm", "attn.qkv": "attn_qkv", "attn.out": "attn_output", "norm2": "ffn_norm",
             "ffn.up": "ffn_up", "ffn.down": "ffn_down"}
    for layer in range(num_layers):
        for ours, theirs in parts.items():
            for kind in ("weight", "bias"):
                names[f"blocks.{layer}.{ours}.{kind}"] = f"blk.{layer}.{theirs}.{kind}"
    return names


def _check_exportable(model: MiniFormer) -> None:
    config = model.config
    gpt2_shaped = (config.position == "learned" and config.norm == "layernorm" and config.ffn == "gelu"
                   and config.norm_placement == "pre" and config.tie_weights and config.bias
                   and config.attention_module == "causal" and config.kv_heads == config.num_heads)
    if not gpt2_shaped:
        raise ValueError("export_gguf writes the GPT-2-shaped lab model (learned positions, pre-LayerNorm, GELU, "
                         "tied head, biases, plain multi-head attention); this model's config differs")


def export_gguf(model: MiniFormer, path, qtype: str = "Q8_0", chars=None) -> Path:
    """Write `model` to a GGUF file: block linear weights as `qtype` ("F32" | "Q8_0" | "Q4_0"), every other
    tensor F32. `chars`, the character vocabulary, is stored under llm_lab.chars. Returns the path."""
    if qtype not in FILE_TYPES:
        raise ValueError(f"qtype must be one of {tuple(FILE_TYPES)}, got {qtype!r}")
    _check_exportable(model)
    config, path = model.config, Path(path)
    writer = gguf.GGUFWriter(path, "gpt2")
    writer.add_name("llm-lab miniformer")
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.embed_dim)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.resolved_ffn_hidden_size)
    writer.add_head_count(config.num_heads)
    writer.add_layer_norm_eps(config.norm_eps)
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_uint32("llm_lab.vocab_size", config.vocab_size)
    if chars is not None:
        writer.add_string("llm_lab.chars", json.dumps(list(chars)))
    names = gguf_tensor_names(config.num_layers)
    quantized = {f"{name}.weight" for _, _, name, _ in linear_layers(model, ("head",))} if qtype != "F32" else set()
    for name, tensor in model.state_dict().items():
        if name == "head.weight":  # tied to token_embd: llama.cpp's gpt2 reuses it when output.weight is absent
            continue
        if name in quantized:
            raw_type = getattr(gguf.GGMLQuantizationType, qtype)
            writer.add_tensor(names[name], ggml_quantize(tensor, qtype).blocks.cpu().numpy(), raw_dtype=raw_type)
        else:
            writer.add_tensor(names[name], tensor.detach().float().cpu().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_gguf(path) -> tuple:
    """Read a file written by export_gguf with gguf's own reader (and gguf.quants to dequantize):
    -> (MiniFormer with the file's weights, in eval mode, metadata dict)."""
    reader = gguf.GGUFReader(path)
    value = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    if value.get("general.architecture") != "gpt2" or "llm_lab.vocab_size" not in value:
        raise ValueError(f"{path} is not an LLM Lab GGUF export (architecture {value.get('general.architecture')!r})")
    config = lab_model_config(value["llm_lab.vocab_size"], context_length=value["gpt2.context_length"],
                              num_layers=value["gpt2.block_count"], num_heads=value["gpt2.attention.head_count"],
                              embed_dim=value["gpt2.embedding_length"],
                              ffn_hidden_size=value["gpt2.feed_forward_length"],
                              norm_eps=value["gpt2.attention.layer_norm_epsilon"])
    model = MiniFormer(config)
    ours = {theirs: name for name, theirs in gguf_tensor_names(config.num_layers).items()}
    state = {}
    for tensor in reader.tensors:
        weights = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # (rows, cols) float32, numpy order
        state[ours[tensor.name]] = torch.from_numpy(np.array(weights, dtype=np.float32))  # a writable copy
    state["head.weight"] = state["token_embedding.weight"]
    model.load_state_dict(state)
    metadata = {"file_type": value.get("general.file_type"), "chars": json.loads(value["llm_lab.chars"])
                if "llm_lab.chars" in value else None, "tensor_types": {t.name: t.tensor_type.name for t in reader.tensors}}
    return model.eval(), metadata
