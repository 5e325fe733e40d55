"""Sampling completions from the policy (the "generate" stage of a GRPO step).

The sampler is an interface (``model.sampler`` in the config: a class path and its arguments) so a backend can
replace another without touching the trainer. Two backends, sampling on merged weights from the policy's
distribution at ``temperature`` / ``top_p`` (HF's warpers):

* ``hf_generate`` (``HFGenerate`` in a config): Hugging Face ``generate``, the reference.
* ``KVCacheSampler`` (the default): a decode loop of its own on the model's forward, with a preallocated key/value
  cache, each distinct context prefilled once and its cache shared by all of its samples, finished rows dropped
  from the batch, and per-row stop strings. Models whose cache is not plain keys and values (Qwen3.5's
  GatedDeltaNet) fall back to ``hf_generate``. With ``weights: bfloat16`` a float32 policy is sampled from a
  bfloat16 copy (on a CPU with its weights prepacked for oneDNN): approximately, and the trainer importance-weights
  those tokens.

Every backend returns, per completion, the sampled token ids and their log-probs under the distribution it
sampled from (after temperature and top-p; for greedy decoding, the policy's own log-probs). A backend that
samples from another distribution than the policy's says so with ``samples_exactly(model) -> False``; one without
that method is taken to be exact.

Stop strings (``sampling.stop``): a row ends at the first token whose text completes one of them in the
completion's text (a stop may span tokens); that token is kept, so the completion holds the stop text (a closing
code fence still closes) and at most the rest of that one token's text after it. Both backends apply the same
rule, so a stop changes only what comes after it, which the grader ignores when the stop is the closing fence.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch
from torch import Tensor, nn
from transformers import DynamicCache, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from antipasto_pl.adapter import adapter_modules, merged_state_dict, merged_weights, tensor_identity
from antipasto_pl.grpo import warp_logits
from antipasto_pl.sequences import shares_prompt_cache, with_cache

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How completions are sampled.

    Args:
        max_new_tokens: completion length cap.
        temperature: softmax temperature; 0 means greedy decoding.
        top_p: nucleus sampling mass.
        prefill: text that opens every assistant turn, identically for student samples, teacher-pool records,
            detector pairs and evaluation (e.g. "```python\n"), so that format is not what is learned; the
            completion continues it and grading sees prefill + completion. ``{skeleton}`` expands to the
            problem's starter code up to the method body's indentation. Empty: off.
        stop: stop strings, e.g. ``["\n```"]`` (the closing fence: the grader reads nothing after it); a row ends
            with the token that completes one, which stays in the completion (see the module docstring).
        ignore_eos: never end a row at EOS (EOS gets probability 0): fixed-length rows for benchmarks.
    """

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    prefill: str = ""
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if any(not s for s in self.stop):
            raise ValueError("sampling.stop strings must be non-empty")


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its text, the exact token ids that were sampled (EOS kept if emitted) and each
    token's log-prob under the distribution the sampler drew it from."""

    text: str
    token_ids: tuple[int, ...]
    log_probs: tuple[float, ...] = ()


class Sampler(Protocol):
    """``num_samples`` completions for each context (the model's input as text: chat template applied, prefill
    appended, see ``sequences.chat_prompt``)."""

    def __call__(
        self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str], num_samples: int,
        config: SamplingConfig,
    ) -> list[list[Completion]]: ...


# --- shared pieces --------------------------------------------------------------------------------------------


def completes_stop(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: Sequence[str]) -> bool:
    """Whether the text of ``ids`` contains a stop string that ends in its last token, given that it contained
    none before: only the last few tokens are decoded (a stop of n bytes spans at most n tokens; one more covers
    a multi-byte character split at the window's start)."""
    window = max(len(s.encode()) for s in stops) + 1
    tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
    return any(s in tail for s in stops)


def _stop_length(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], stops: Sequence[str]) -> int:
    """How many of ``ids`` a row keeps under the stop rule (all if no stop occurs)."""
    if stops:
        for end in range(1, len(ids) + 1):
            if completes_stop(tokenizer, ids[:end], stops):
                return end
    return len(ids)


def _completion(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int], log_probs: Sequence[float]) -> Completion:
    ids = tuple(ids)
    return Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, tuple(log_probs))


# --- reference: Hugging Face generate ---------------------------------------------------------------------------


def _trim(row: list[int], eos_id: int, pad_id: int) -> tuple[int, ...]:
    """Generated ids up to and including the first EOS; padding after it dropped."""
    if eos_id in row:
        return tuple(row[: row.index(eos_id) + 1])
    while row and row[-1] == pad_id:
        row = row[:-1]
    return tuple(row)


