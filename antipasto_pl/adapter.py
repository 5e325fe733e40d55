"""The SVD adapter: the policy's only trainable parameters.

Each targeted ``nn.Linear`` with weight ``W = U diag(sigma) Vh`` (thin SVD, optionally
capped to the top ``r_max`` axes) becomes an ``SVDLinear`` (same module, names and state-dict
keys) with a child ``svd_adapter`` holding two trainable vectors of length r, both zero at init:

    y = W x + U diag(delta_s + delta_s_hack) Vh x

Two ways to compute it. Merged (``AdapterConfig.merged_forward``, the float32 default): the layer
keeps ``W_eff = W + U diag(delta) Vh`` materialised, re-merged only when a vector, the mode or ``W``
changed (so once per optimizer step), and runs ``W_eff x`` with a custom autograd Function that
returns ``dL/d delta = sum_t (Vh x_t) * (U^T dy_t)``: two matrix products forward and two backward
instead of three and three, and sampling runs at base-model speed with no merge of its own.
Additive (lower precision, where rounding ``W_eff`` would drop small updates): ``W x`` plus the
adapter term. Either way, with zero vectors the output is bit-identical to the base model, and
``W`` itself is never modified. ``U``/``Vh`` are non-persistent buffers (never in checkpoints),
loaded from an SVD cache keyed by a hash of the weight bytes.

Contexts switch what the layers add: ``reference_policy`` (nothing: pi_ref for the KL),
``quarantine_ablated`` (``delta_s`` only: the deployed view of a routed model) and
``merged_weights`` (sampling: merged weights in every precision).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from antipasto_pl.models import check_decoder_only
from antipasto_pl.storage import atomic_write, cache_root

log = logging.getLogger(__name__)

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
GATED_DELTANET_TARGETS = ("in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + MLP_TARGETS + GATED_DELTANET_TARGETS
ADAPTER_FORMAT = "antipasto-svd-adapter/1"

# What the hooks add: both vectors, delta_s only (quarantine ablated), or nothing.
FULL, ABLATE_HACK, OFF = "full", "ablate_hack", "off"


@dataclass
class AdapterConfig:
    """Which Linear layers get an SVD adapter.

    Args:
        target_modules: final name components of the ``nn.Linear`` layers to wrap
            (attention, MLP and GatedDeltaNet projections by default; never embeddings
            or ``lm_head``).
        r_max: keep only the top ``r_max`` singular axes per module (None: full rank).
        svd_cache: cache SVD factors on disk, keyed by a hash of the weight bytes.
        merged_forward: train and sample on the materialised ``W + U diag(delta) Vh``, re-merged once
            per change of the vectors: 2 matrix products per layer forward and backward instead of 3,
            for one more copy of the wrapped weights in memory. None: on for float32 weights, off for
            lower precision, where rounding the merged weight would drop small updates from the
            training forward (those still sample on merged weights, merged per rollout).
    """

    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    r_max: int | None = None
    svd_cache: bool = True
    merged_forward: bool | None = None

    def __post_init__(self) -> None:
        if self.r_max is not None and self.r_max < 1:
            raise ValueError(f"adapter.r_max must be a positive integer or null, got {self.r_max}")
        if not self.target_modules:
            raise ValueError("adapter.target_modules must name at least one Linear layer")


class SVDAdapter(nn.Module):
    """Trainable singular-value offsets of one Linear layer, and its merged weight.

    ``delta_s`` is the policy's knob; ``delta_s_hack`` is the quarantine that only the
    route arm moves and deployment zeroes. The merged weight is a cache keyed on the
    vectors' and the weight's identity and in-place version counters, so any change made
    through torch ops (optimizer steps, ``copy_``, loading) re-merges on the next forward;
    a write through ``.data`` bypasses the counters and is not seen.
    """

    def __init__(self, u: Tensor, vh: Tensor, weight_hash: str, merged_forward: bool = False) -> None:
        super().__init__()
        rank = vh.shape[0]
        self.delta_s = nn.Parameter(torch.zeros(rank, dtype=torch.float32, device=vh.device))
        self.delta_s_hack = nn.Parameter(torch.zeros(rank, dtype=torch.float32, device=vh.device))
        self.register_buffer("U", u, persistent=False)  # (d_out, r)
        self.register_buffer("Vh", vh, persistent=False)  # (r, d_in)
        self.weight_hash = weight_hash
        self.mode = FULL
        self.merged_forward = merged_forward
        self.sampling = False  # set by merged_weights(): sample on the merged weight in any precision
        self.row_probe: Tensor | None = None  # set by row_delta_probes(): (B, r), zero, its grad per row
        self._merged: Tensor | None = None
        self._merged_key: tuple = ()
        self._merged_sources: tuple[Tensor, ...] = ()  # held so that the ids in the key stay unique

    @property
    def rank(self) -> int:
        return self.delta_s.shape[0]

    def effective_delta(self) -> Tensor:
        """The singular-value offset the current mode applies: (r,)."""
        if self.mode == FULL:
            return self.delta_s + self.delta_s_hack
        if self.mode == ABLATE_HACK:
            return self.delta_s
        return torch.zeros_like(self.delta_s)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., d_in) -> (..., d_out) = U diag(delta) Vh x
        coords = nn.functional.linear(x, self.Vh.to(x.dtype))
        delta = self.effective_delta()  # (r,)
        if self.row_probe is not None:  # (B, r) -> (B, 1, ..., r): row b's tokens see delta + probe[b]
            delta = delta + self.row_probe.reshape(x.shape[0], *[1] * (x.dim() - 2), -1)
        return nn.functional.linear(coords * delta.to(x.dtype), self.U.to(x.dtype))

    def merge_into(self, weight: Tensor) -> Tensor:
        """``W + U diag(delta) Vh`` for the current mode, computed in at least float32, in W's dtype."""
        compute = torch.promote_types(weight.dtype, torch.float32)
        scaled_u = self.U.to(compute) * self.effective_delta().to(compute)  # (d_out, r)
        return torch.addmm(weight.to(compute), scaled_u, self.Vh.to(compute)).to(weight.dtype)

    def merged_weight(self, weight: Tensor) -> Tensor:
        """``W + U diag(delta) Vh`` for the current mode, in W's dtype: (d_out, d_in); merged again only
        if a vector, the mode or ``W`` changed since the cached one."""
        key = (self.mode, *(tensor_identity(t) for t in (weight, self.delta_s, self.delta_s_hack)))
        if self._merged is None or key != self._merged_key:
            # Outside inference mode: the cache is also saved for backward by training forwards.
            with torch.inference_mode(False), torch.no_grad():
                merged = self.merge_into(weight)
            self._merged, self._merged_key = merged, key
            self._merged_sources = (weight, self.delta_s, self.delta_s_hack)
        return self._merged

    def drop_merged(self) -> None:
        self._merged, self._merged_key, self._merged_sources = None, (), ()

    def extra_repr(self) -> str:
        return f"rank={self.rank}, weight_hash={self.weight_hash[:12]}, merged_forward={self.merged_forward}"


