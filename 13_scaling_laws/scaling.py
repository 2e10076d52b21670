"""Scaling laws: count what a model costs (parameters, FLOPs, bytes), then fit how its loss falls with size and data.

Counting, for 04's MiniFormer with E = embed_dim, L = num_layers, T = context, V = vocab, F = FFN width:

    N (non-embedding parameters)  = L * (attention + FFN + norms)          Kaplan et al. 2020 count this N
    training FLOPs                ~ 6 N D                                  2 N per token forward, 4 N backward
    exact matmul FLOPs per token  = 3 * 2 * (L * (E (H + 2 H_kv) D_h + E^2 + m F E + 2 T E) + E V)
                                     (m = 2 GELU, 3 SwiGLU; 2 T E = scores + weighted sum over a full T x T)

Memory of training with AdamW: weights + gradients + two moments (+ a step counter per tensor) + activations.

The laws, fitted to measured losses (Hoffmann et al. 2022, "Chinchilla", approach 3):

    L(N)    = E + A / N^alpha                      (Kaplan's L = (N_c / N)^alpha_N has no floor E)
    L(N, D) = E + A / N^alpha + B / D^beta
    fit:    minimise sum_i Huber_delta( LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i ),  A = e^a, ...
            with L-BFGS from the best points of a grid of starts; uncertainty by refitting bootstrap resamples.
    compute-optimal under C = 6 N D:   N_opt = G (C/6)^(beta/(alpha+beta)),  G = (alpha A / (beta B))^(1/(alpha+beta))

Contents, in reading order:
  1. counting     parameter_count, forward_flops_per_token, training_flops, six_n_d
  2. memory       BYTES_PER_ELEMENT, training_state_bytes, measured_state_bytes, activation_bytes,
                  measure_saved_activation_bytes, mixed_precision_training_bytes
  3. fitting      LawFit, fit_power_law, fit_chinchilla, bootstrap_fits, compute_optimal
"""

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from transformer import TransformerConfig

# ---------------------------------------------------------------------------------------------------
# 1. Counting parameters and FLOPs
# ---------------------------------------------------------------------------------------------------


def _check_config(config) -> None:
    if not isinstance(config, TransformerConfig):
        raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _norm_parameters(config: TransformerConfig) -> int:
    """Parameters of one norm layer: LayerNorm has a gain and a shift, RMSNorm a gain, 'none' nothing."""
    return {"layernorm": 2, "rmsnorm": 1, "none": 0}[config.norm] * config.embed_dim


def parameter_count(config: TransformerConfig, exclude_embeddings: bool = False) -> int:
    """Closed-form number of parameters of MiniFormer(config) (a tied head counted once).

    exclude_embeddings drops the token table, the learned position table and (when tied) the head with
    them: the N of Kaplan et al. An untied head is kept, as in MiniFormer.num_parameters."""
    _check_config(config)
    if config.norm not in ("layernorm", "rmsnorm", "none") or config.ffn not in ("gelu", "swiglu") \
            or config.attention_module != "causal":
        raise ValueError(f"parameter_count knows the built-in norm/ffn/attention only, got norm={config.norm!r}, "
                         f"ffn={config.ffn!r}, attention_module={config.attention_module!r}")
    E, F, bias = config.embed_dim, config.resolved_ffn_hidden_size, int(config.bias)
    qkv_width = (config.num_heads + 2 * config.kv_heads) * config.head_dim
    attention = E * qkv_width + bias * qkv_width + E * E + bias * E
    matrices = 3 if config.ffn == "swiglu" else 2
    ffn = matrices * E * F + bias * ((matrices - 1) * F + E)
    blocks = config.num_layers * (attention + ffn + 2 * _norm_parameters(config))
    final_norm = _norm_parameters(config) if config.norm_placement == "pre" else 0
    head = 0 if config.tie_weights else config.vocab_size * E
    if exclude_embeddings:
        return blocks + final_norm + head
    positions = config.context_length * E if config.position == "learned" else 0
    return blocks + final_norm + head + config.vocab_size * E + positions


