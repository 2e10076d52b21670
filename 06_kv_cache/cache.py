"""The KV cache: keep every layer's keys and values so that each new token costs O(n), not O(n^2).

Without a cache, generating token n re-runs the model over all n tokens so far: every step recomputes
the keys and values of the whole prefix, and its attention is an (n x n) matrix. The keys and values of
the past never change (causal attention), so a cache stores them once; each step then feeds one token,
computes its k and v, appends them, and attends one query to the n held keys:

    FLOPs per step   uncached  ~ 2 N n + 4 L E n^2        cached  ~ 2 N + 4 L E n
    (N = parameters in the matmuls, L layers, E = embedding width, n = tokens so far)

The price is memory, linear in the length:

    bytes = 2 (k and v) * layers * kv_heads * head_dim * bytes per element * seq_len * batch

Every cache here follows 04's KVCache protocol (offset, update, key_positions, advance), plugs into
MiniFormer.forward(kv_cache=...) and generate(cache_factory=...), works with every position encoding
and with grouped KV heads, and stores whatever tensors update() is given (k and v, or MLA's latent
c_kv and RoPE key), each shaped (B, heads, T, features) with the time axis at dim 2.

Contents, in reading order:
  kv_cache_bytes            the formula above
  PreallocatedKVCache       one buffer per tensor, sized once; each step writes a slice and returns views
  SlidingWindowKVCache      a ring buffer of the last `window` positions (evicts = True)
The compressed variants (int8 and heavy-hitter caches) are in compressed_cache.py.
"""

import torch

from transformer import check_batch_indices


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def bytes_per_element(dtype: torch.dtype) -> int:
    """Storage size of one element of `dtype` (4 for float32, 2 for bfloat16, 1 for int8)."""
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