@torch.no_grad()
def hf_generate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[str],
    num_samples: int,
    config: SamplingConfig,
) -> list[list[Completion]]:
    """``num_samples`` completions per context, sampled with ``generate`` on merged weights (stop strings
    applied afterwards: every row runs to EOS or the length cap)."""
    texts = [c for c in contexts for _ in range(num_samples)]
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    greedy = config.temperature == 0
    with merged_weights(model):
        output = model.generate(
            **inputs,
            max_new_tokens=config.max_new_tokens,
            min_new_tokens=config.max_new_tokens if config.ignore_eos else None,
            do_sample=not greedy,
            temperature=None if greedy else config.temperature,
            top_p=None if greedy else config.top_p,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            output_scores=True,
            return_dict_in_generate=True,
        )
    rows = output.sequences[:, inputs["input_ids"].shape[1]:]
    # The processed scores are the sampled distribution's logits (greedy: the raw logits).
    scores = torch.stack(output.scores, dim=1).float()  # (B, steps, V)
    log_probs = torch.log_softmax(scores, dim=-1).gather(-1, rows[..., None]).squeeze(-1)  # (B, steps)
    samples = []
    for row, row_log_probs in zip(rows.tolist(), log_probs.tolist()):
        ids = _trim(row, tokenizer.eos_token_id, tokenizer.pad_token_id)
        ids = ids[:_stop_length(tokenizer, ids, config.stop)]
        samples.append(_completion(tokenizer, ids, row_log_probs[: len(ids)]))
    return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(contexts))]


class HFGenerate:
    """``hf_generate`` as a configurable backend (``model.sampler.class_path: antipasto_pl.rollout.HFGenerate``)."""

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str],
                 num_samples: int, config: SamplingConfig) -> list[list[Completion]]:
        return hf_generate(model, tokenizer, contexts, num_samples, config)


# --- the fast exact backend --------------------------------------------------------------------------------------


class _PreallocatedLayer(DynamicLayer):
    """A layer's keys and values in buffers allocated once for the whole rollout: ``update`` writes the new
    positions in place and returns views (``DynamicLayer`` concatenates, copying the whole cache every token)."""

    def __init__(self, keys: Tensor, values: Tensor, length: int) -> None:
        super().__init__()
        # keys, values: (B, heads, max_length, head_dim), the first ``length`` positions filled
        self.key_buffer, self.value_buffer, self.length = keys, values, length
        self.device = keys.device
        self.is_initialized = True
        self._views()

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: Tensor) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._views()