def tensor_identity(t: Tensor) -> tuple:
    """What changes when ``t`` is replaced, moved or modified in place."""
    return id(t), t._version, t.data_ptr(), t.device, t.dtype


class _MergedLinear(torch.autograd.Function):
    """``y = W_eff x + b`` on a precomputed ``W_eff = W + U diag(delta) Vh``, differentiable in ``x`` and
    ``delta``: backward gives ``dx = W_eff^T dy`` and ``d delta = sum_t (Vh x_t) * (U^T dy_t)``. Given a (B, r)
    ``delta`` (a row probe, zero: ``W_eff`` already holds the vectors) the sum runs over each row's own tokens
    only, so one backward yields every row's gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, delta: Tensor, merged: Tensor, bias: Tensor | None, u: Tensor, vh: Tensor) -> Tensor:
        # x: (..., d_in), delta: (r,), merged: (d_out, d_in), u: (d_out, r), vh: (r, d_in)
        coords = nn.functional.linear(x, vh.to(x.dtype))  # (..., r)
        ctx.save_for_backward(coords, merged, u)
        ctx.delta_dtype = delta.dtype
        ctx.delta_rows = delta.shape[0] if delta.dim() == 2 else None
        return nn.functional.linear(x, merged, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        coords, merged, u = ctx.saved_tensors
        # Under autocast dy may be in lower precision than W_eff; autograd casts dx back to x's dtype.
        grad_x = grad_out @ merged.to(grad_out.dtype) if ctx.needs_input_grad[0] else None
        grad_delta = grad_bias = None
        if ctx.needs_input_grad[1]:
            back = grad_out @ u.to(grad_out.dtype)  # (..., r): U^T dy
            grad_delta = _delta_grad(coords, back, ctx.delta_rows).to(ctx.delta_dtype)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_delta, None, grad_bias, None, None


def _delta_grad(coords: Tensor, back: Tensor, rows: int | None) -> Tensor:
    """``sum_t (Vh x_t) * (U^T dy_t)`` over all tokens (rows None: (r,)) or over each of ``rows`` rows: (rows, r)."""
    # coords, back: (..., r) with the leading dimension the rows when rows is given
    products = coords.float() * back.float()
    if rows is None:
        return products.reshape(-1, products.shape[-1]).sum(0)
    return products.reshape(rows, -1, products.shape[-1]).sum(1)


class SVDLinear(nn.Linear):
    """An ``nn.Linear`` with an ``svd_adapter`` child; ``attach_adapter`` re-classes a layer in place, so
    its name, parameters and state-dict keys stay those of the base model."""

    svd_adapter: SVDAdapter

    def forward(self, x: Tensor) -> Tensor:
        adapter = self.svd_adapter
        if adapter.mode == OFF:
            return nn.functional.linear(x, self.weight, self.bias)
        # A trainable base weight needs autograd's own path (the merged Function has no weight gradient).
        if (adapter.merged_forward or adapter.sampling) and not self.weight.requires_grad:
            merged = adapter.merged_weight(self.weight)
            if not torch.is_grad_enabled():
                return nn.functional.linear(x, merged, self.bias)
            delta = adapter.effective_delta() if adapter.row_probe is None else adapter.row_probe
            return _MergedLinear.apply(x, delta, merged, self.bias, adapter.U, adapter.Vh)
        return nn.functional.linear(x, self.weight, self.bias) + adapter(x)


def attach_adapter(linear: nn.Linear, adapter: SVDAdapter) -> None:
    """Give a plain ``nn.Linear`` its adapter (in place)."""
    if type(linear) is not nn.Linear:
        raise TypeError(
            f"the SVD adapter wraps plain torch.nn.Linear layers, got {type(linear).__module__}."
            f"{type(linear).__qualname__} (quantised or otherwise specialised layers are not supported)"
        )
    linear.svd_adapter = adapter
    linear.__class__ = SVDLinear


def weight_hash(weight: Tensor) -> str:
    """blake2b of the weight's bytes, shape and dtype: the identity of a base layer."""
    flat = weight.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{tuple(weight.shape)}|{weight.dtype}|".encode())
    digest.update(memoryview(flat))
    return digest.hexdigest()


