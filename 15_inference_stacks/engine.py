"""The serving engine: many requests decoded together, each joining and leaving between steps.

A step runs every running request one token further in one batched forward (a decode step reads the
weights once for B tokens instead of B times), then samples each row with the request's own sampler:

    step:  admit waiting requests while a batch slot and KV blocks are free       (continuous batching)
           feed each request its uncached tokens (a prompt = prefill, else its last token = decode)
           logits of each row's last token -> its Sampler(config, its own generator) -> next token
           a request that reached max_new_tokens leaves and its KV blocks go back to the pool

Scheduling policies: "continuous" admits whenever there is room (requests join and leave between steps);
"static" admits a batch only when the previous batch has finished entirely (the classic batching
that idles finished slots until the longest request of its batch is done).

Exactness: every request gets its own torch.Generator seeded with its seed, so its tokens do not depend on
which other requests share its batches; the engine reproduces 04's MiniFormer.generate (the naive loop)
token for token, including the refill past the context window (a request longer than context_length is
re-fed its last context_length tokens, as generate does) and recompute after preemption (a request
evicted when the pool runs out of blocks is re-fed all its tokens later).

Contents: Request, TokenEvent, Engine (submit, cancel, step, run).
"""

import itertools
from dataclasses import dataclass, field, replace

import torch

from paged_cache import BatchView, PagedKVCache, contiguous_cache
from sampler import Sampler, SamplingConfig
from transformer import AttentionContext, MiniFormer

POLICIES = ("continuous", "static")
CACHE_LAYOUTS = ("paged", "contiguous")
SUPPORTED_POSITIONS = ("learned", "sinusoidal", "none")  # per-row positions enter through the embedding


@dataclass
class Request:
    """One completion request and its progress."""

    request_id: int
    prompt: list  # token ids
    max_new_tokens: int
    sampler: Sampler
    tokens: list = field(default_factory=list)  # prompt + generated so far
    generated: int = 0

    def __post_init__(self):
        self.tokens = list(self.prompt)


@dataclass
class TokenEvent:
    """What one step produced for one request."""

    request_id: int
    token: int
    index: int  # 0 for the first generated token
    finished: bool


