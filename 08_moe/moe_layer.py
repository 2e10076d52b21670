"""Mixture of experts: a router sends every token to k of N feed-forward experts, so the model holds N
experts' parameters but each token pays for only k of them.

For the T tokens x (T, E) of a batch, with router matrix W_r (E, N):

    logits = x W_r                                   (T, N)
    p      = softmax(logits)                         (T, N)   computed in float32, as Mixtral does
    S_t    = the k experts with the largest p_t      (T, k)
    g_t,e  = p_t,e / sum_{e' in S_t} p_t,e'          renormalised over the chosen k (Mixtral); with
                                                     normalize_weights=False g = p (Switch, top-1)
    y_t    = sum_{e in S_t} g_t,e * Expert_e(x_t)    each expert is 04's SwiGLU or GELU MLP

Load balancing (Switch Transformer eqs. 4-6, in the top-k form of Hugging Face's load_balancing_loss_func):

    f_e = (1/T) #{t : e in S_t}        share of tokens that chose e (sum_e f_e = k); no gradient
    P_e = (1/T) sum_t p_t,e            mean router probability of e; carries the gradient
    L_balance = N sum_e f_e P_e        = k when routing is uniform; N (its maximum) when every token puts all
                                       its probability on the same k experts

Router z-loss (ST-MoE, Zoph et al. 2022): L_z = (1/T) sum_t (logsumexp_e logits_t,e)^2 keeps logits small.

Capacity (GShard / Switch): expert e accepts at most C = ceil(capacity_factor * k * T / N) assignments.
Assignments queue by rank (every token's first choice before any second choice), then by token position in
the flattened batch (B*T order); the first C in e's queue are kept, the rest dropped: that expert adds
nothing for that token (the residual connection carries the token on), and the other weights are not
renormalised. The rule applies in training and evaluation alike; capacity_factor=None keeps every
assignment (Mixtral).

How the auxiliary losses reach training: total loss = cross-entropy + a L_balance + b L_z, summed over
layers. Each layer adds its a L_balance + b L_z to the backward pass itself (DeepSeek-MoE's
AddAuxiliaryLoss: the forward output is unchanged, the backward also sends gradient 1 into the weighted
auxiliary loss), so 04's train_lab_variant and 00_utils' train need no change, and the loss they record
stays the pure cross-entropy, comparable with a dense model's.

Contents, in reading order: MoESettings (the variant's knobs, validated); expert_capacity, capacity_mask
and route (routing as pure functions); load_balancing_loss and router_z_loss; MoELayer (the registered
FFN, with utilisation tracking); parameter and FLOP counts; register_moe and helpers over a model.
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from transformer import TorchGeluMLP, TorchSwiGLU, TransformerConfig, register_ffn

EXPERTS = {"swiglu": TorchSwiGLU, "gelu": TorchGeluMLP}  # 04's feed-forwards serve as experts


@dataclass(frozen=True)
class MoESettings:
    """What makes a MoE variant; it goes into the FFN factory (register_moe), not into TransformerConfig."""

    num_experts: int = 8
    top_k: int = 2
    expert: str = "swiglu"  # "swiglu" (Mixtral) | "gelu" (the lab model's MLP)
    expert_hidden_size: int | None = None  # None = the config's FFN hidden size (a dense layer's width)
    capacity_factor: float | None = None  # None = no capacity limit, nothing dropped
    balance_coefficient: float = 0.01  # a: Switch's 1e-2
    z_loss_coefficient: float = 0.001  # b: ST-MoE's 1e-3
    normalize_weights: bool = True  # renormalise the top-k probabilities (Mixtral); False: raw p (Switch)

    def __post_init__(self):
        for name in ("num_experts", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k must be in [1, num_experts = {self.num_experts}], got {self.top_k}")
        if self.expert not in EXPERTS:
            raise ValueError(f"expert must be one of {tuple(EXPERTS)}, got {self.expert!r}")
        if self.expert_hidden_size is not None and (isinstance(self.expert_hidden_size, bool) or
                                                    not isinstance(self.expert_hidden_size, int) or
                                                    self.expert_hidden_size < 1):
            raise ValueError(f"expert_hidden_size must be an integer >= 1 or None, got {self.expert_hidden_size!r}")
        if self.capacity_factor is not None and not _finite_number(self.capacity_factor, minimum_exclusive=0.0):
            raise ValueError(f"capacity_factor must be a finite number > 0 or None, got {self.capacity_factor!r}")
        for name in ("balance_coefficient", "z_loss_coefficient"):
            if not _finite_number(getattr(self, name), minimum_inclusive=0.0):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self, name)!r}")
        if not isinstance(self.normalize_weights, bool):
            raise ValueError(f"normalize_weights must be True or False, got {self.normalize_weights!r}")

    @property
    def name(self) -> str:
        """The registry name: every setting spelled out, so equal settings share one name."""
        return (f"moe-n{self.num_experts}-k{self.top_k}-{self.expert}-h{self.expert_hidden_size or 0}"
                f"-c{self.capacity_factor or 0}-b{self.balance_coefficient}-z{self.z_loss_coefficient}"
                f"-{'norm' if self.normalize_weights else 'raw'}")


def _finite_number(value, minimum_exclusive=None, minimum_inclusive=None) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if minimum_exclusive is not None and value <= minimum_exclusive:
        return False
    return minimum_inclusive is None or value >= minimum_inclusive


# ---------------------------------------------------------------------------------------------------
# Routing: top-k choice, capacity, weights
# ---------------------------------------------------------------------------------------------------

def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor * k * T / N): how many assignments one expert accepts per batch."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    MoESettings(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor)  # validates the rest
    return math.ceil(capacity_factor * top_k * num_tokens / num_experts)


def capacity_mask(expert_index: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """expert_index (T, k) -> kept (T, k) bool: True for the first `capacity` assignments in each expert's
    queue, ordered by rank (column) first and token (row) second."""
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an integer >= 0, got {capacity!r}")
    T, k = expert_index.shape
    queue = F.one_hot(expert_index.t().reshape(-1), num_experts)  # (k*T, N): rank-major order
    place_in_queue = (queue.cumsum(dim=0) * queue).sum(dim=-1) - 1  # (k*T,) 0 = first in its expert's queue
    return (place_in_queue < capacity).view(k, T).t()  # (T, k)


@dataclass
class Routing:
    """Where each token goes and with what weight; `kept` is False for assignments dropped by capacity."""

    logits: torch.Tensor  # (T, N) router logits
    probs: torch.Tensor  # (T, N) softmax of the logits, float32
    expert_index: torch.Tensor  # (T, k) chosen experts, most probable first
    weight: torch.Tensor  # (T, k) mixing weights g
    kept: torch.Tensor  # (T, k) bool


def route(logits: torch.Tensor, top_k: int, capacity: int | None = None, normalize_weights: bool = True) -> Routing:
    """Top-k routing of router logits (T, N): choices, weights and (with a capacity) which ones are kept."""
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape (T, N), got {tuple(logits.shape)}")
    num_experts = logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an integer in [1, {num_experts}], got {top_k!r}")
    probs = torch.softmax(logits.float(), dim=-1)  # (T, N)
    top_probs, expert_index = torch.topk(probs, top_k, dim=-1)  # (T, k)
    weight = top_probs / top_probs.sum(dim=-1, keepdim=True) if normalize_weights else top_probs
    if capacity is None:
        kept = torch.ones_like(expert_index, dtype=torch.bool)
    else:
        kept = capacity_mask(expert_index, num_experts, capacity)
    return Routing(logits, probs, expert_index, weight.to(logits.dtype), kept)


# ---------------------------------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------------------------------

def load_balancing_loss(probs: torch.Tensor, expert_index: torch.Tensor) -> torch.Tensor:
    """N sum_e f_e P_e from router probabilities (T, N) and the chosen experts (T, k), before capacity."""
    T, num_experts = probs.shape
    if T == 0:
        return probs.sum()  # a zero that keeps the graph
    chosen_share = F.one_hot(expert_index, num_experts).sum(dim=1).float().mean(dim=0)  # (N,) f_e, sums to k
    mean_prob = probs.float().mean(dim=0)  # (N,) P_e
    return num_experts * (chosen_share * mean_prob).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """(1/T) sum_t logsumexp(logits_t)^2: grows with the scale of the logits (keeps them in float range)."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class _AddToBackward(torch.autograd.Function):
    """Returns `output` unchanged; in the backward pass, `loss` (a scalar) also receives gradient 1, as if it
    had been added to the final loss (DeepSeek-MoE's AddAuxiliaryLoss)."""

    @staticmethod
    def forward(ctx, output, loss):
        ctx.loss_dtype = loss.dtype
        return output

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output, torch.ones((), dtype=ctx.loss_dtype, device=grad_output.device)