def svd_factors(weight: Tensor, r_max: int | None, cache_dir: Path | None) -> tuple[Tensor, Tensor, str]:
    """Thin SVD of ``weight`` truncated to ``r_max``: U (d_out, r), Vh (r, d_in), weight hash.

    Computed in float32 and stored in the weight's dtype; cached by the weight hash, so a
    stale cache cannot be loaded for a changed weight.
    """
    key = weight_hash(weight)
    rank = min(weight.shape) if r_max is None else min(r_max, *weight.shape)
    path = None if cache_dir is None else cache_dir / f"{key}-r{rank}.safetensors"
    if path is not None and path.is_file():
        factors = load_file(path, device=str(weight.device))
        return factors["U"], factors["Vh"], key
    u, _, vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    u = u[:, :rank].to(weight.dtype).contiguous()
    vh = vh[:rank].to(weight.dtype).contiguous()
    if path is not None:
        with atomic_write(path) as tmp:
            save_file({"U": u.cpu(), "Vh": vh.cpu()}, tmp)
    return u, vh, key


def target_linears(model: nn.Module, target_modules: list[str] | tuple[str, ...]) -> dict[str, nn.Linear]:
    """Linear layers whose last name component is a target, in model order."""
    targets = set(target_modules)
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets
    }


@dataclass(frozen=True)
class AdapterSummary:
    n_modules: int
    n_trainable: int
    n_base_params: int