class Engine:
    """Batched, continuously scheduled generation over a paged (or contiguous) KV cache.

    The model is rebuilt with 15's "paged" attention module and the same weights, so its attention reads
    each row's own keys through the block tables. num_blocks defaults to enough for max_batch_size full
    contexts (the pool of a contiguous cache); fewer blocks make the engine preempt under memory pressure.
    """

    def __init__(self, model: MiniFormer, max_batch_size: int = 8, policy: str = "continuous",
                 cache_layout: str = "paged", block_size: int = 16, num_blocks: int | None = None):
        config = model.config
        if config.position not in SUPPORTED_POSITIONS:
            raise ValueError(f"the engine supports position in {SUPPORTED_POSITIONS}, got {config.position!r}")
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if cache_layout not in CACHE_LAYOUTS:
            raise ValueError(f"cache_layout must be one of {CACHE_LAYOUTS}, got {cache_layout!r}")
        reference = next(model.parameters())
        self.model = MiniFormer(replace(config, attention_module="paged")).to(reference.device, reference.dtype)
        self.model.load_state_dict(model.state_dict())
        self.model.eval()
        self.context_length, self.device = config.context_length, reference.device
        self.max_batch_size, self.policy = max_batch_size, policy
        if cache_layout == "contiguous":
            self.cache = contiguous_cache(config, max_batch_size, reference.dtype, reference.device)
        else:
            full_context_blocks = -(-config.context_length // block_size)
            num_blocks = max_batch_size * full_context_blocks if num_blocks is None else num_blocks
            if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < full_context_blocks:
                raise ValueError(f"num_blocks must be an integer >= {full_context_blocks} (one full context of "
                                 f"{config.context_length} tokens in blocks of {block_size}), got {num_blocks!r}")
            self.cache = PagedKVCache(config, num_blocks, block_size, reference.dtype, reference.device)
        self.waiting: list = []  # Requests in arrival order (a preempted request goes back to the front)
        self.running: list = []  # Requests in admission order
        self._ids = itertools.count()
        self.preemptions = 0

    # -- the requests ------------------------------------------------------------------------------------
    def submit(self, prompt, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
               seed: int | None = None) -> int:
        """Queue a request; -> its id. prompt: token ids (list or 1-D tensor); seed: its generator's seed."""
        prompt = [int(t) for t in (prompt.tolist() if isinstance(prompt, torch.Tensor) else prompt)]
        vocab_size = self.model.config.vocab_size
        if not prompt or not all(0 <= t < vocab_size for t in prompt):
            raise ValueError(f"prompt must be a non-empty list of token ids in [0, {vocab_size}), got {prompt[:10]}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(seed if seed is not None else torch.seed())
        request = Request(next(self._ids), prompt, max_new_tokens, Sampler(sampling, generator))
        self.waiting.append(request)
        return request.request_id

    def cancel(self, request_id: int) -> bool:
        """Drop a request wherever it is; its KV blocks go back to the pool. -> whether it was found."""
        for queue in (self.waiting, self.running):
            for request in queue:
                if request.request_id == request_id:
                    queue.remove(request)
                    if request_id in self.cache.block_tables:
                        self.cache.free(request_id)
                    return True
        return False

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step ----------------------------------------------------------------------------------------
    def _feed(self, request: Request) -> list:
        """The tokens this step must run for a request: those not in its cache, or (past the context
        window) its last context_length tokens into an emptied cache, as 04's generate refills."""
        held = self.cache.lengths[request.request_id]
        if len(request.tokens) > self.context_length:
            if held:
                self.cache.reset(request.request_id)
            return request.tokens[-self.context_length:]
        return request.tokens[held:]

    def _admit(self) -> None:
        if self.policy == "static" and self.running:
            return
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            needed = self.cache.blocks_needed(min(len(request.tokens), self.context_length))
            # Leave one block of growth per running request (a cache whose requests grow): admitting into
            # the last free blocks would only evict someone at the next block boundary (preemption thrash).
            watermark = 0 if self.cache.reserve_on_admit else len(self.running)
            if needed + watermark > len(self.cache.free_blocks):
                break
            self.cache.add(request.request_id)
            self.running.append(self.waiting.pop(0))

    def _make_room(self, feeds: dict) -> None:
        """Preempt the latest-admitted requests until every remaining feed fits in the free blocks."""
        while True:
            missing = sum(max(self.cache.blocks_needed(self.cache.lengths[r.request_id] + len(feeds[r.request_id]))
                              - len(self.cache.block_tables[r.request_id]), 0) for r in self.running)
            if missing <= len(self.cache.free_blocks) or len(self.running) == 1:
                return
            victim = self.running.pop()
            self.cache.free(victim.request_id)
            del feeds[victim.request_id]
            self.waiting.insert(0, victim)
            self.preemptions += 1

    @torch.no_grad()
    def _forward(self, requests: list, feeds: dict) -> torch.Tensor:
        """Run each request's feed (padded to the longest) through the model; -> logits of each row's
        last fed token (B, V)."""
        ids = [r.request_id for r in requests]
        lengths = [len(feeds[i]) for i in ids]
        view = BatchView(self.cache, ids, lengths)
        T = max(lengths)
        tokens = torch.tensor([feeds[i] + [0] * (T - len(feeds[i])) for i in ids], device=self.device)  # (B, T)
        model = self.model
        x = model.token_embedding(tokens)  # (B, T, E)
        if model.config.position == "learned":
            x = x + model.position_embedding.weight[view.positions]  # each row at its own positions
        elif model.config.position == "sinusoidal":
            x = x + model.sinusoidal_table[view.positions].to(x.dtype)
        context = AttentionContext(offset=0, kv_cache=view)
        for block in model.blocks:
            x, _ = block(x, context)
        last = torch.tensor(lengths, device=self.device) - 1
        return model.final_norm_and_head(x[torch.arange(len(ids)), last])  # (B, V)

    def step(self) -> list:
        """Admit, run one forward per feed kind (prefills together, decodes together), sample; -> TokenEvents."""
        self._admit()
        feeds = {r.request_id: self._feed(r) for r in self.running}
        self._make_room(feeds)
        events = []
        prefills = [r for r in self.running if len(feeds[r.request_id]) > 1]
        decodes = [r for r in self.running if len(feeds[r.request_id]) == 1]
        for group in (prefills, decodes):
            if not group:
                continue
            logits = self._forward(group, feeds)
            for row, request in enumerate(group):
                penalised = request.sampler.config.repetition_penalty != 1.0  # only the penalty reads the history
                history = torch.tensor([request.tokens], device=self.device) if penalised else None  # (1, T)
                token = int(request.sampler(logits[row:row + 1], history))
                request.tokens.append(token)
                request.generated += 1
                finished = request.generated == request.max_new_tokens
                events.append(TokenEvent(request.request_id, token, request.generated - 1, finished))
                if finished:
                    self.running.remove(request)
                    self.cache.free(request.request_id)
        return events

    def run(self) -> dict:
        """Step until every request has finished; -> {request_id: generated token ids}."""
        generated: dict = {}
        while self.has_work:
            for event in self.step():
                generated.setdefault(event.request_id, []).append(event.token)
        return generated
