"""From a loop to a serving engine: the baselines the engine is measured against, on the same weights.

Generating n tokens for one request is n forwards; the question of this topic is how many requests a
machine can serve at once, and how fast each sees its tokens:

    throughput  = generated tokens / wall time                 (what batching raises)
    TTFT        = time from arrival to the first token         (what queueing and prefill cost)
    TPOT        = time between a request's later tokens        (what a bigger batch slows a little)

A decode step of a small model is memory- and overhead-bound: reading the weights and launching the
kernels costs about the same for 1 row as for 32, so running B requests in one forward gives up to B
times the tokens per second until the matmuls themselves dominate.

The ladder, simplest first (the engine itself is in engine.py, its paged cache in paged_cache.py):
  naive_generate          04's MiniFormer.generate, one request at a time (its growing torch.cat cache)
  static_cache_generate   the same loop with 06's PreallocatedKVCache (sized once: no copy per step)
  hf_generate             Hugging Face's generate() on the model exported by hf_export.py
  external_engines        vLLM, ExLlamaV2, llama.cpp: whether each is installed (none is here, and this
                          topic has no adapter for them: the demo reports them as skipped, with why)
"""

import importlib.util

import torch

from cache import PreallocatedKVCache
from sampler import Sampler, SamplingConfig
from transformer import MiniFormer


def _prompt_tensor(model, prompt) -> torch.Tensor:
    ids = prompt.tolist() if isinstance(prompt, torch.Tensor) else list(prompt)
    return torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)  # (1, T)


def naive_generate(model: MiniFormer, prompt, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                   seed: int = 0) -> list:
    """One request through 04's generation loop with 05's Sampler and its own seeded generator; -> new ids."""
    idx = _prompt_tensor(model, prompt)
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, Sampler(sampling, generator))
    return out[0, idx.shape[1]:].tolist()


def static_cache_generate(model: MiniFormer, prompt, max_new_tokens: int,
                          sampling: SamplingConfig = SamplingConfig(), seed: int = 0) -> list:
    """naive_generate with 06's preallocated cache of context_length slots instead of torch.cat growth."""
    idx = _prompt_tensor(model, prompt)
    generator = torch.Generator(device=idx.device).manual_seed(seed)
    capacity = model.config.context_length
    out = model.generate(idx, max_new_tokens, Sampler(sampling, generator),
                         cache_factory=lambda: PreallocatedKVCache(capacity))
    return out[0, idx.shape[1]:].tolist()


def hf_generate(hf_model, prompt, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                seed: int = 0) -> list:
    """Hugging Face generate() with the same sampling settings (its filters run in 05's order). It draws
    from torch's global generator, seeded here, so seeded samples are reproducible but not equal to ours."""
    idx = _prompt_tensor(hf_model, prompt)
    settings = dict(do_sample=not sampling.greedy, repetition_penalty=sampling.repetition_penalty)
    if not sampling.greedy:
        settings.update(temperature=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p,
                        min_p=sampling.min_p or None)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, pad_token_id=0, **settings)
    return out[0, idx.shape[1]:].tolist()


EXTERNAL_ENGINES = {"vllm": "vLLM (PagedAttention, continuous batching; needs a GPU build)",
                    "exllamav2": "ExLlamaV2 (quantized Llama kernels; needs CUDA)",
                    "llama_cpp": "llama.cpp through llama-cpp-python (GGUF files)"}


def external_engines() -> dict:
    """{package: None if importable, else the message saying why it is skipped}."""
    return {name: None if importlib.util.find_spec(name) else f"{what}: not installed, skipped"
            for name, what in EXTERNAL_ENGINES.items()}
