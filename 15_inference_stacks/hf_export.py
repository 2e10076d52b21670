"""Export: a GPT-2-shaped MiniFormer as a transformers GPT2LMHeadModel with the same weights.

The reverse of 04's hf_interop.miniformer_from_hf_gpt2, so Hugging Face's own `generate` can run the lab
model: same configuration fields, the same tensors renamed, and nn.Linear's (out, in) weights transposed
into GPT-2's Conv1D (in, out) layout. Loading is strict: a missing or left-over tensor is an error.

Contents: hf_gpt2_from_miniformer.
"""

import torch

from transformer import MiniFormer

_GPT2_SHAPE = {"position": "learned", "norm": "layernorm", "ffn": "gelu", "norm_placement": "pre", "bias": True,
               "residual": True}


def hf_gpt2_from_miniformer(model: MiniFormer):
    """A transformers GPT2LMHeadModel (eval mode, same device and dtype) computing the same logits as `model`.

    The model must have GPT-2's shape: learned positions, pre-norm LayerNorm, GELU MLP, biases, residuals,
    as many KV heads as query heads. transformers is imported here, so the rest of 15 runs without it.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    for name, wanted in _GPT2_SHAPE.items():
        if getattr(config, name) != wanted:
            raise ValueError(f"GPT-2 export needs {name}={wanted!r}, got {getattr(config, name)!r}")
    if config.kv_heads != config.num_heads:
        raise ValueError(f"GPT-2 export needs num_kv_heads = num_heads ({config.num_heads}), got {config.kv_heads}")
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.embed_dim,
        n_layer=config.num_layers, n_head=config.num_heads, n_inner=config.resolved_ffn_hidden_size,
        activation_function="gelu" if config.gelu_approximate == "none" else "gelu_new",
        layer_norm_epsilon=config.norm_eps, tie_word_embeddings=config.tie_weights,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    reference = next(model.parameters())
    hf_model = GPT2LMHeadModel(hf_config).to(device=reference.device, dtype=reference.dtype)
    source = model.state_dict()
    (position_name,) = [name for name, _ in model.named_parameters() if name.startswith("position_embedding.")]
    target = {"transformer.wte.weight": source["token_embedding.weight"],
              "transformer.wpe.weight": source[position_name],
              "transformer.ln_f.weight": source["final_norm.weight"],
              "transformer.ln_f.bias": source["final_norm.bias"],
              "lm_head.weight": source["head.weight"]}
    linear_pairs = {"attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}
    for i in range(config.num_layers):
        hf_prefix = f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            target[hf_prefix + theirs + ".weight"] = source[f"blocks.{i}.{ours}.weight"]
            target[hf_prefix + theirs + ".bias"] = source[f"blocks.{i}.{ours}.bias"]
        for ours, theirs in linear_pairs.items():
            target[hf_prefix + theirs + ".weight"] = source[f"blocks.{i}.{ours}.weight"].t()  # Conv1D is (in, out)
            target[hf_prefix + theirs + ".bias"] = source[f"blocks.{i}.{ours}.bias"]
    expected = set(hf_model.state_dict())
    if set(target) != expected:
        raise ValueError(f"tensor names disagree with GPT2LMHeadModel: missing {sorted(expected - set(target))}, "
                         f"left over {sorted(set(target) - expected)}")
    with torch.no_grad():
        hf_model.load_state_dict({name: tensor.contiguous() for name, tensor in target.items()}, strict=True)
    return hf_model.eval()
