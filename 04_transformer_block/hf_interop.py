"""Hugging Face interop: the same weights in MiniFormer and in transformers give the same logits.

    miniformer_from_hf_gpt2(GPT2LMHeadModel)   -> MiniFormer (learned positions, LayerNorm, GELU-tanh MLP)
    miniformer_from_hf_llama(LlamaForCausalLM) -> MiniFormer (RoPE "half" layout, RMSNorm, SwiGLU, GQA)
    load_pretrained_gpt2()                     -> GPT-2 small from the Hugging Face cache (or the internet)

Each converter maps the configuration, renames every tensor, transposes where the layouts differ, and
loads strictly, so a tensor that is missing or left over is an error rather than a silently random weight.
The converters never import transformers: the caller passes a model it built or loaded.
"""

import torch

from transformer import MiniFormer, TransformerConfig


def miniformer_from_hf_gpt2(hf_model) -> MiniFormer:
    """A MiniFormer with the configuration and weights of a transformers GPT2LMHeadModel.

    GPT-2's Conv1D layers store weights as (in, out), the transpose of nn.Linear's (out, in); its MLP uses
    gelu_new (the tanh approximation of GELU); attention q, k, v are one fused c_attn, like our qkv.
    """
    hf = hf_model.config
    if hf.activation_function not in ("gelu_new", "gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"activation_function must be gelu_new or gelu, got {hf.activation_function!r}")
    if getattr(hf, "scale_attn_by_inverse_layer_idx", False) or getattr(hf, "reorder_and_upcast_attn", False):
        raise ValueError("scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported")
    if not getattr(hf, "scale_attn_weights", True):
        raise ValueError("scale_attn_weights=False is not supported (attention is always scaled by 1/sqrt(D))")
    config = TransformerConfig(
        vocab_size=hf.vocab_size, context_length=hf.n_positions, num_layers=hf.n_layer, num_heads=hf.n_head,
        embed_dim=hf.n_embd, ffn_hidden_size=hf.n_inner, norm="layernorm", ffn="gelu", position="learned",
        norm_eps=hf.layer_norm_epsilon, bias=True, tie_weights=getattr(hf, "tie_word_embeddings", True),
        gelu_approximate="none" if hf.activation_function == "gelu" else "tanh")
    model = _empty_like(config, hf_model)
    source = hf_model.state_dict()
    target = {"token_embedding.weight": source["transformer.wte.weight"],
              "final_norm.weight": source["transformer.ln_f.weight"],
              "final_norm.bias": source["transformer.ln_f.bias"],
              "head.weight": source["lm_head.weight"]}
    (position_name,) = [name for name, _ in model.named_parameters() if name.startswith("position_embedding.")]
    target[position_name] = source["transformer.wpe.weight"]  # the name inside 02's module, whatever it is
    conv_pairs = {"attn.qkv": "attn.c_attn", "attn.out": "attn.c_proj", "ffn.up": "mlp.c_fc", "ffn.down": "mlp.c_proj"}
    for i in range(config.num_layers):
        hf_prefix = f"transformer.h.{i}."
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            target[f"blocks.{i}.{ours}.weight"] = source[hf_prefix + theirs + ".weight"]
            target[f"blocks.{i}.{ours}.bias"] = source[hf_prefix + theirs + ".bias"]
        for ours, theirs in conv_pairs.items():
            target[f"blocks.{i}.{ours}.weight"] = source[hf_prefix + theirs + ".weight"].t()  # Conv1D is (in, out)
            target[f"blocks.{i}.{ours}.bias"] = source[hf_prefix + theirs + ".bias"]
    return _load(model, target)


def miniformer_from_hf_llama(hf_model) -> MiniFormer:
    """A MiniFormer with the configuration and weights of a transformers LlamaForCausalLM.

    Llama: RMSNorm (eps from the config), RoPE with rope_theta in the "half" layout (feature i pairs with
    i + D/2), SwiGLU with the config's intermediate_size, grouped KV heads, no biases, tied or untied head.
    """
    hf = hf_model.config
    rope = getattr(hf, "rope_parameters", None) or {}  # transformers >= 5 keeps rope_theta here
    rope_theta = rope.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    rope_type = rope.get("rope_type", (getattr(hf, "rope_scaling", None) or {}).get("rope_type", "default"))
    if rope_type != "default":
        raise ValueError(f"rope_type must be 'default' (no RoPE scaling), got {rope_type!r}")
    if hf.hidden_act != "silu":
        raise ValueError(f"hidden_act must be 'silu' for SwiGLU, got {hf.hidden_act!r}")
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    if head_dim * hf.num_attention_heads != hf.hidden_size:
        raise ValueError(f"head_dim * num_attention_heads must equal hidden_size, got {head_dim} * "
                         f"{hf.num_attention_heads} != {hf.hidden_size}")
    attention_bias, mlp_bias = getattr(hf, "attention_bias", False), getattr(hf, "mlp_bias", False)
    if attention_bias != mlp_bias:
        raise ValueError(f"attention_bias and mlp_bias must be equal, got {attention_bias} and {mlp_bias}")
    config = TransformerConfig(
        vocab_size=hf.vocab_size, context_length=hf.max_position_embeddings, num_layers=hf.num_hidden_layers,
        num_heads=hf.num_attention_heads, embed_dim=hf.hidden_size, num_kv_heads=hf.num_key_value_heads,
        ffn_hidden_size=hf.intermediate_size, norm="rmsnorm", ffn="swiglu", position="rope",
        rope_base=float(rope_theta), rope_layout="half", norm_eps=hf.rms_norm_eps, bias=attention_bias,
        tie_weights=bool(getattr(hf, "tie_word_embeddings", False)))
    model = _empty_like(config, hf_model)
    source = hf_model.state_dict()
    target = {"token_embedding.weight": source["model.embed_tokens.weight"],
              "final_norm.weight": source["model.norm.weight"],
              "head.weight": source.get("lm_head.weight", source["model.embed_tokens.weight"])}
    for i in range(config.num_layers):
        hf_prefix = f"model.layers.{i}."
        names = ["weight", "bias"] if config.bias else ["weight"]
        target[f"blocks.{i}.norm1.weight"] = source[hf_prefix + "input_layernorm.weight"]
        target[f"blocks.{i}.norm2.weight"] = source[hf_prefix + "post_attention_layernorm.weight"]
        for name in names:
            target[f"blocks.{i}.attn.qkv.{name}"] = torch.cat(
                [source[hf_prefix + f"self_attn.{p}_proj.{name}"] for p in "qkv"], dim=0)
            target[f"blocks.{i}.attn.out.{name}"] = source[hf_prefix + f"self_attn.o_proj.{name}"]
            for ours, theirs in (("gate", "gate_proj"), ("up", "up_proj"), ("down", "down_proj")):
                target[f"blocks.{i}.ffn.{ours}.{name}"] = source[hf_prefix + f"mlp.{theirs}.{name}"]
    return _load(model, target)


def _empty_like(config: TransformerConfig, hf_model) -> MiniFormer:
    """MiniFormer(config) on the Hugging Face model's device and in its dtype."""
    reference = next(hf_model.parameters())
    return MiniFormer(config).to(device=reference.device, dtype=reference.dtype)


def _load(model: MiniFormer, state: dict) -> MiniFormer:
    """Load every tensor strictly (a missing or unexpected name is an error) and switch to eval mode."""
    model.load_state_dict(state, strict=True)
    return model.eval()


def load_pretrained_gpt2(download: bool = True):
    """(hf_model, encode, decode) of GPT-2 small, first from the local Hugging Face cache, then (download=True)
    by download; a RuntimeError says what to do when neither works."""
    try:
        import transformers
    except ImportError as error:
        raise RuntimeError("the transformers package is needed: pip install transformers") from error
    hf_model, errors = None, []
    for local_only in (True, False) if download else (True,):
        try:
            hf_model = transformers.GPT2LMHeadModel.from_pretrained("gpt2", local_files_only=local_only)
            break
        except OSError as error:
            errors.append(f"{'local cache' if local_only else 'download'}: {str(error).splitlines()[0]}")
    if hf_model is None:
        raise RuntimeError("GPT-2 weights are neither in the local Hugging Face cache nor downloadable ("
                           + "; ".join(errors) + "). On a machine with internet run once: python -c \"from "
                           "transformers import GPT2LMHeadModel as M; M.from_pretrained('gpt2')\" (about 550 MB "
                           "into ~/.cache/huggingface), then copy that folder here or point HF_HOME at it.")
    try:
        import tiktoken
        encoding = tiktoken.get_encoding("gpt2")
        return hf_model, encoding.encode, encoding.decode
    except Exception as tiktoken_error:  # tiktoken missing or its vocabulary file not downloadable
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained("gpt2")
            return hf_model, tokenizer.encode, tokenizer.decode
        except OSError as hf_error:
            raise RuntimeError(f"no GPT-2 tokenizer: tiktoken ({tiktoken_error}) and Hugging Face ({hf_error}). "
                               "Install tiktoken with internet access once (it caches the BPE files), or cache "
                               "the 'gpt2' tokenizer with transformers.") from hf_error
