"""Extracting the hack subspace V from a live model (docs/design.md section 3): pair gradients, per-module bases,
negative controls, safetensors io and a content-keyed cache.

The per-module math (SVD, orientation, floors, controls) is in `vhack_math`; this module feeds it the
gradients of the SVD-wrapped policy on labelled pairs and records what V was extracted from, so that V is
never applied to a model, a pair set or an adapter state it does not belong to.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from antipasto_pl.adapter import adapter_metadata, adapter_modules, quarantine_ablated, row_delta_probes
from antipasto_pl.env.pairs import Pair
from antipasto_pl.grpo import target_log_probs
from antipasto_pl.sequences import CompletionBatch, encode_completions
from antipasto_pl.storage import atomic_write, cache_root
from antipasto_pl.vhack_math import apply_noise_floor, hack_basis_from_pair_grads, random_basis, shuffle_pair_labels

log = logging.getLogger(__name__)

LengthNorm = Literal["mean", "sum"]
SubspaceKind = Literal["real", "random", "shuffled", "nonhack", "stub"]
VHACK_FORMAT = "antipasto-vhack/1"
_METADATA_KEY = "antipasto_vhack"

# The extraction length normalisation that matches each GRPO loss reduction (`grpo.Reduction`): Dr.GRPO's fixed
# denominator weighs every completion token alike (a sum, up to a constant that rescales V's singular values
# only), classic GRPO averages over each completion's own tokens.
MATCHING_LENGTH_NORM: dict[str, LengthNorm] = {"dr_grpo": "sum", "sequence": "mean"}

Metadata = dict[str, str | int | float | None]


# --- pair gradients -------------------------------------------------------------------------------------------


def completion_loss(model: nn.Module, batch: CompletionBatch, length_norm: LengthNorm) -> Tensor:
    """Teacher-forced NLL of each row's completion tokens, summed (`sum`) or averaged per token (`mean`): (B,).

    Logits are computed from the earliest position that scores a completion token on (``logits_to_keep``),
    not over the prompts, which would cost the vocabulary projection and its softmax for nothing."""
    start = max(int(batch.completion_mask.argmax(-1).min()) - 1, 0)  # position whose logits score token start+1
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                   logits_to_keep=batch.input_ids.shape[1] - start).logits  # (B, T-start, V)
    log_probs = target_log_probs(logits[:, :-1], batch.input_ids[:, start + 1:])  # (B, T-start-1)
    mask = batch.completion_mask[:, start + 1:].to(torch.float32)  # (B, T-start-1), aligned with log_probs
    nll = -(log_probs * mask).sum(-1)
    if length_norm == "sum":
        return nll
    if length_norm == "mean":
        return nll / mask.sum(-1).clamp_min(1.0)
    raise ValueError(f"length_norm must be one of {get_args(LengthNorm)}, got {length_norm!r}")


@contextlib.contextmanager
def _gradient_probe(model: nn.Module) -> Iterator[dict[str, nn.Parameter]]:
    """Every adapter's ``delta_s``, made to require grad, with the model in eval mode (no dropout noise in V)
    and grad enabled even under an enclosing ``no_grad`` / ``inference_mode`` (a refresh inside a hook).

    Restores every module's training flag and every ``delta_s.requires_grad`` exactly on exit.
    """
    params = {name: adapter.delta_s for name, adapter in adapter_modules(model).items()}
    if not params:
        raise ValueError(f"{type(model).__name__} carries no SVD adapters; call adapter.wrap_model on it first")
    requires_grad = {name: p.requires_grad for name, p in params.items()}
    training = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        for p in params.values():
            p.requires_grad_(True)
        with torch.inference_mode(False), torch.enable_grad():
            yield params
    finally:
        for name, p in params.items():
            p.requires_grad_(requires_grad[name])
        for module, was_training in training:
            module.training = was_training


def pair_gradients(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions_a: Sequence[str],
    completions_b: Sequence[str],
    *,
    length_norm: LengthNorm = "mean",
    prefills: Sequence[str] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Gradient of each completion's NLL (given its prompt) on every adapter's ``delta_s``, per completion:
    ``g_a[name][j]`` belongs to ``completions_a[j]`` alone, ``g_b`` likewise.

    ``batch_size`` completions share one forward and one backward: each row gets its own zero probe on every
    adapter's vector (``adapter.row_delta_probes``), whose gradient is that row's gradient alone (right padding is
    masked and comes after the row's tokens, so it reaches no scored position). Rows are taken in order of
    length, so a batch pads little. ``torch.autograd.grad`` returns gradients instead of accumulating them, so
    existing ``.grad`` tensors (e.g. of a training step in progress) are left as they were; ``requires_grad``
    flags and train/eval modes are restored on return.

    ``prefills`` (one per prompt) open the assistant turns: the completions continue them, as in training.
    ``length_norm`` should match the live loss's reduction (``MATCHING_LENGTH_NORM``: ``dr_grpo`` -> ``sum``,
    ``sequence`` -> ``mean``). The defaults do not match (``mean`` here, ``dr_grpo`` in the loss), and that
    mismatch biases V toward short completions: under ``mean`` each completion weighs 1 however long it is, so a
    token of a short completion counts 1/L_short against 1/L_long, while Dr.GRPO counts every token alike. V then
    fits the token gradients of short completions (typically the stub hacks) more than the live gradient it
    projects does. It also keeps the text a hack shares with its clean from cancelling in D (weighted 1/L_hack
    against 1/L_clean).

    Returns g_a, g_b: name -> (n, r) float32 tensors on the model's device.
    """
    n = len(prompts)
    if not n or len(completions_a) != n or len(completions_b) != n:
        raise ValueError(
            f"need one completion of each side per prompt and at least one prompt, got {n} prompts, "
            f"{len(completions_a)} and {len(completions_b)} completions"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    prefills = list(prefills) if prefills is not None else [""] * n
    rows = [(prompts[j], prefills[j], completions[j]) for completions in (completions_a, completions_b)
            for j in range(n)]
    batch = encode_completions(tokenizer, [p for p, _, _ in rows], [c for _, _, c in rows], [f for _, f, _ in rows])
    order = batch.attention_mask.sum(-1).argsort(descending=True, stable=True).tolist()
    grads: dict[str, Tensor] = {}
    with _gradient_probe(model) as params:
        for start in tqdm(range(0, len(rows), batch_size), desc="pair gradients", unit="batch", disable=not progress):
            chunk = order[start:start + batch_size]
            width = int(batch.attention_mask[chunk].sum(-1).max())
            sub = CompletionBatch(*(t[chunk, :width].to(device) for t in
                                    (batch.input_ids, batch.attention_mask, batch.completion_mask)))
            with row_delta_probes(model, len(chunk)) as probes:
                loss = completion_loss(model, sub, length_norm).sum()
                rows_grads = torch.autograd.grad(loss, list(probes.values()), materialize_grads=True)
            for name, grad in zip(params, rows_grads):
                grads.setdefault(name, torch.zeros(len(rows), grad.shape[-1], device=device))[chunk] = grad.float()
    return {name: g[:n] for name, g in grads.items()}, {name: g[n:] for name, g in grads.items()}


# --- identities -----------------------------------------------------------------------------------------------


def _digest(payload: object) -> str:
    return hashlib.blake2b(json.dumps(payload).encode(), digest_size=16).hexdigest()


def base_digest(model: nn.Module) -> str:
    """Identity of the wrapped base model: every adapter's module name, rank and base-weight hash."""
    return _digest([[name, m["rank"], m["weight_hash"]] for name, m in adapter_metadata(model)["modules"].items()])


def adapter_digest(model: nn.Module) -> str:
    """Identity of the current ``delta_s`` values (what extraction differentiates at); "zero" at init, so fresh
    runs of any seed share a cache entry."""
    adapters = adapter_modules(model)
    if all(not a.delta_s.detach().any() for a in adapters.values()):
        return "zero"
    digest = hashlib.blake2b(digest_size=16)
    for name, a in adapters.items():
        digest.update(name.encode())
        digest.update(memoryview(a.delta_s.detach().float().cpu().contiguous().view(torch.uint8).numpy()))
    return digest.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """What of the tokenizer shapes the tokens scored: its class, source, vocabulary size and chat template."""
    return _digest([type(tokenizer).__name__, tokenizer.name_or_path, len(tokenizer), tokenizer.chat_template])


def pair_set_hash(pairs: Sequence[Pair]) -> str:
    """Identity of an ordered pair set: its prompt / prefill / hack / clean texts (order matters to `shuffled`)."""
    return _digest([[p.prompt, p.prefill, p.hack, p.clean] for p in pairs])


# --- the subspace ---------------------------------------------------------------------------------------------


@dataclass
class HackSubspace:
    """Per-module hack-ward bases V and what they were extracted from.

    Attributes:
        v_hack: module name -> (k_m, r_m) orthonormal rows, each oriented hack-ward (a live gradient g with
            v . g > 0 is one whose descent step moves toward hacking). Modules without rows are absent: they are
            not projected.
        singular_values: module name -> (k_m,) singular values of the pair-difference matrix D (1 for `random`).
        weight_hashes: module name -> hash of the base weight the basis belongs to (checked on load).
        metadata: provenance (kind, k, digests of base model / adapter state / pair set, length_norm, ...).
    """

    v_hack: dict[str, Tensor]
    singular_values: dict[str, Tensor]
    weight_hashes: dict[str, str]
    metadata: Metadata = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.v_hack.keys() == self.singular_values.keys() == self.weight_hashes.keys()):
            raise ValueError("v_hack, singular_values and weight_hashes must name the same modules")
        for name, v in self.v_hack.items():
            s = self.singular_values[name]
            if v.dim() != 2 or s.shape != (v.shape[0],):
                raise ValueError(f"module {name!r}: expected v_hack (k, r) and singular_values (k,), "
                                 f"got {tuple(v.shape)} and {tuple(s.shape)}")

    @property
    def modules(self) -> list[str]:
        return list(self.v_hack)

    def to(self, device: torch.device | str) -> HackSubspace:
        return HackSubspace(
            {name: v.to(device) for name, v in self.v_hack.items()},
            {name: s.to(device) for name, s in self.singular_values.items()},
            dict(self.weight_hashes),
            dict(self.metadata),
        )

    def after_noise_floor(self, drop_bottom_frac: float) -> HackSubspace:
        """The global noise floor (`vhack_math.apply_noise_floor`): rows below the pooled `drop_bottom_frac`
        quantile of singular values are dropped, and modules left without rows are dropped (not projected)."""
        keep = apply_noise_floor(self.singular_values, drop_bottom_frac)
        names = [name for name, mask in keep.items() if mask.any()]
        return HackSubspace(
            {name: self.v_hack[name][keep[name].to(self.v_hack[name].device)] for name in names},
            {name: self.singular_values[name][keep[name]] for name in names},
            {name: self.weight_hashes[name] for name in names},
            {**self.metadata, "drop_bottom_frac": drop_bottom_frac},
        )

    def check_model(self, model: nn.Module, source: str = "hack subspace") -> None:
        """Raise, naming the module and expected vs found, unless every module here is a wrapped module of
        ``model`` with the same rank and base weight."""
        modules = adapter_metadata(model)["modules"]
        for name, v in self.v_hack.items():
            if name not in modules:
                example = next(iter(modules), "none")
                raise ValueError(
                    f"{source}: module {name!r} has a hack basis, but the model has no SVD adapter there (it wraps "
                    f"{len(modules)} modules, e.g. {example!r}; were adapter.target_modules the same?)"
                )
            rank, weight = modules[name]["rank"], modules[name]["weight_hash"]
            if v.shape[1] != rank:
                raise ValueError(
                    f"{source}: module {name!r} has rank {v.shape[1]} in the hack basis, but the model's adapter "
                    f"has rank {rank} (was adapter.r_max the same?)"
                )
            if self.weight_hashes[name] != weight:
                raise ValueError(
                    f"{source}: module {name!r} was extracted on a base weight with hash "
                    f"{self.weight_hashes[name][:12]}..., but this model's is {weight[:12]}... "
                    "(another base model, seed or dtype?)"
                )

    def save(self, path: str | Path) -> None:
        """Write V, singular values and provenance to a safetensors file, atomically (tmp file + os.replace)."""
        tensors = {}
        for name in self.v_hack:
            tensors[f"{name}.v_hack"] = self.v_hack[name].detach().float().cpu().contiguous()
            tensors[f"{name}.singular_values"] = self.singular_values[name].detach().float().cpu().contiguous()
        header = {"format": VHACK_FORMAT, "weight_hashes": self.weight_hashes, "metadata": self.metadata}
        with atomic_write(path) as tmp:
            save_file(tensors, tmp, metadata={_METADATA_KEY: json.dumps(header)})

    @classmethod
    def load(cls, path: str | Path, model: nn.Module | None = None) -> HackSubspace:
        """Read a file written by `save` (on the CPU); with ``model``, check it belongs to that model."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = (f.metadata() or {}).get(_METADATA_KEY)
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors hack-subspace file: {err}") from err
        header = json.loads(raw) if raw is not None else {}
        if header.get("format") != VHACK_FORMAT:
            raise ValueError(f"{path}: format {header.get('format')!r}, expected {VHACK_FORMAT!r} "
                             "(a file written by HackSubspace.save)")
        tensors = load_file(str(path))
        names = list(header["weight_hashes"])
        subspace = cls(
            {name: tensors[f"{name}.v_hack"] for name in names},
            {name: tensors[f"{name}.singular_values"] for name in names},
            header["weight_hashes"],
            header["metadata"],
        )
        if model is not None:
            subspace.check_model(model, str(path))
        return subspace


# --- extraction -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionSettings:
    """How V is extracted (besides the model and the pairs).

    Attributes:
        k: rows (axes) kept per module.
        kind: ``real`` or a control: ``random``, ``shuffled``, ``nonhack``, ``stub`` (the pairs decide the last
            two).
        tau_axis: drop rows whose singular value is below tau_axis times the module's top one.
        length_norm: per-completion NLL normalisation, ``mean`` or ``sum`` (see `pair_gradients`).
        seed: seed of the ``shuffled`` / ``random`` controls (the run seed, so every seed draws its own control).
    """

    k: int
    kind: SubspaceKind = "real"
    tau_axis: float | None = None
    length_norm: LengthNorm = "mean"
    seed: int = 0


def _provenance(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair], settings: ExtractionSettings
) -> Metadata:
    """Everything the extracted V depends on, and nothing else (unused inputs are None): the cache key.

    `seed` only drives the `shuffled` / `random` controls; `random` ignores the pairs, the adapter state and the
    gradient settings. So every seed of a real arm shares one extraction, and so does every pair set of a
    random control.
    """
    k, kind, tau_axis, length_norm = settings.k, settings.kind, settings.tau_axis, settings.length_norm
    if kind not in get_args(SubspaceKind):
        raise ValueError(f"kind must be one of {get_args(SubspaceKind)}, got {kind!r}")
    if length_norm not in get_args(LengthNorm):
        raise ValueError(f"length_norm must be one of {get_args(LengthNorm)}, got {length_norm!r}")
    if k < 1:
        raise ValueError(f"k must be a positive number of rows per module, got {k}")
    if tau_axis is not None and not 0.0 < tau_axis <= 1.0:
        raise ValueError(f"tau_axis must be in (0, 1] or None, got {tau_axis}")
    uses_gradients = kind != "random"
    if uses_gradients and not pairs:
        raise ValueError(f"kind {kind!r} extracts V from pairs, but no pairs were given")
    return {
        "format": VHACK_FORMAT,
        "kind": kind,
        "k": k,
        "base_digest": base_digest(model),
        "seed": settings.seed if kind in ("shuffled", "random") else None,
        "tokenizer_digest": tokenizer_digest(tokenizer) if uses_gradients else None,
        "adapter_digest": adapter_digest(model) if uses_gradients else None,
        "pair_set_hash": pair_set_hash(pairs) if uses_gradients else None,
        "tau_axis": tau_axis if uses_gradients else None,
        "length_norm": length_norm if uses_gradients else None,
    }


def _module_generator(seed: int, name: str) -> torch.Generator:
    """A generator seeded from (seed, module name): the same random basis on every rank and in every run."""
    key = int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little")
    return torch.Generator().manual_seed(key & (2**63 - 1))


def extract_hack_subspace(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    settings: ExtractionSettings,
    progress: bool = True,
) -> HackSubspace:
    """V per wrapped module: the top-k hack-ward axes of D = g(pair.hack) - g(pair.clean) on ``delta_s``.

    Kinds: ``real`` (labelled pairs); ``nonhack`` and ``stub`` (the same code path; the caller passes
    clean-vs-clean pairs, `pairs.nonhack_pairs`, or stub-vs-solution pairs, `pairs.stub_pairs`); ``shuffled``
    (each pair's labels swapped with probability 1/2 on the same gradients, independently per module, seeded by
    (seed, module name): a swap only flips D_j's sign, so the subspace is the real one and only each row's
    hack-ward orientation is randomised, per module; it controls for orientation under the one-sided gate);
    ``random`` (`random_basis` with min(k, r) rows per module, seeded by (seed, module name); no gradients).

    Runs with the quarantine ablated, so a refresh on a routed model sees the deployed policy. The basis is on
    the model's device.
    """
    metadata = _provenance(model, tokenizer, pairs, settings)
    k, kind, seed = settings.k, settings.kind, settings.seed
    adapters = adapter_modules(model)
    v_hack: dict[str, Tensor] = {}
    singular_values: dict[str, Tensor] = {}
    if kind == "random":
        for name, adapter in adapters.items():
            rows, device = min(k, adapter.rank), adapter.delta_s.device
            v_hack[name] = random_basis(rows, adapter.rank, _module_generator(seed, name), device=device)
            singular_values[name] = torch.ones(rows, device=device)
    else:
        with quarantine_ablated(model):
            g_hack, g_clean = pair_gradients(
                model, tokenizer, [p.prompt for p in pairs], [p.hack for p in pairs], [p.clean for p in pairs],
                length_norm=settings.length_norm, prefills=[p.prefill for p in pairs], progress=progress,
            )
        for name in adapters:
            a, b = g_hack[name], g_clean[name]  # (n, r)
            if kind == "shuffled":
                a, b = shuffle_pair_labels(a, b, _module_generator(seed, name))
            v, s = hack_basis_from_pair_grads(a, b, k, settings.tau_axis)
            if v.shape[0]:  # a module without a hack signal is not projected
                v_hack[name], singular_values[name] = v, s
    config = getattr(model, "config", None)
    metadata.update(
        model_type=getattr(config, "model_type", None),
        name_or_path=getattr(config, "name_or_path", None),
        n_pairs=len(pairs),
        modes=",".join(sorted({p.mode for p in pairs})),
    )
    return HackSubspace(v_hack, singular_values, {name: adapters[name].weight_hash for name in v_hack}, metadata)


# --- cache ----------------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where extracted subspaces are cached: ``<cache root>/vhack``."""
    return cache_root() / "vhack"