def kv_cache_bytes(config, seq_len: int, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a full KV cache: 2 * layers * kv_heads * head_dim * bytes per element * seq_len * batch.

    `config` is 04's TransformerConfig (anything with num_layers, kv_heads and head_dim). With grouped
    KV heads only the kv_heads are stored, which is the memory GQA saves.
    """
    _check_int("seq_len", seq_len, 0)
    _check_int("batch_size", batch_size, 1)
    per_token = 2 * config.num_layers * config.kv_heads * config.head_dim * bytes_per_element(dtype)
    return per_token * seq_len * batch_size


def check_new_entries(tensors: tuple) -> int:
    """Validate one update's tensors (each (B, heads, T_new, features), same B and T_new); return T_new."""
    if not tensors:
        raise ValueError("update needs at least one tensor, e.g. update(layer_index, k, v)")
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dim() < 3:
            raise ValueError(f"cached tensors must be tensors (B, heads, T_new, ...) with the time axis at dim 2, "
                             f"got {type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}")
    batch, length = tensors[0].shape[0], tensors[0].shape[2]
    if any(t.shape[0] != batch or t.shape[2] != length for t in tensors) or length == 0:
        raise ValueError(f"all tensors of one update need the same batch size and T_new >= 1 (dims 0 and 2), "
                         f"got shapes {[tuple(t.shape) for t in tensors]}")
    return length


class PreallocatedKVCache:
    """A KV cache with a fixed capacity: per layer, one buffer (B, heads, capacity, features) per tensor.

    The buffers are allocated at the first update (when the shapes are known), in `dtype` (default: the
    dtype of the tensors given) on `device` (default: theirs). Each update writes T_new positions into a
    slice and returns views of the filled part, so no step copies the cache (ConcatKVCache's torch.cat
    copies all of it, every step). Storing in another dtype than the model's (e.g. bfloat16 for a float32
    model) halves the memory; the returned tensors are then converted back, which copies them.

    Checks: more than `capacity` positions, a layer whose held length disagrees with `offset`, or a
    change of batch size, heads or features between steps raise ValueError.
    """

    evicts = False

    def __init__(self, capacity: int, dtype: torch.dtype | None = None, device=None):
        _check_int("capacity", capacity, 1)
        if dtype is not None:
            bytes_per_element(dtype)  # raises TypeError for a non-dtype
        self.capacity, self.dtype = capacity, dtype
        self.device = None if device is None else torch.device(device)
        self.offset = 0
        self.buffers: dict[int, list] = {}  # layer -> one buffer per cached tensor
        self.lengths: dict[int, int] = {}  # layer -> positions held

    # -- what subclasses change: how a tensor is stored and read back ------------------------------------
    def _allocate(self, t: torch.Tensor, slots: int):
        shape = (t.shape[0], t.shape[1], slots, *t.shape[3:])
        return torch.empty(shape, dtype=self.dtype or t.dtype, device=self.device or t.device)

    def _write(self, buffer, start: int, t: torch.Tensor) -> None:
        buffer[:, :, start:start + t.shape[2]] = t

    def _read(self, buffer, end: int, like: torch.Tensor) -> torch.Tensor:
        return buffer[:, :, :end].to(like.dtype)  # a view when the dtypes agree

    def _tensors(self):
        """Every tensor this cache holds (for nbytes)."""
        for buffers in self.buffers.values():
            for buffer in buffers:
                yield from buffer if isinstance(buffer, tuple) else (buffer,)

    # -- the protocol ---------------------------------------------------------------------------------------
    def _check_layer(self, layer_index: int, tensors: tuple) -> None:
        """The layer must continue where offset says, with the shapes it started with."""
        if self.device is not None and tensors[0].device != self.device:
            raise ValueError(f"device of the cache is {self.device}, but the tensors are on {tensors[0].device}")
        held = self.lengths.get(layer_index)
        if held is None:
            if self.offset != 0:
                raise ValueError(f"layer {layer_index} has nothing cached but the cache offset is {self.offset}")
            return
        if held != self.offset:
            raise ValueError(f"cache offset ({self.offset}) disagrees with the {held} positions written for layer "
                             f"{layer_index}: start a new cache instead of changing offset")
        first = self.buffers[layer_index]
        reference = [b[0] if isinstance(b, tuple) else b for b in first]
        same = len(reference) == len(tensors) and all(
            (r.shape[0], r.shape[1], *r.shape[3:]) == (t.shape[0], t.shape[1], *t.shape[3:])
            for r, t in zip(reference, tensors))
        if not same:
            raise ValueError(f"new tensors of shapes {[tuple(t.shape) for t in tensors]} do not continue the cached "
                             f"{[tuple(r.shape) for r in reference]}: batch size, heads and features must stay the same")

    def update(self, layer_index: int, *tensors: torch.Tensor) -> tuple:
        """Write T_new positions of each tensor (B, heads, T_new, features); return all held (B, heads, T, features)."""
        new = check_new_entries(tensors)
        self._check_layer(layer_index, tensors)
        held = self.lengths.get(layer_index, 0)
        if held + new > self.capacity:
            raise ValueError(f"KV cache capacity exceeded: {held} positions held + {new} new > capacity "
                             f"{self.capacity}; build the cache with a larger capacity")
        if layer_index not in self.buffers:
            self.buffers[layer_index] = [self._allocate(t, self.capacity) for t in tensors]
        for buffer, t in zip(self.buffers[layer_index], tensors):
            self._write(buffer, held, t)
        self.lengths[layer_index] = held + new
        return tuple(self._read(buffer, held + new, t) for buffer, t in zip(self.buffers[layer_index], tensors))

    def key_positions(self, layer_index: int) -> torch.Tensor:
        """Positions 0 .. T - 1: nothing is ever dropped."""
        return torch.arange(self.lengths[layer_index])

    def advance(self, num_new_tokens: int) -> None:
        """Move offset past this forward's tokens; every layer must have written exactly those."""
        _check_int("num_new_tokens", num_new_tokens, 0)
        expected = self.offset + num_new_tokens
        stale = {layer: n for layer, n in self.lengths.items() if n != expected}
        if stale:
            raise ValueError(f"advance({num_new_tokens}) from offset {self.offset}: layers {stale} hold other "
                             f"lengths than {expected}")
        self.offset = expected

    def reorder(self, batch_indices: torch.Tensor) -> None:
        """Row b becomes the old row batch_indices[b] (B,), in place in the buffers (beam search, 05).
        Caches whose bookkeeping is shared by all rows (the heavy-hitter scores) keep it as it is."""
        if not self.buffers:
            return
        first = next(iter(self.buffers.values()))[0]
        check_batch_indices(batch_indices, (first[0] if isinstance(first, tuple) else first).shape[0])
        for buffers in self.buffers.values():
            for buffer in buffers:
                for t in buffer if isinstance(buffer, tuple) else (buffer,):
                    t.copy_(t.index_select(0, batch_indices.to(t.device)))

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor the cache holds (allocated capacity, not only the filled part)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())