def forward_flops_per_token(config: TransformerConfig, include_attention: bool = True) -> int:
    """Matrix-multiply FLOPs of one forward pass per token over a full window of context_length tokens:
    2 per multiply-add, what torch's FlopCounterMode counts. Attention counts the full T x T matrix of
    scores and the weighted sum (a causal mask wastes half of it; Kaplan et al. count T/2). On CPU,
    torch's fused SDPA kernel is invisible to FlopCounterMode, so compare include_attention=False with it."""
    _check_config(config)
    E, T, F = config.embed_dim, config.context_length, config.resolved_ffn_hidden_size
    qkv_width = (config.num_heads + 2 * config.kv_heads) * config.head_dim
    matrices = 3 if config.ffn == "swiglu" else 2
    per_layer = E * qkv_width + E * E + matrices * E * F  # multiply-adds per token
    if include_attention:
        per_layer += 2 * T * E  # q k^T over T keys, weights v over T values, summed over heads
    return 2 * (config.num_layers * per_layer + E * config.vocab_size)


def training_flops(config: TransformerConfig, tokens: int, include_attention: bool = True) -> int:
    """Forward + backward matmul FLOPs for `tokens` training tokens: the backward pass multiplies each
    weight twice (gradient of the input, gradient of the weight), so a step costs 3x a forward."""
    _check_count("tokens", tokens)
    return 3 * forward_flops_per_token(config, include_attention) * tokens


def six_n_d(num_parameters: int, tokens: int) -> int:
    """The rule of thumb C = 6 N D: 2 N FLOPs per token forward, 4 N backward; ignores attention and the head."""
    _check_count("num_parameters", num_parameters)
    _check_count("tokens", tokens)
    return 6 * num_parameters * tokens


# ---------------------------------------------------------------------------------------------------
# 2. Memory
# ---------------------------------------------------------------------------------------------------

BYTES_PER_ELEMENT = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.float64: 8}


def _bytes_of(dtype) -> int:
    if dtype not in BYTES_PER_ELEMENT:
        raise ValueError(f"dtype must be one of {tuple(BYTES_PER_ELEMENT)}, got {dtype!r}")
    return BYTES_PER_ELEMENT[dtype]


def training_state_bytes(num_parameters: int, num_tensors: int, dtype=torch.float32,
                         optimizer: str = "adamw") -> dict:
    """Bytes of what training keeps between steps, for parameters stored in `dtype`:
    weights N b, gradients N b, and the optimizer: AdamW two moments (2 N b) plus torch's step counter,
    one float32 scalar per parameter tensor; SGD with momentum one buffer (N b); plain SGD nothing."""
    _check_count("num_parameters", num_parameters)
    _check_count("num_tensors", num_tensors)
    b = _bytes_of(dtype)
    optimizer_bytes = {"adamw": 2 * num_parameters * b + 4 * num_tensors, "sgd_momentum": num_parameters * b,
                       "sgd": 0}
    if optimizer not in optimizer_bytes:
        raise ValueError(f"optimizer must be one of {tuple(optimizer_bytes)}, got {optimizer!r}")
    sizes = {"weights": num_parameters * b, "gradients": num_parameters * b, "optimizer": optimizer_bytes[optimizer]}
    return {**sizes, "total": sum(sizes.values())}


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measured_state_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """The same three numbers read off the live tensors: parameters, their .grad, the optimizer's state."""
    params = list(model.parameters())
    state = [] if optimizer is None else [v for s in optimizer.state.values() for v in s.values()]
    sizes = {"weights": _tensor_bytes(params), "gradients": _tensor_bytes(p.grad for p in params),
             "optimizer": _tensor_bytes(state)}
    return {**sizes, "total": sum(sizes.values())}


def activation_bytes(config: TransformerConfig, batch_size: int, dtype=torch.float32) -> int:
    """Bytes autograd saves for the backward pass of MiniFormer(config) (pre-norm LayerNorm, GELU, SDPA, no
    dropout) on a (batch_size, context_length) batch with a cross-entropy loss, per token:
      each block  LN1 input E + 2 statistics, q k v 3E, attention output E + logsumexp H, its reshaped copy E,
                  LN2 input E + 2, FFN input E, GELU input F, GELU output F          = 8E + 2F + H + 4
      the end     final LN input E + 2, head input E, log-softmax V, the embedding's ids (int64), and one
                  float32 scalar the loss keeps."""
    _check_config(config)
    _check_count("batch_size", batch_size)
    if config.norm != "layernorm" or config.ffn != "gelu" or config.norm_placement != "pre" or config.dropout:
        raise ValueError("activation_bytes models the pre-norm LayerNorm/GELU lab block without dropout only")
    E, F, H, V = config.embed_dim, config.resolved_ffn_hidden_size, config.num_heads, config.vocab_size
    per_token = config.num_layers * (8 * E + 2 * F + H + 4) + 2 * E + 2 + V
    tokens = batch_size * config.context_length
    return tokens * per_token * _bytes_of(dtype) + tokens * 8 + 4


