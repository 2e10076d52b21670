"""Paged KV cache: keys and values in fixed-size blocks of a shared pool, found through a block table.

A serving engine holds many requests of different and growing lengths. A contiguous cache gives each
request a row of context_length slots up front, so memory is reserved for tokens that may never come.
A paged cache (vLLM's PagedAttention) cuts the pool into blocks of `block_size` token slots and gives a
request one more block only when its last one is full:

    slot of position p of a request = block_table[p // block_size] * block_size + p % block_size
    blocks held by a request of n tokens = ceil(n / block_size)     (waste < one block per request)

Blocks go back to the free list when a request finishes or is cancelled. A contiguous cache is the special
case block_size = context_length with the block taken at admission, which is how `contiguous_cache` builds it.

One engine step runs a batch of rows, each a request at its own position, through 04's blocks. `BatchView`
is what the model sees during that forward: it follows 04's KVCache protocol (update / key_positions /
advance), writes each row's new keys into its slots, gathers each row's whole history padded to the
longest row, and carries the (B, 1, T, T_keys) mask that keeps every query to its own request's past.
`PagedAttention`, registered as attention_module "paged", is 04's attention reading that mask.

Contents: PagedKVCache (pool, free list, block tables), contiguous_cache, BatchView, PagedAttention.
"""

import math

import torch
from torch.nn.utils.rnn import pad_sequence

from transformer import AttentionContext, CausalSelfAttention, register_attention


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