class SlidingWindowKVCache(PreallocatedKVCache):
    """A ring buffer holding the last `window` positions: position p lives in slot p % window.

    A one-token step writes its slot and returns the whole ring, so the query at position i reads exactly
    the keys i - window + 1 .. i: sliding-window attention with no mask and O(window) memory forever
    (`evicts = True`: generation never refills it). The ring's slot order is not position order;
    key_positions reports the absolute position of each slot, which RoPE ignores (keys were rotated before
    caching) and ALiBi's mask reads.

    A chunk of several tokens (a prefill) gets the last window - 1 held positions and all its own: its first
    query sees exactly its window, later ones see up to window - 1 + T_new keys. It is exact sliding-window
    attention only when the attention module also masks by distance (07's windowed attention).
    """

    evicts = True

    def __init__(self, window: int, dtype: torch.dtype | None = None, device=None):
        _check_int("window", window, 1)
        super().__init__(capacity=window, dtype=dtype, device=device)
        self.window = window
        self.chunk_positions: dict[int, torch.Tensor] = {}  # layer -> positions of a returned chunk

    def update(self, layer_index: int, *tensors: torch.Tensor) -> tuple:
        new = check_new_entries(tensors)
        self._check_layer(layer_index, tensors)
        start, end = self.offset, self.offset + new  # absolute positions of the new tokens: start .. end - 1
        if layer_index not in self.buffers:
            self.buffers[layer_index] = [self._allocate(t, self.window) for t in tensors]
        rings = self.buffers[layer_index]
        self.chunk_positions.pop(layer_index, None)
        if new == 1 or end <= self.window:  # the ring itself is the answer: write, return (views of) it
            for ring, t in zip(rings, tensors):
                self._write(ring, start, t)
            self.lengths[layer_index] = end
            return tuple(ring[:, :, :min(end, self.window)].to(t.dtype) for ring, t in zip(rings, tensors))
        # A chunk that wraps: the last window - 1 held positions (in order), then the whole chunk.
        first_held = max(0, start - self.window + 1)
        slots = torch.arange(first_held, start, device=rings[0].device) % self.window
        out = tuple(torch.cat([ring.index_select(2, slots).to(t.dtype), t], dim=2) for ring, t in zip(rings, tensors))
        for ring, t in zip(rings, tensors):
            self._write(ring, start, t)
        self.lengths[layer_index] = end
        self.chunk_positions[layer_index] = torch.arange(first_held, end)
        return out

    def _write(self, ring, start: int, t: torch.Tensor) -> None:
        """Write positions start .. start + T_new - 1 into their slots (only the last `window` survive)."""
        surplus = max(0, t.shape[2] - self.window)
        t, start = t[:, :, surplus:], start + surplus
        first = start % self.window
        head = min(t.shape[2], self.window - first)  # slots first .. window - 1, then wrap to 0
        ring[:, :, first:first + head] = t[:, :, :head]
        if head < t.shape[2]:
            ring[:, :, :t.shape[2] - head] = t[:, :, head:]

    def key_positions(self, layer_index: int) -> torch.Tensor:
        """Absolute position of each returned entry: slot s holds the latest p < end with p % window == s."""
        if layer_index in self.chunk_positions:
            return self.chunk_positions[layer_index]
        end = self.lengths[layer_index]
        slots = torch.arange(min(end, self.window))
        return end - 1 - (end - 1 - slots) % self.window