def measure_saved_activation_bytes(model: torch.nn.Module, loss_fn) -> int:
    """Bytes of the distinct tensors autograd saves while loss_fn(model) runs, parameters excluded: the
    activation memory of one training step, measured with torch.autograd.graph.saved_tensors_hooks."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss_fn(model)
    return sum(storages.values())


def mixed_precision_training_bytes(num_parameters: int) -> int:
    """The usual large-model recipe: bf16 weights and gradients, fp32 master weights and two fp32 AdamW
    moments = 2 + 2 + 4 + 4 + 4 = 16 bytes per parameter (activations extra)."""
    _check_count("num_parameters", num_parameters)
    return 16 * num_parameters


# ---------------------------------------------------------------------------------------------------
# 3. Fitting L(N) = E + A / N^alpha and L(N, D) = E + A / N^alpha + B / D^beta
# ---------------------------------------------------------------------------------------------------

HUBER_DELTA = 1e-3  # Hoffmann et al.: robust to the few runs that land far from the law
_GRID = {"e": (-1.0, -0.5, 0.0, 0.5, 1.0), "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
         "alpha": (0.0, 0.5, 1.0, 1.5, 2.0)}  # their grid of starting points (b, beta: as a, alpha)


@dataclass(frozen=True)
class LawFit:
    """A fitted law; B and beta are None for L(N). `objective` is the summed Huber loss at the optimum."""

    E: float
    A: float
    alpha: float
    B: float | None = None
    beta: float | None = None
    objective: float = float("nan")

    def predict(self, N, D=None) -> np.ndarray:
        loss = self.E + self.A / np.asarray(N, dtype=float) ** self.alpha
        if self.B is not None:
            if D is None:
                raise ValueError("D is required: this is a fit of L(N, D)")
            loss = loss + self.B / np.asarray(D, dtype=float) ** self.beta
        return loss

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def _check_data(**columns) -> list:
    arrays = []
    for name, values in columns.items():
        array = np.asarray(values, dtype=float)
        if array.ndim != 1 or array.size < 4:
            raise ValueError(f"{name} must be a 1-D sequence of at least 4 values, got shape {array.shape}")
        if not np.all(np.isfinite(array)) or np.any(array <= 0):
            raise ValueError(f"{name} must hold finite values > 0")
        arrays.append(array)
    if len({a.size for a in arrays}) != 1:
        raise ValueError(f"{', '.join(columns)} must have the same length, got {[a.size for a in arrays]}")
    return arrays


def _log_prediction(theta: torch.Tensor, log_n: torch.Tensor, log_d: torch.Tensor | None) -> torch.Tensor:
    """log L-hat for parameter rows theta (..., 3 or 5) = (e, a, alpha[, b, beta]) at every data point."""
    terms = [theta[..., 0:1].expand(*theta.shape[:-1], log_n.numel()),
             theta[..., 1:2] - theta[..., 2:3] * log_n]
    if log_d is not None:
        terms.append(theta[..., 3:4] - theta[..., 4:5] * log_d)
    return torch.logsumexp(torch.stack(terms), dim=0)  # (..., points)


def _objective(theta, log_n, log_d, log_loss, weights) -> torch.Tensor:
    residual = _log_prediction(theta, log_n, log_d) - log_loss
    huber = torch.nn.functional.huber_loss(residual, torch.zeros_like(residual), reduction="none", delta=HUBER_DELTA)
    return (huber * weights).sum(-1)


def _fit(log_n, log_d, log_loss, weights, starts: list, iterations: int) -> tuple[np.ndarray, float]:
    """L-BFGS from each start; the lowest objective wins."""
    best_theta, best_value = None, math.inf
    for start in starts:
        theta = torch.tensor(start, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=iterations, tolerance_grad=1e-12,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure(theta=theta, optimizer=optimizer):  # bound now: L-BFGS calls it with no arguments
            optimizer.zero_grad()
            value = _objective(theta, log_n, log_d, log_loss, weights)
            value.backward()
            return value

        optimizer.step(closure)
        value = _objective(theta.detach(), log_n, log_d, log_loss, weights).item()
        if math.isfinite(value) and value < best_value:
            best_theta, best_value = theta.detach().numpy().copy(), value
    return best_theta, best_value


def _grid_starts(log_n, log_d, log_loss, weights, num_starts: int) -> list:
    """The num_starts points of Hoffmann et al.'s grid with the lowest objective (evaluated all at once)."""
    axes = [_GRID["e"], _GRID["a"], _GRID["alpha"]] + ([_GRID["a"], _GRID["alpha"]] if log_d is not None else [])
    grid = torch.tensor(list(itertools.product(*axes)), dtype=torch.float64)  # (starts, 3 or 5)
    values = _objective(grid, log_n, log_d, log_loss, weights)
    return [grid[i].tolist() for i in torch.argsort(values)[:num_starts]]