# ---------------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------------

@dataclass
class RoutingStats:
    """What the last forward did, for inspection (detached, except the two losses)."""

    routing: Routing
    balance_loss: torch.Tensor  # scalar, with graph
    z_loss: torch.Tensor  # scalar, with graph
    capacity: int | None


class MoELayer(nn.Module):
    """Router + N experts; a drop-in feed-forward (B, T, E) -> (B, T, E) for 04's Block.

    Utilisation tracking: `assignments_per_expert` (N,) counts kept assignments since the last
    reset_utilisation(), `dropped_assignments` the assignments lost to capacity; `last` holds the last
    forward's RoutingStats.
    """

    def __init__(self, config: TransformerConfig, settings: MoESettings):
        super().__init__()
        self.settings = settings
        hidden = settings.expert_hidden_size or config.resolved_ffn_hidden_size
        expert_config = replace(config, ffn=settings.expert, ffn_hidden_size=hidden)
        # Each expert is 04's FFN, whose output projection is already marked with mark_residual_projection.
        self.experts = nn.ModuleList(EXPERTS[settings.expert](expert_config) for _ in range(settings.num_experts))
        self.router = nn.Linear(config.embed_dim, settings.num_experts, bias=False)
        self.register_buffer("assignments_per_expert", torch.zeros(settings.num_experts, dtype=torch.long),
                             persistent=False)
        self.register_buffer("dropped_assignments", torch.zeros((), dtype=torch.long), persistent=False)
        self.last: RoutingStats | None = None

    def forward(self, x):  # (B, T, E)
        B, T, E = x.shape
        tokens = x.reshape(B * T, E)  # (B*T, E)
        s = self.settings
        capacity = None if s.capacity_factor is None else expert_capacity(B * T, s.num_experts, s.top_k,
                                                                          s.capacity_factor)
        routing = route(self.router(tokens), s.top_k, capacity, s.normalize_weights)
        out = torch.zeros_like(tokens)  # (B*T, E): a dropped assignment adds nothing
        for e, expert in enumerate(self.experts):
            token_index, rank = torch.where((routing.expert_index == e) & routing.kept)  # (n_e,) each
            if token_index.numel():
                update = expert(tokens[token_index]) * routing.weight[token_index, rank, None]  # (n_e, E)
                out.index_add_(0, token_index, update)
        balance = load_balancing_loss(routing.probs, routing.expert_index)
        z_loss = router_z_loss(routing.logits)
        self._track(routing, balance, z_loss, capacity)
        auxiliary = s.balance_coefficient * balance + s.z_loss_coefficient * z_loss
        if self.training and torch.is_grad_enabled() and auxiliary.requires_grad:
            out = _AddToBackward.apply(out, auxiliary)
        return out.view(B, T, E)

    @torch.no_grad()
    def _track(self, routing: Routing, balance, z_loss, capacity) -> None:
        kept_choices = routing.expert_index[routing.kept]  # (kept assignments,)
        self.assignments_per_expert += torch.bincount(kept_choices, minlength=self.settings.num_experts)
        self.dropped_assignments += (~routing.kept).sum()
        detached = Routing(*(t.detach() for t in (routing.logits, routing.probs, routing.expert_index,
                                                  routing.weight, routing.kept)))
        self.last = RoutingStats(detached, balance, z_loss, capacity)

    def reset_utilisation(self) -> None:
        self.assignments_per_expert.zero_()
        self.dropped_assignments.zero_()

    def utilisation(self) -> torch.Tensor:
        """(N,) share of the kept assignments each expert received since the last reset (uniform = 1/N)."""
        counts = self.assignments_per_expert.float()
        return counts / counts.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------
