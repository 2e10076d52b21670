"""Benchmark: our cached greedy decode against Hugging Face generate, and against the memory roofline.

Setup (fixed): GPT-2-small shape (12 layers, 12 heads, 768 dims, vocab 50257), random weights, batch 1,
float32, a 4-token prompt, 200 greedy tokens, one process. Ours = 04's MiniFormer.generate with a
PreallocatedKVCache, on the same weights (converted with 04's hf_interop); HF = GPT2LMHeadModel.generate
(use_cache=True, do_sample=False). Both must produce the same tokens.

Roofline: at batch 1 every decode step reads every weight once, so

    tokens/s  <=  read bandwidth (bytes/s) / weight bytes per token

with the bandwidth measured here by summing a tensor much larger than the caches. Targets: >= 1.2x HF's
tokens/s, and >= 50% of the roofline. Writes results_benchmark.json beside this file (or --out).

    python 06_kv_cache/benchmark_hf.py [--tokens 200] [--repeats 3] [--device cpu] [--out DIR]

Contents: read_bandwidth, weight_bytes_per_token, time_decode, time_shares, main.
"""

import pathlib, sys
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "00_utils"))
import lab_paths  # noqa: E402,F401  (puts every NN_topic folder on sys.path)

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from cache import PreallocatedKVCache  # noqa: E402
from results import write_results  # noqa: E402
from runtime import pick_device, synchronize  # noqa: E402

TARGET_SPEED_RATIO = 1.2  # ours / HF tokens per second
TARGET_ROOFLINE_FRACTION = 0.5  # ours / roofline tokens per second