def cache_path(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    settings: ExtractionSettings,
    cache_dir: str | Path | None = None,
) -> Path:
    """The cache file for these inputs: named by a digest of everything V depends on (see `_provenance`)."""
    key = _digest(_provenance(model, tokenizer, pairs, settings))
    return Path(cache_dir or default_cache_dir()) / f"{settings.kind}-k{settings.k}-{key[:24]}.safetensors"


def load_or_extract(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[Pair],
    settings: ExtractionSettings,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> HackSubspace:
    """`extract_hack_subspace`, cached: a hit reuses the file, a miss extracts and saves it.

    The key covers the base weights, tokenizer, current ``delta_s``, pair texts and every extraction setting,
    so a stale V cannot be reused; an unreadable or mismatched file is re-extracted and overwritten. Writes are
    atomic, so ranks extracting the same key concurrently leave one complete file.
    """
    path = cache_path(model, tokenizer, pairs, settings, cache_dir)
    if path.is_file():
        try:
            subspace = HackSubspace.load(path, model)
        except ValueError as err:
            log.warning("hack subspace cache %s is unusable (%s); re-extracting", path, err)
        else:
            log.info("reusing hack subspace %s", path)
            return subspace.to(next(model.parameters()).device)
    subspace = extract_hack_subspace(model, tokenizer, pairs, settings, progress)
    subspace.save(path)
    log.info("extracted hack subspace (%s, k=%d) into %s", settings.kind, settings.k, path)
    return subspace