def _law(theta: np.ndarray, value: float) -> LawFit:
    e, a, alpha = theta[:3]
    extra = dict(B=float(np.exp(theta[3])), beta=float(theta[4])) if theta.size == 5 else {}
    return LawFit(E=float(np.exp(e)), A=float(np.exp(a)), alpha=float(alpha), objective=value, **extra)


def _fit_law(N, D, loss, weights=None, num_starts: int = 4, iterations: int = 200, extra_starts=()) -> LawFit:
    if isinstance(num_starts, bool) or not isinstance(num_starts, int) or num_starts < (0 if extra_starts else 1):
        raise ValueError(f"num_starts must be an integer >= 1, got {num_starts!r}")
    _check_count("iterations", iterations)
    log_n = torch.tensor(np.log(N), dtype=torch.float64)
    log_d = None if D is None else torch.tensor(np.log(D), dtype=torch.float64)
    log_loss = torch.tensor(np.log(loss), dtype=torch.float64)
    weights = torch.ones_like(log_loss) if weights is None else torch.tensor(weights, dtype=torch.float64)
    starts = _grid_starts(log_n, log_d, log_loss, weights, num_starts) + [list(s) for s in extra_starts]
    theta, value = _fit(log_n, log_d, log_loss, weights, starts, iterations)
    if theta is None:
        raise RuntimeError("no start of the fit reached a finite objective")
    return _law(theta, value)


def fit_power_law(N, loss, num_starts: int = 4) -> LawFit:
    """Fit L(N) = E + A / N^alpha (Huber on log L, L-BFGS from the best grid starts)."""
    N, loss = _check_data(N=N, loss=loss)
    return _fit_law(N, None, loss, num_starts=num_starts)


def fit_chinchilla(N, D, loss, num_starts: int = 4) -> LawFit:
    """Fit L(N, D) = E + A / N^alpha + B / D^beta as Hoffmann et al. (2022) did (their approach 3)."""
    N, D, loss = _check_data(N=N, D=D, loss=loss)
    return _fit_law(N, D, loss, num_starts=num_starts)


def _theta_of(fit: LawFit) -> list:
    theta = [math.log(fit.E), math.log(fit.A), fit.alpha]
    return theta + ([math.log(fit.B), fit.beta] if fit.B is not None else [])


def bootstrap_fits(N, loss, D=None, resamples: int = 100, seed: int = 0) -> tuple[LawFit, list]:
    """(fit on all points, fits on `resamples` resamples drawn with replacement). A resample is the data
    with each point weighted by how often it was drawn; its fit starts from the fit on all points."""
    _check_count("resamples", resamples)
    columns = _check_data(N=N, loss=loss) if D is None else _check_data(N=N, D=D, loss=loss)
    N, loss = columns[0], columns[-1]
    D = None if D is None else columns[1]
    full = _fit_law(N, D, loss)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(resamples):
        counts = np.bincount(rng.integers(0, N.size, N.size), minlength=N.size).astype(float)
        fits.append(_fit_law(N, D, loss, weights=counts, num_starts=0, extra_starts=[_theta_of(full)]))
    return full, fits


def interval(fits: list, name: str, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of one parameter (or any attribute) over bootstrap fits."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    values = np.array([getattr(f, name) for f in fits], dtype=float)
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def compute_optimal(fit: LawFit, compute) -> dict:
    """Minimise L(N, D) subject to 6 N D = C: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt = C / (6 N_opt),
    G = (alpha A / (beta B))^(1/(alpha+beta)). Returns N_opt, D_opt, tokens_per_parameter and the loss."""
    if fit.B is None:
        raise ValueError("fit must be an L(N, D) fit (fit_chinchilla), got an L(N) fit")
    compute = np.asarray(compute, dtype=float)
    if not np.all(np.isfinite(compute)) or np.any(compute <= 0):
        raise ValueError("compute must hold finite FLOP counts > 0")
    G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1 / (fit.alpha + fit.beta))
    n_opt = G * (compute / 6) ** (fit.beta / (fit.alpha + fit.beta))
    d_opt = compute / (6 * n_opt)
    return {"N_opt": n_opt, "D_opt": d_opt, "tokens_per_parameter": d_opt / n_opt, "loss": fit.predict(n_opt, d_opt)}