def wrap_model(model: nn.Module, cfg: AdapterConfig | None = None) -> AdapterSummary:
    """Freeze ``model`` and attach an ``SVDAdapter`` to every targeted Linear, in place."""
    cfg = cfg or AdapterConfig()
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(f"{type(model).__name__} has no transformers config; expected a causal LM")
    check_decoder_only(config, type(model).__name__)
    if adapter_modules(model):
        raise RuntimeError(f"{type(model).__name__} already carries SVD adapters; wrap a model once")
    linears = target_linears(model, cfg.target_modules)
    if not linears:
        raise ValueError(
            f"no nn.Linear in {type(model).__name__} is named like adapter.target_modules="
            f"{list(cfg.target_modules)}"
        )
    cache_dir = cache_root() / "svd" if cfg.svd_cache else None
    n_base = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    for name, linear in linears.items():
        u, vh, key = svd_factors(linear.weight, cfg.r_max, cache_dir)
        merged_forward = cfg.merged_forward if cfg.merged_forward is not None else linear.weight.dtype == torch.float32
        try:
            attach_adapter(linear, SVDAdapter(u, vh, key, merged_forward))
        except TypeError as err:
            raise TypeError(f"{name}: {err}") from None
    n_trainable = sum(p.numel() for p in adapter_parameters(model))
    log.info("SVD adapter: wrapped %d modules, %d trainable parameters (base model %d)",
             len(linears), n_trainable, n_base)
    return AdapterSummary(len(linears), n_trainable, n_base)


def adapter_modules(model: nn.Module) -> dict[str, SVDAdapter]:
    """Wrapped Linear name -> its adapter, in model order."""
    return {
        name.removesuffix(".svd_adapter"): module
        for name, module in model.named_modules()
        if isinstance(module, SVDAdapter)
    }


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for a in adapter_modules(model).values() for p in (a.delta_s, a.delta_s_hack)]


@contextlib.contextmanager
def _adapter_mode(model: nn.Module, mode: str) -> Iterator[None]:
    adapters = list(adapter_modules(model).values())
    previous = [a.mode for a in adapters]
    try:
        for a in adapters:
            a.mode = mode
        yield
    finally:
        for a, m in zip(adapters, previous):
            a.mode = m


@contextlib.contextmanager
def row_delta_probes(model: nn.Module, rows: int) -> Iterator[dict[str, Tensor]]:
    """Per-example gradients on ``delta_s`` from one backward: every adapter gets a zero (rows, r) probe added
    to its vector for the tokens of each batch row, so ``d loss / d probe[b]`` is row b's gradient on the
    vector (``delta_s`` and ``delta_s + delta_s_hack`` have the same gradient). Forward values are unchanged.
    Yields module name -> probe; batch rows must be the first dimension of every adapted layer's input."""
    adapters = adapter_modules(model)
    probes = {
        name: torch.zeros(rows, a.rank, dtype=a.delta_s.dtype, device=a.delta_s.device, requires_grad=True)
        for name, a in adapters.items()
    }
    try:
        for name, a in adapters.items():
            a.row_probe = probes[name]
        yield probes
    finally:
        for a in adapters.values():
            a.row_probe = None


