"""Hugging Face interop for MLA: a transformers DeepseekV3ForCausalLM with dense MLPs -> a MiniFormer with MLA.

    miniformer_from_hf_deepseek_v3(hf_model) -> MiniFormer (RMSNorm, SwiGLU, RoPE, MLA from mla.py)

DeepSeek-V3's attention is DeepSeek-V2's MLA. Its RoPE layout: with rope_interleave=True (the default)
transformers rotates the feature pairs (2i, 2i+1) of q_rope and k_rope by position * w_i, which is 02's
"interleaved" layout (it writes the rotated result in the "half" order, the same permutation for q and k,
so every score q . k is unchanged); with rope_interleave=False it is the "half" layout. Only dense layers
are supported (first_k_dense_replace >= num_hidden_layers): the mixture-of-experts FFN is topic 08's.
Weights are loaded strictly, so a missing or left-over tensor is an error. transformers is never imported.
"""

from mla import register_mla
from transformer import MiniFormer, TransformerConfig


def miniformer_from_hf_deepseek_v3(hf_model) -> MiniFormer:
    """A MiniFormer with the configuration and weights of a dense transformers DeepseekV3ForCausalLM."""
    hf = hf_model.config
    if hf.first_k_dense_replace < hf.num_hidden_layers:
        raise ValueError(f"first_k_dense_replace must be >= num_hidden_layers ({hf.num_hidden_layers}) so that every "
                         f"layer has a dense MLP, got {hf.first_k_dense_replace}")
    rope = getattr(hf, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"rope_type must be 'default' (no YaRN scaling), got {rope.get('rope_type')!r}")
    if hf.hidden_act != "silu" or hf.attention_bias:
        raise ValueError(f"hidden_act must be 'silu' and attention_bias False, got {hf.hidden_act!r}, "
                         f"{hf.attention_bias}")
    name = register_mla(hf.kv_lora_rank, hf.qk_rope_head_dim, hf.q_lora_rank, hf.qk_nope_head_dim, hf.v_head_dim)
    config = TransformerConfig(
        vocab_size=hf.vocab_size, context_length=hf.max_position_embeddings, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, embed_dim=hf.hidden_size, ffn_hidden_size=hf.intermediate_size,
        norm="rmsnorm", ffn="swiglu", position="rope", rope_base=float(rope.get("rope_theta", 10000.0)),
        rope_layout="interleaved" if hf.rope_interleave else "half", norm_eps=hf.rms_norm_eps, bias=False,
        tie_weights=bool(hf.tie_word_embeddings), attention_module=name)
    reference = next(hf_model.parameters())
    model = MiniFormer(config).to(device=reference.device, dtype=reference.dtype)
    source = hf_model.state_dict()
    target = {"token_embedding.weight": source["model.embed_tokens.weight"],
              "final_norm.weight": source["model.norm.weight"],
              "head.weight": source.get("lm_head.weight", source["model.embed_tokens.weight"])}
    attention_names = {"kv_down": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "kv_up": "kv_b_proj",
                       "out": "o_proj"}
    if hf.q_lora_rank is None:
        attention_names["query"] = "q_proj"
    else:
        attention_names.update(query_down="q_a_proj", query_norm="q_a_layernorm", query_up="q_b_proj")
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        target[f"blocks.{i}.norm1.weight"] = source[prefix + "input_layernorm.weight"]
        target[f"blocks.{i}.norm2.weight"] = source[prefix + "post_attention_layernorm.weight"]
        for ours, theirs in attention_names.items():
            target[f"blocks.{i}.attn.{ours}.weight"] = source[prefix + f"self_attn.{theirs}.weight"]
        for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
            target[f"blocks.{i}.ffn.{ours}.weight"] = source[prefix + f"mlp.{theirs}.weight"]
    model.load_state_dict(target, strict=True)
    return model.eval()