# Parameters and FLOPs
# ---------------------------------------------------------------------------------------------------

def _matmul_weights(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def active_parameters(layer: MoELayer) -> int:
    """Parameters one token uses: the router and k experts (biases included)."""
    expert = sum(p.numel() for p in layer.experts[0].parameters())
    return layer.router.weight.numel() + layer.settings.top_k * expert


def total_parameters(layer: MoELayer) -> int:
    return sum(p.numel() for p in layer.parameters())


def forward_flops(layer: MoELayer, num_tokens: int, kept_assignments: int | None = None) -> int:
    """Matrix-multiply FLOPs of one forward (what torch's FlopCounterMode counts: 2 per multiply-add, biases
    and activations not counted): the router for every token, one expert per kept assignment
    (default: all k T assignments kept)."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an integer >= 0, got {num_tokens!r}")
    if kept_assignments is None:
        kept_assignments = layer.settings.top_k * num_tokens
    if isinstance(kept_assignments, bool) or not isinstance(kept_assignments, int) or not (
            0 <= kept_assignments <= layer.settings.top_k * num_tokens):
        raise ValueError(f"kept_assignments must be an integer in [0, top_k * num_tokens = "
                         f"{layer.settings.top_k * num_tokens}], got {kept_assignments!r}")
    return 2 * (num_tokens * layer.router.weight.numel() + kept_assignments * _matmul_weights(layer.experts[0]))


# ---------------------------------------------------------------------------------------------------
# Registration and helpers over a model
# ---------------------------------------------------------------------------------------------------

def register_moe(**settings) -> str:
    """Register a MoE feed-forward with these MoESettings under a name derived from them and return the
    name, for TransformerConfig(ffn=name). Registering the same settings twice is harmless."""
    moe = MoESettings(**settings)
    register_ffn(moe.name, lambda config: MoELayer(config, moe))
    return moe.name


def moe_layers(model: nn.Module) -> list:
    """The model's MoE layers, in depth order."""
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def reset_utilisation(model: nn.Module) -> None:
    for layer in moe_layers(model):
        layer.reset_utilisation()


def model_active_parameters(model: nn.Module) -> int:
    """A model's parameters used per token: all of them minus the experts a token does not visit."""
    unused = sum(total_parameters(layer) - active_parameters(layer) for layer in moe_layers(model))
    return sum(p.numel() for p in model.parameters()) - unused