def reference_policy(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """pi_ref for the KL term: the base model, as if both vectors were zero."""
    return _adapter_mode(model, OFF)


def quarantine_ablated(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Deployment view of a routed model: ``delta_s_hack`` zeroed, ``delta_s`` kept."""
    return _adapter_mode(model, ABLATE_HACK)


@contextlib.contextmanager
def merged_weights(model: nn.Module) -> Iterator[None]:
    """Sample on ``W + U diag(delta) Vh`` (respecting an enclosing ablation) at base-model speed.

    Layers that train on merged weights already hold them (merged once per change of the vectors);
    the others merge here and drop the merged copies on exit. ``W`` itself is never written.
    """
    adapters = list(adapter_modules(model).values())
    previous = [a.sampling for a in adapters]
    try:
        for a in adapters:
            a.sampling = True
        yield
    finally:
        for a, was in zip(adapters, previous):
            a.sampling = was
            if not (a.sampling or a.merged_forward):
                a.drop_merged()


def refresh_merged(model: nn.Module) -> None:
    """Merge every layer that trains on merged weights now (after an optimizer step), instead of in the
    first forward that needs it."""
    linears = dict(model.named_modules())
    for name, adapter in adapter_modules(model).items():
        if adapter.merged_forward and adapter.mode != OFF:
            adapter.merged_weight(linears[name].weight)


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict with every wrapped weight replaced by ``W + U diag(delta) Vh`` for the current
    mode (inside ``quarantine_ablated``: ``delta_s`` only) and the adapter's own entries left out: a plain
    model of the base architecture."""
    linears = dict(model.named_modules())
    state = {k: v for k, v in model.state_dict().items() if ".svd_adapter." not in k}
    with torch.no_grad():
        for name, adapter in adapter_modules(model).items():
            weight = linears[name].weight
            # Layers that train on merged weights hold the current merge already.
            state[f"{name}.weight"] = adapter.merged_weight(weight) if adapter.merged_forward else adapter.merge_into(weight)
    return state


def adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The trained vectors: ``{module}.delta_s`` and ``{module}.delta_s_hack``."""
    state = {}
    for name, a in adapter_modules(model).items():
        state[f"{name}.delta_s"] = a.delta_s.detach().cpu().contiguous()
        state[f"{name}.delta_s_hack"] = a.delta_s_hack.detach().cpu().contiguous()
    return state


def adapter_metadata(model: nn.Module) -> dict:
    """What an adapter file must match: module names, ranks, base-weight hashes."""
    config = getattr(model, "config", None)
    return {
        "format": ADAPTER_FORMAT,
        "model_type": getattr(config, "model_type", None),
        "name_or_path": getattr(config, "name_or_path", None),
        "modules": {name: {"rank": a.rank, "weight_hash": a.weight_hash} for name, a in adapter_modules(model).items()},
    }


def save_adapter(model: nn.Module, path: str | Path) -> None:
    """Write the adapter vectors and their metadata to a safetensors file (atomically)."""
    with atomic_write(path) as tmp:
        save_file(adapter_state(model), tmp, metadata={"antipasto": json.dumps(adapter_metadata(model))})


def check_adapter_metadata(model: nn.Module, found: dict, source: str) -> None:
    """Raise, naming the module and expected vs found, if ``found`` does not fit ``model``."""
    expected = adapter_metadata(model)
    if found.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{source}: format {found.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    exp_modules, found_modules = expected["modules"], found.get("modules", {})
    missing = [n for n in exp_modules if n not in found_modules]
    extra = [n for n in found_modules if n not in exp_modules]
    if missing or extra:
        detail = f"missing module {missing[0]!r}" if missing else f"unexpected module {extra[0]!r}"
        raise ValueError(
            f"{source} does not match the model's adapter modules: {detail} "
            f"(model wraps {len(exp_modules)} modules, file has {len(found_modules)}; "
            "were adapter.target_modules the same?)"
        )
    for name, exp in exp_modules.items():
        got = found_modules[name]
        if got.get("rank") != exp["rank"]:
            raise ValueError(
                f"{source}: module {name!r} has rank {got.get('rank')} there, but the model's adapter has "
                f"rank {exp['rank']} (was adapter.r_max the same?)"
            )
        if got.get("weight_hash") != exp["weight_hash"]:
            raise ValueError(
                f"{source}: module {name!r} was trained on a base weight with hash "
                f"{str(got.get('weight_hash'))[:12]}..., but this model's is {exp['weight_hash'][:12]}... "
                "(another base model or dtype?)"
            )


def load_adapter(model: nn.Module, path: str | Path) -> None:
    """Load adapter vectors saved by ``save_adapter`` after checking they fit ``model``."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("antipasto")
    except Exception as err:
        raise ValueError(f"{path} is not a readable safetensors adapter file: {err}") from err
    if raw is None:
        raise ValueError(f"{path} has no antipasto adapter metadata; expected a file written by save_adapter")
    check_adapter_metadata(model, json.loads(raw), str(path))
    state = load_file(str(path))
    with torch.no_grad():
        for name, a in adapter_modules(model).items():
            a.delta_s.copy_(state[f"{name}.delta_s"])
            a.delta_s_hack.copy_(state[f"{name}.delta_s_hack"])