class KVCacheSampler:
    """The fast backend: sampling from the policy's distribution (``warp_logits``, as HF's warpers) with a
    decode loop of its own. Each distinct context is prefilled once, alone (no padding), and its keys/values are
    copied to all of its samples' rows of a cache preallocated for the longest context plus ``max_new_tokens``
    (contexts left-padded, masked); rows leave the batch when they emit EOS, complete a stop string or reach the
    length cap. Models whose cache holds more than keys and values fall back to ``hf_generate``.

    Args:
        weights: ``policy``: sample on the policy's merged weights, exactly its distribution. ``bfloat16``: a
            float32 policy samples from a bfloat16 copy of its merged weights (half the weight traffic). That is
            a slightly different distribution: the reported log-probs are the copy's, and the trainer corrects
            the loss with truncated importance weights (``grpo.truncated_importance_weights``, logged as
            ``train/is_weight_mean``). A policy already in bfloat16 samples on itself.
        prepack: on a CPU, sample on a copy of the merged weights (``SamplingCopy``) whose products run in
            oneDNN's prepacked layout (``PackedLinear``), refreshed after each change of the vectors. For
            ``policy`` that copy is in the policy's own dtype: the same products up to rounding (about 1e-6
            relative, as between two batch shapes), so still exact. Off: sample on the policy itself.
    """

    def __init__(self, weights: Literal["policy", "bfloat16"] = "policy", prepack: bool = True) -> None:
        if weights not in ("policy", "bfloat16"):
            raise ValueError(f"KVCacheSampler weights must be 'policy' or 'bfloat16', got {weights!r}")
        self.weights = weights
        self._fallback_logged: set[str] = set()
        self.prepack = prepack
        self._copy: SamplingCopy | None = None

    def samples_exactly(self, model: nn.Module) -> bool:
        """Whether completions come from the policy's own distribution (else they need importance weights)."""
        return self.weights == "policy" or model.dtype == torch.bfloat16 or not shares_prompt_cache(model)

    def __call__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str],
                 num_samples: int, config: SamplingConfig) -> list[list[Completion]]:
        if not contexts:
            return []
        if not shares_prompt_cache(model):
            model_type = getattr(model.config, "model_type", type(model).__name__)
            if model_type not in self._fallback_logged:
                self._fallback_logged.add(model_type)
                log.info("KVCacheSampler: %s caches more than plain keys and values (e.g. a linear-attention "
                         "state); sampling it with hf_generate instead", model_type)
            return hf_generate(model, tokenizer, contexts, num_samples, config)
        dtype = model.dtype if self.samples_exactly(model) else torch.bfloat16
        if dtype != model.dtype or (self.prepack and packs_on(model.device, dtype)):
            if self._copy is None or self._copy.source is not model or self._copy.dtype != dtype:
                self._copy = SamplingCopy(model, dtype, self.prepack)
            return self._sample(self._copy.refreshed(), tokenizer, contexts, num_samples, config)
        with merged_weights(model):
            return self._sample(model, tokenizer, contexts, num_samples, config)

    @torch.no_grad()
    def _sample(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, contexts: Sequence[str],
                num_samples: int, config: SamplingConfig) -> list[list[Completion]]:
        device = model.device
        prompts = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in contexts]
        width = max(len(p) for p in prompts)
        n_rows = len(prompts) * num_samples
        cache, first_logits = self._prefill(model, prompts, num_samples, width + config.max_new_tokens)
        attention = torch.zeros(n_rows, width + config.max_new_tokens, dtype=torch.long, device=device)
        positions = torch.tensor([len(p) for p in prompts for _ in range(num_samples)], device=device)  # (B,)
        for row, length in enumerate(positions.tolist()):
            attention[row, width - length:width] = 1
        live = list(range(n_rows))  # the original row of each batch row
        ids: list[list[int]] = [[] for _ in range(n_rows)]
        log_probs: list[list[float]] = [[] for _ in range(n_rows)]
        logits = first_logits
        eos = tokenizer.eos_token_id
        for step in range(config.max_new_tokens):
            tokens, token_log_probs = _sample_next(logits, config, eos)
            keep = []
            for batch_row, (token, logp) in enumerate(zip(tokens.tolist(), token_log_probs.tolist())):
                row = live[batch_row]
                ids[row].append(token)
                log_probs[row].append(logp)
                done = (token == eos and not config.ignore_eos) or (
                    bool(config.stop) and completes_stop(tokenizer, ids[row], config.stop))
                if not done:
                    keep.append(batch_row)
            if not keep or step == config.max_new_tokens - 1:
                break
            if len(keep) < len(live):
                index = torch.tensor(keep, device=device)
                for layer in cache.layers:
                    layer.batch_select_indices(index)
                attention, positions, tokens = attention[index], positions[index], tokens[index]
                live = [live[i] for i in keep]
            attention[:, width + step] = 1
            logits = model(input_ids=tokens[:, None], attention_mask=attention[:, : width + step + 1],
                           position_ids=positions[:, None] + step, **with_cache(model, cache), use_cache=True).logits[:, -1]
        samples = [_completion(tokenizer, i, lp) for i, lp in zip(ids, log_probs)]
        return [samples[i * num_samples:(i + 1) * num_samples] for i in range(len(contexts))]

    @staticmethod
    def _prefill(model: nn.Module, prompts: list[list[int]], num_samples: int, max_length: int
                 ) -> tuple[DynamicCache, Tensor]:
        """Each prompt's forward once; its keys/values right-aligned at the longest prompt's end in each of its
        rows of a (rows, heads, max_length, head_dim) cache; the last position's logits per row: (rows, V)."""
        width = max(len(p) for p in prompts)
        n_rows = len(prompts) * num_samples
        buffers: list[tuple[Tensor, Tensor]] = []
        first = []
        for index, prompt in enumerate(prompts):
            prompt_cache = DynamicCache(config=model.config)
            ids = torch.tensor([prompt], device=model.device)
            first.append(model(input_ids=ids, **with_cache(model, prompt_cache), use_cache=True,
                               logits_to_keep=1).logits[0, -1].float())
            rows = slice(index * num_samples, (index + 1) * num_samples)
            for number, layer in enumerate(prompt_cache.layers):
                if index == 0:
                    _, heads, _, head_dim = layer.keys.shape
                    buffers.append(tuple(layer.keys.new_zeros(n_rows, heads, max_length, head_dim) for _ in range(2)))
                keys, values = buffers[number]
                keys[rows, :, width - len(prompt):width] = layer.keys[0]
                values[rows, :, width - len(prompt):width] = layer.values[0]
        cache = DynamicCache(config=model.config)
        cache.layers = [_PreallocatedLayer(keys, values, width) for keys, values in buffers]
        return cache, torch.stack(first).repeat_interleave(num_samples, dim=0)