class PagedKVCache:
    """A pool of num_blocks blocks of block_size token slots, per layer one key and one value tensor
    (num_blocks * block_size, H_kv, D), shared by all requests through their block tables."""

    def __init__(self, config, num_blocks: int, block_size: int = 16, dtype=torch.float32, device="cpu",
                 reserve_on_admit: int = 0):
        _check_int("num_blocks", num_blocks, 1)
        _check_int("block_size", block_size, 1)
        _check_int("reserve_on_admit", reserve_on_admit, 0)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.reserve_on_admit = reserve_on_admit  # blocks a request takes at admission (contiguous: 1)
        slots = num_blocks * block_size
        shape = (slots, config.kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.free_blocks = list(range(num_blocks - 1, -1, -1))  # a stack: pop() hands out block 0 first
        self.block_tables: dict = {}  # request id -> [block ids]
        self.lengths: dict = {}  # request id -> tokens held
        self.slot_maps: dict = {}  # request id -> LongTensor (tokens held,): the slot of each position

    # -- bookkeeping -------------------------------------------------------------------------------------
    @property
    def blocks_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def tokens_held(self) -> int:
        return sum(self.lengths.values())

    @property
    def bytes_per_block(self) -> int:
        one = self.keys[0]
        return 2 * len(self.keys) * self.block_size * one.shape[1] * one.shape[2] * one.element_size()

    def blocks_needed(self, num_tokens: int) -> int:
        return max(math.ceil(num_tokens / self.block_size), self.reserve_on_admit)

    def can_hold(self, request_id, num_tokens: int) -> bool:
        """Are there free blocks for request_id to hold num_tokens tokens in all?"""
        have = len(self.block_tables.get(request_id, ()))
        return self.blocks_needed(num_tokens) - have <= len(self.free_blocks)

    def add(self, request_id) -> None:
        if request_id in self.block_tables:
            raise ValueError(f"request {request_id!r} is already in the cache")
        if self.reserve_on_admit > len(self.free_blocks):
            raise ValueError(f"no free block for request {request_id!r}: {self.blocks_used} of {self.num_blocks} used")
        self.block_tables[request_id] = [self.free_blocks.pop() for _ in range(self.reserve_on_admit)]
        self.lengths[request_id] = 0
        self.slot_maps[request_id] = torch.empty(0, dtype=torch.long)

    def free(self, request_id) -> int:
        """Return the request's blocks to the free list (finish, cancel or preemption); -> blocks freed."""
        blocks = self.block_tables.pop(request_id)
        del self.lengths[request_id], self.slot_maps[request_id]
        self.free_blocks.extend(reversed(blocks))
        return len(blocks)

    def reset(self, request_id) -> None:
        """Drop what a request holds but keep it in the cache (it will be re-filled from position 0)."""
        self.free(request_id)
        self.add(request_id)

    def reserve(self, request_id, num_new_tokens: int) -> torch.Tensor:
        """Take blocks so that num_new_tokens more fit; -> their slots (num_new_tokens,). Raises when full."""
        table, start = self.block_tables[request_id], self.lengths[request_id]
        end = start + num_new_tokens
        missing = self.blocks_needed(end) - len(table)
        if missing > len(self.free_blocks):
            raise ValueError(f"KV pool exhausted: request {request_id!r} needs {missing} more blocks, "
                             f"{len(self.free_blocks)} free")
        table.extend(self.free_blocks.pop() for _ in range(max(missing, 0)))
        self.lengths[request_id] = end
        new_slots = self.slots(request_id, start, end)
        self.slot_maps[request_id] = torch.cat([self.slot_maps[request_id], new_slots])
        return new_slots

    def slots(self, request_id, start: int, end: int) -> torch.Tensor:
        """Pool slots of positions start .. end - 1 of a request: block_table[p // bs] * bs + p % bs."""
        table, size = self.block_tables[request_id], self.block_size
        return torch.tensor([table[p // size] * size + p % size for p in range(start, end)], dtype=torch.long)


def contiguous_cache(config, max_batch_size: int, dtype=torch.float32, device="cpu") -> PagedKVCache:
    """The contiguous (preallocated) layout: one block of context_length slots per request, taken at
    admission, so every request reserves a whole context whatever its length."""
    return PagedKVCache(config, num_blocks=max_batch_size, block_size=config.context_length, dtype=dtype,
                        device=device, reserve_on_admit=1)


class BatchView:
    """04's KVCache protocol over B rows of a PagedKVCache for one forward.

    Row i feeds new_lengths[i] tokens (padded to T = max) at positions held_i .. held_i + new_i - 1.
    update() writes those keys/values into the rows' slots and returns every row's history (B, H_kv,
    T_keys, D), T_keys = max(held_i + new_i), padding read from slot 0 and masked out by `attention_mask`.
    """

    def __init__(self, cache: PagedKVCache, request_ids: list, new_lengths: list):
        self.cache = cache
        device = cache.keys[0].device
        held = [cache.lengths[r] for r in request_ids]
        totals = [h + n for h, n in zip(held, new_lengths)]
        T, T_keys = max(new_lengths), max(totals)
        self.write_slots = torch.cat([cache.reserve(r, n) for r, n in zip(request_ids, new_lengths)]).to(device)
        steps = torch.arange(T)
        self.new_valid = steps[None, :] < torch.tensor(new_lengths)[:, None]  # (B, T)
        self.positions = torch.tensor(held)[:, None] + steps[None, :]  # (B, T) absolute position of each query
        read = pad_sequence([cache.slot_maps[r] for r in request_ids], batch_first=True)  # (B, T_keys), pad: slot 0
        self.read_slots = read.to(device)
        self.all_new_valid = min(new_lengths) == T  # every row feeds T tokens: no padding to drop
        key_index = torch.arange(T_keys)
        key_valid = key_index[None, :] < torch.tensor(totals)[:, None]  # (B, T_keys)
        causal = key_index[None, None, :] <= self.positions[:, :, None]  # (B, T, T_keys)
        self.attention_mask = (causal & key_valid[:, None, :])[:, None].to(device)  # (B, 1, T, T_keys)
        self.offset = 0  # unused by PagedAttention: every row has its own positions
        self.new_valid, self.positions = self.new_valid.to(device), self.positions.to(device)

    def update(self, layer_index: int, k, v):
        """k, v (B, H_kv, T, D) -> each row's whole history (B, H_kv, T_keys, D)."""
        keys, values = self.cache.keys[layer_index], self.cache.values[layer_index]
        new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # (B, T, H_kv, D)
        if self.all_new_valid:
            new_k, new_v = new_k.flatten(0, 1), new_v.flatten(0, 1)  # (B * T, H_kv, D)
        else:
            new_k, new_v = new_k[self.new_valid], new_v[self.new_valid]  # (N_new, H_kv, D)
        keys.index_copy_(0, self.write_slots, new_k.to(keys.dtype))
        values.index_copy_(0, self.write_slots, new_v.to(values.dtype))
        k_all = keys[self.read_slots].transpose(1, 2).to(k.dtype)  # (B, T_keys, H_kv, D) -> (B, H_kv, T_keys, D)
        v_all = values[self.read_slots].transpose(1, 2).to(v.dtype)
        return k_all, v_all

    def key_positions(self, layer_index: int) -> torch.Tensor:
        return torch.arange(self.read_slots.shape[1])

    def advance(self, num_new_tokens: int) -> None:
        pass  # the block tables already moved in reserve()


class PagedAttention(CausalSelfAttention):
    """04's attention whose mask comes from the batch view: each query reads only its own request's keys
    up to its own position (a padded row of the batch is never attended to)."""

    def mask(self, query_length: int, context: AttentionContext, device, dtype):
        if isinstance(context.kv_cache, BatchView):
            return context.kv_cache.attention_mask
        return super().mask(query_length, context, device, dtype)


register_attention("paged", PagedAttention)