def read_bandwidth(device, megabytes: int = 512, repeats: int = 5) -> float:
    """Best-of-`repeats` read bandwidth in bytes/s: time to sum a float32 tensor of `megabytes` MB
    (far larger than the CPU caches, so it streams from memory)."""
    x = torch.ones(megabytes * 2**20 // 4, device=device)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up (page faults, kernel launch)
        synchronize(device)
        start = time.perf_counter()
        x.sum()
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def weight_bytes_per_token(model) -> int:
    """Bytes one batch-1 decode step must read: every parameter once (a tied head counts once, since the
    embedding lookup reads only one row), minus the position table, of which one row is read."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for parameter in model.position_parameters():
        total -= parameter.numel() * parameter.element_size() - parameter[0].numel() * parameter.element_size()
    return total


def time_decode(generate, device) -> tuple:
    """(tokens, seconds) of one call of generate()."""
    synchronize(device)
    start = time.perf_counter()
    tokens = generate()
    synchronize(device)
    return tokens, time.perf_counter() - start


def time_shares(generate) -> dict:
    """Share of CPU self time per kind of operator in one generate() call (torch.profiler): where a decode
    step's time goes. Weight products = aten::addmm + aten::mm (the matrix-vector products that read every
    weight); attention = scaled_dot_product_attention and its kernels."""
    from torch.profiler import profile

    with profile() as profiler:
        generate()
    totals = {"weight_products": 0.0, "attention": 0.0, "other": 0.0}
    for event in profiler.key_averages():
        kind = ("weight_products" if event.key in ("aten::addmm", "aten::mm")
                else "attention" if "scaled_dot_product" in event.key else "other")
        totals[kind] += event.self_cpu_time_total
    whole = sum(totals.values())
    return {kind: value / whole for kind, value in totals.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200, help="greedy tokens to generate")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each (alternating), median kept")
    parser.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).resolve().parent)
    args = parser.parse_args()
    if args.tokens < 1 or args.repeats < 1:
        raise ValueError(f"--tokens and --repeats must be >= 1, got {args.tokens}, {args.repeats}")
    import transformers  # the peer this script compares against

    from hf_interop import miniformer_from_hf_gpt2

    device = pick_device(args.device)
    torch.manual_seed(0)
    hf_model = transformers.GPT2LMHeadModel(transformers.GPT2Config()).to(device).eval()  # GPT-2 small shape
    hf_model.generation_config.eos_token_id = None  # random weights: never stop early
    hf_model.generation_config.pad_token_id = 0
    ours = miniformer_from_hf_gpt2(hf_model)
    prompt = torch.randint(0, hf_model.config.vocab_size, (1, 4), device=device)
    capacity = prompt.shape[1] + args.tokens

    def run_ours():
        return ours.generate(prompt, args.tokens, temperature=0, cache_factory=lambda: PreallocatedKVCache(capacity))

    def run_hf():
        return hf_model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                 do_sample=False, use_cache=True)

    with torch.no_grad():
        ours_tokens, _ = time_decode(run_ours, device)  # warm-up runs, also the equality check
        hf_tokens, _ = time_decode(run_hf, device)
        same_tokens = bool(torch.equal(ours_tokens, hf_tokens))
        seconds = {"ours": [], "hf": []}
        for _ in range(args.repeats):  # alternate, so a burst of load on shared cores hits both
            seconds["ours"].append(time_decode(run_ours, device)[1])
            seconds["hf"].append(time_decode(run_hf, device)[1])
        shares = time_shares(run_ours) if device.type == "cpu" else None  # CPU self time only
    bandwidth = read_bandwidth(device)
    bytes_per_token = weight_bytes_per_token(ours)
    roofline = bandwidth / bytes_per_token
    speed = {name: args.tokens / statistics.median(values) for name, values in seconds.items()}
    ratio, fraction = speed["ours"] / speed["hf"], speed["ours"] / roofline
    results = {
        "setup": {"model": "GPT-2 small shape, random weights", "parameters": ours.num_parameters(),
                  "batch": 1, "dtype": "float32", "prompt_tokens": prompt.shape[1], "new_tokens": args.tokens,
                  "repeats": args.repeats, "transformers": transformers.__version__},
        "same_tokens": same_tokens, "seconds": seconds, "tokens_per_second": speed,
        "ours_over_hf": ratio, "read_bandwidth_GBps": bandwidth / 1e9, "weight_bytes_per_token": bytes_per_token,
        "roofline_tokens_per_second": roofline, "fraction_of_roofline": fraction,
        "ms_per_token": {name: 1000 / value for name, value in speed.items()},
        "roofline_ms_per_token": 1000 / roofline, "ours_time_shares": shares,
        "verdicts": {
            "faster_than_hf": {"verdict": "holds" if ratio >= TARGET_SPEED_RATIO else "fails",
                               "rule": f"holds if ours / HF tokens per second >= {TARGET_SPEED_RATIO}", "value": ratio},
            "near_the_roofline": {"verdict": "holds" if fraction >= TARGET_ROOFLINE_FRACTION else "fails",
                                  "rule": f"holds if ours reaches >= {TARGET_ROOFLINE_FRACTION:.0%} of the "
                                          f"bandwidth roofline", "value": fraction}},
    }
    print(f"GPT-2 small shape, batch 1, float32, {args.tokens} greedy tokens on {device}; same tokens: {same_tokens}")
    print(f"  ours  {speed['ours']:7.2f} tokens/s   ({1000 / speed['ours']:.1f} ms/token)")
    print(f"  HF    {speed['hf']:7.2f} tokens/s   ({1000 / speed['hf']:.1f} ms/token)   ours / HF = {ratio:.2f}")
    print(f"  roofline {roofline:.2f} tokens/s = {bandwidth / 1e9:.1f} GB/s read / {bytes_per_token / 1e6:.0f} MB "
          f"per token; ours reaches {fraction:.0%} of it")
    if shares:
        print("  where our decode's CPU time goes: " + ", ".join(f"{k} {v:.0%}" for k, v in shares.items()))
    for name, verdict in results["verdicts"].items():
        print(f"  verdict {name}: {verdict['verdict']} ({verdict['rule']}; measured {verdict['value']:.2f})")
    path = write_results(args.out / "results_benchmark.json", results, device, topic="06_kv_cache")
    print(f"  written {path}")


if __name__ == "__main__":
    main()