PACK_ROWS = 8  # the row count oneDNN's layout is chosen for: a decode step's batch


class PackedLinear(nn.Linear):
    """An ``nn.Linear`` that multiplies with its weight prepacked in oneDNN's blocked layout (``torch.ops.mkldnn``,
    as Inductor's CPU freezing does). A plain product repacks the weight on every call, which at the 4 to 8 rows
    of a decode step costs about as much as the product itself. ``pack`` must follow every change of ``weight``;
    parameters and state-dict keys are the Linear's."""

    packed: Tensor

    @classmethod
    def replacing(cls, linear: nn.Linear) -> PackedLinear:
        """A PackedLinear on ``linear``'s own parameters (a weight tied to an embedding stays tied)."""
        packed = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        packed.weight, packed.bias = linear.weight, linear.bias
        packed.pack()
        return packed

    def pack(self) -> None:
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), PACK_ROWS)

    def forward(self, x: Tensor) -> Tensor:
        # x: (..., d_in) -> (..., d_out)
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), self.packed, self.bias, "none", [], "")
        return y.reshape(*x.shape[:-1], self.out_features)


def packs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``PackedLinear`` runs here: oneDNN on a CPU, with bfloat16 kernels for bfloat16 weights."""
    return device.type == "cpu" and torch.backends.mkldnn.is_available() and (
        dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported())


class SamplingCopy:
    """A plain (unwrapped) copy of ``source`` with its parameters in ``dtype`` and every adapted weight merged
    (``W + U diag(delta) Vh`` for the adapters' current mode), re-merged by ``refreshed`` only when a vector or a
    mode changed. Buffers (rotary frequencies) keep their precision. With ``prepack`` (where ``packs_on``) its
    Linear layers are ``PackedLinear``. A refresh copies and repacks only the adapted layers."""

    def __init__(self, source: nn.Module, dtype: torch.dtype, prepack: bool = True) -> None:
        self.source, self.dtype = source, dtype
        device = source.device
        # Its random initialisation, overwritten at once, must not move the seeded RNG.
        with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type), device:
            self.model = type(source)(source.config).eval().requires_grad_(False)
        for parameter in self.model.parameters():
            parameter.data = parameter.data.to(dtype)
        self.model.load_state_dict(merged_state_dict(source), strict=True)  # copy_ casts to dtype
        if prepack and packs_on(device, dtype):
            for name, linear in [(n, m) for n, m in self.model.named_modules() if type(m) is nn.Linear]:
                parent, _, child = name.rpartition(".")
                setattr(self.model.get_submodule(parent), child, PackedLinear.replacing(linear))
        self._key = self._vectors()

    def _vectors(self) -> tuple:
        return tuple((a.mode, *(tensor_identity(t) for t in (a.delta_s, a.delta_s_hack)))
                     for a in adapter_modules(self.source).values())

    @torch.no_grad()
    def refreshed(self) -> nn.Module:
        key = self._vectors()
        if key != self._key:
            weights = merged_state_dict(self.source)
            for name in adapter_modules(self.source):
                linear = self.model.get_submodule(name)
                linear.weight.copy_(weights[f"{name}.weight"])
                if isinstance(linear, PackedLinear):
                    linear.pack()
            self._key = key
        return self.model


def _sample_next(logits: Tensor, config: SamplingConfig, eos_id: int) -> tuple[Tensor, Tensor]:
    """The next token of every row and its log-prob under the distribution it was drawn from."""
    # logits: (B, V) -> tokens, log_probs: (B,)
    logits = logits.float()
    if config.ignore_eos:
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
    scores = warp_logits(logits, config.temperature, config.top_p)
    log_probs = torch.log_softmax(scores, dim=-1)
    if config.temperature == 0:
        tokens = scores.argmax(dim=-1)
    else:
        tokens = torch.multinomial(log_probs.exp(), num_samples=1).squeeze(-1)
    return tokens, log_probs.gather(-1, tokens[:, None]).squeeze(-1)
