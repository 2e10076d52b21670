"""Smaller KV caches: fewer bytes per position (int8) or fewer positions (heavy hitters).

int8 (per token, per head, absmax):  for each cached vector x (one token, one head, D features)
    scale = max_i |x_i| / 127,   q = round(x / scale) in [-127, 127],   x_hat = q * scale
    |x - x_hat| <= scale / 2 = max|x| / 254 for every feature, and the cache shrinks from 4 bytes (float32)
    to 1 byte per element plus one scale per vector (4 / D bytes per element for float32 scales).

Heavy hitters + a recent window (H2O, Zhang et al. 2023) under a fixed budget of positions:
    score[j] = sum over every query so far of its attention weight on key j
    keep the `recent` newest positions, fill the rest of the budget with the highest scores, evict the rest.
    A few tokens collect most of the attention ("heavy hitters"), so keeping them loses less than a window.

Both follow 04's KVCache protocol and build on cache.PreallocatedKVCache (buffers sized once).
Contents: quantize_int8, dequantize_int8, Int8KVCache, HeavyHitterKVCache.
"""

import torch

from cache import PreallocatedKVCache, _check_int, check_new_entries


def quantize_int8(x: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple:
    """x (..., D) -> (q int8 (..., D), scale (..., 1)): one absmax scale per vector of the last axis."""
    x = x.to(scale_dtype)
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0  # (..., 1)
    scale = scale.clamp(min=torch.finfo(scale_dtype).tiny)  # an all-zero vector stays zero, never 0/0
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., D) int8 and scale (..., 1) -> q * scale in `dtype`."""
    return (q.to(scale.dtype) * scale).to(dtype)


class Int8KVCache(PreallocatedKVCache):
    """A preallocated cache that stores every tensor as int8 with one float scale per (token, head).

    update() quantizes the new positions once and returns the dequantized held tensors (a new tensor each
    step: the memory is saved in the cache, not in the attention's working set). Error bound per element:
    max|x| / 254 of that token and head (plus float rounding).
    """

    def __init__(self, capacity: int, scale_dtype: torch.dtype = torch.float32, device=None):
        if scale_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise ValueError(f"scale_dtype must be a floating dtype, got {scale_dtype!r}")
        super().__init__(capacity, dtype=torch.int8, device=device)
        self.scale_dtype = scale_dtype

    def _allocate(self, t: torch.Tensor, slots: int):
        shape = (t.shape[0], t.shape[1], slots, *t.shape[3:])
        device = self.device or t.device
        return (torch.empty(shape, dtype=torch.int8, device=device),  # (B, H, slots, D)
                torch.empty(*shape[:-1], 1, dtype=self.scale_dtype, device=device))  # (B, H, slots, 1)

    def _write(self, buffer, start: int, t: torch.Tensor) -> None:
        q, scale = quantize_int8(t, self.scale_dtype)
        buffer[0][:, :, start:start + t.shape[2]] = q
        buffer[1][:, :, start:start + t.shape[2]] = scale

    def _read(self, buffer, end: int, like: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(buffer[0][:, :, :end], buffer[1][:, :, :end], like.dtype)


class HeavyHitterKVCache(PreallocatedKVCache):
    """H2O: at most `budget` positions per layer, the `recent` newest plus the most-attended older ones.

    Needs the attention weights: 04's attention calls observe_attention(layer, weights (B, H, T, T_held))
    when the cache has that method. Scores are summed over batch rows and heads, so all rows and heads keep
    the same positions (one key_positions per layer, as the protocol has; H2O proper evicts per head).
    A one-token step into a full cache overwrites the lowest-scoring slot outside the recent window; a
    chunk that does not fit (a prefill) is attended in full, and reduced to the budget at advance().
    """

    evicts = True  # it never grows past its budget, so generation must not refill it

    def __init__(self, budget: int, recent: int | None = None, dtype: torch.dtype | None = None, device=None):
        _check_int("budget", budget, 1)
        recent = budget // 2 if recent is None else recent
        if isinstance(recent, bool) or not isinstance(recent, int) or not 0 <= recent <= budget:
            raise ValueError(f"recent must be an integer in [0, budget={budget}], got {recent!r}")
        super().__init__(capacity=budget, dtype=dtype, device=device)
        self.budget, self.recent = budget, recent
        self.positions: dict[int, torch.Tensor] = {}  # layer -> (budget,) absolute position of each slot
        self.scores: dict[int, torch.Tensor] = {}  # layer -> (budget,) accumulated attention of each slot
        self.counts: dict[int, int] = {}  # layer -> slots in use
        self.pending: dict[int, tuple] = {}  # layer -> (tensors, positions, scores) of an over-budget chunk

    def update(self, layer_index: int, *tensors: torch.Tensor) -> tuple:
        new = check_new_entries(tensors)
        self._check_layer(layer_index, tensors)
        start = self.offset
        if layer_index not in self.buffers:
            device = self.device or tensors[0].device
            self.buffers[layer_index] = [self._allocate(t, self.budget) for t in tensors]
            self.positions[layer_index] = torch.zeros(self.budget, dtype=torch.long, device=device)
            self.scores[layer_index] = torch.zeros(self.budget, dtype=torch.float32, device=device)
            self.counts[layer_index] = 0
        buffers, positions, scores = self.buffers[layer_index], self.positions[layer_index], self.scores[layer_index]
        held = self.counts[layer_index]
        self.lengths[layer_index] = start + new
        if held + new <= self.budget:  # room left: append
            for buffer, t in zip(buffers, tensors):
                buffer[:, :, held:held + new] = t
            positions[held:held + new] = torch.arange(start, start + new, device=positions.device)
            scores[held:held + new] = 0
            self.counts[layer_index] = held + new
            return tuple(buffer[:, :, :held + new].to(t.dtype) for buffer, t in zip(buffers, tensors))
        if new == 1:  # full: the new token takes the slot of the least-attended position outside the window
            protected = positions > start - self.recent  # the recent - 1 newest held (the new token is the last)
            slot = scores.masked_fill(protected, float("inf")).argmin().reshape(1)  # (1,), no host sync
            for buffer, t in zip(buffers, tensors):
                buffer.index_copy_(2, slot, t.to(buffer.dtype))
            positions.index_fill_(0, slot, start)
            scores.index_fill_(0, slot, 0.0)
            return tuple(buffer.to(t.dtype) for buffer, t in zip(buffers, tensors))
        # A chunk over the budget: its queries need every key now; compaction waits for advance().
        out = tuple(torch.cat([buffer[:, :, :held].to(t.dtype), t], dim=2) for buffer, t in zip(buffers, tensors))
        new_positions = torch.arange(start, start + new, device=positions.device)
        self.pending[layer_index] = (out, torch.cat([positions[:held], new_positions]),
                                     torch.cat([scores[:held], torch.zeros(new, device=scores.device)]))
        return out

    def observe_attention(self, layer_index: int, weights: torch.Tensor) -> None:
        """Add this step's attention (B, H, T, T_held), summed over batch, heads and queries, to each key's score."""
        received = weights.detach().float().sum(dim=(0, 1, 2))  # (T_held,)
        scores = self.pending[layer_index][2] if layer_index in self.pending else \
            self.scores[layer_index][:self.counts[layer_index]]
        if received.shape != scores.shape:
            raise ValueError(f"attention weights cover {received.shape[0]} keys but layer {layer_index} holds "
                             f"{scores.shape[0]}")
        scores += received

    def key_positions(self, layer_index: int) -> torch.Tensor:
        if layer_index in self.pending:
            return self.pending[layer_index][1]
        return self.positions[layer_index][:self.counts[layer_index]]

    def advance(self, num_new_tokens: int) -> None:
        super().advance(num_new_tokens)
        for layer_index, (tensors, positions, scores) in self.pending.items():
            kept = self._keep(positions, scores)  # (budget,) indices into the chunk
            for buffer, t in zip(self.buffers[layer_index], tensors):
                buffer[:, :, :self.budget] = t.index_select(2, kept)
            self.positions[layer_index][:] = positions[kept]
            self.scores[layer_index][:] = scores[kept]
            self.counts[layer_index] = self.budget
        self.pending.clear()

    def _keep(self, positions: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Indices of the `recent` newest positions and the highest-scoring others, `budget` in all."""
        newest_first = torch.argsort(positions, descending=True)
        recent, older = newest_first[:self.recent], newest_first[self.recent:]
        heavy = older[torch.topk(scores[older], self.budget - self.recent).indices]
        return torch.sort(torch.cat([recent, heavy])).values

    def _tensors(self):
        yield from super()._tensors()
        yield from self.positions.values()
        yield from self.scores.values()
