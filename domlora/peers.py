"""Placement peers that read the model: what a user could pick instead of PAGE, run as their authors ship them.

- `kappa`: KappaTune, PEFT's helper (`peft.helpers.find_kappa_target_modules`): the modules whose weight
  matrices have the lowest condition numbers (an SVD of every linear weight; no data).
- `aletheia`: the `aletheia-lora` package: its gradient probe (per-layer sum of parameter-gradient norms,
  full-sequence loss, batches of one) and `select_layers`; every default target module in the chosen layers.
- `eva`: PEFT's EVA (explained variance adaptation): incremental SVD of every projection's inputs on the
  training data, and LoRA's rank budget redistributed over the projections by explained variance.
- `massive`: the forward-only predictor of the dominant `down_proj` (`domlora.probes.massive`).

    doc = run_peer("kappa", loaded, options={"num_modules": 1})
    placement = select(PlacementSpec(strategy="kappa"), peer=doc)

Each returns a peer document: the peer's own scores, its choice as exact module names (only block
projections, the candidates every strategy chooses from), its settings, and what it cost (`cost`: wall
seconds and peak memory above the loaded model). The select stage runs them, so that stage loads the
model for these strategies only.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

from domlora.config import from_dict
from domlora.errors import ConfigError

logger = logging.getLogger(__name__)

DOC_KIND = "peer"
ALETHEIA_EXTRA = "pipeline"
ALETHEIA_PIN = "aletheia-lora==0.1.2"
EVA_TYPES_NOTE = "every candidate projection (EVA redistributes LoRA's rank budget over them)"


@dataclass(frozen=True)
class KappaOptions:
    """KappaTune (PEFT's helper)."""

    top_p: float = 0.2
    """the helper's default: the fraction of analysed linear modules with the lowest condition numbers"""
    num_modules: int | None = None
    """keep this many modules with the lowest condition numbers instead (1: the top-1-module form)"""
    max_dim_size_to_analyze: int = 16384
    """the helper's default: weights with a larger dimension are not analysed"""

    def __post_init__(self):
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"kappa option top_p must be in (0, 1], got {self.top_p}")
        if self.num_modules is not None and self.num_modules < 1:
            raise ConfigError(f"kappa option num_modules must be >= 1, got {self.num_modules}")


@dataclass(frozen=True)
class AletheiaOptions:
    """Aletheia (the `aletheia-lora` package)."""

    top_pct: float = 50.0
    """the package's default: the top percent of layers by gradient norm"""
    num_layers: int | None = None
    """keep this many layers instead (1: the top-1-layer form)"""
    probe_batches: int = 5
    """the package's default: probe samples (batches of one)"""
    chunk_size: int = 8
    """the package's default: layers whose gradients are enabled at once"""
    seed: int = 42
    """the package's default: which probe samples are drawn"""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj", "down_proj"])
    """the package's default target modules, adapted in every chosen layer"""

    def __post_init__(self):
        if not 1 <= self.top_pct <= 100:
            raise ConfigError(f"aletheia option top_pct must be in [1, 100], got {self.top_pct}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ConfigError(f"aletheia option num_layers must be >= 1, got {self.num_layers}")
        if self.probe_batches < 1 or self.chunk_size < 1:
            raise ConfigError("aletheia options probe_batches and chunk_size must be >= 1")
        if not self.target_modules:
            raise ConfigError("aletheia option target_modules must name at least one module")


@dataclass(frozen=True)
class EvaOptions:
    """EVA (PEFT). In a pipeline method these come from its training keys (`rank`, `alpha`, `eva_*`), so the
    select stage computes the allocation the training initialisation will compute."""

    rank: int = 64
    """LoRA rank r: the budget is r x the number of projections"""
    alpha: float = 128.0
    """LoRA alpha (EVA rescales it with the redistributed rank)"""
    rho: float = 2.0
    """PEFT's default: a projection gets at most rho x r"""
    tau: float = 0.99
    """PEFT's default: cosine similarity at which the incremental SVD has converged"""
    samples: int = 64
    """training samples (the first N of the file) EVA's SVD reads"""
    batch_size: int = 16
    """samples per forward pass (each batch needs at least rho x r target tokens)"""
    max_length: int = 3072
    """tokens per sample"""

    def __post_init__(self):
        if self.rank < 1 or self.samples < 1 or self.batch_size < 1 or self.max_length < 2:
            raise ConfigError("eva options rank, samples, batch_size must be >= 1 and max_length >= 2")
        if self.rho < 1:
            raise ConfigError(f"eva option rho must be >= 1 (PEFT's rule), got {self.rho}")
        if not 0 <= self.tau <= 1:
            raise ConfigError(f"eva option tau must be in [0, 1], got {self.tau}")


@dataclass(frozen=True)
class MassiveOptions:
    """The forward-only `massive` predictor."""

    rule: Literal["onset", "largest_jump", "largest_output"] = "onset"
    """which down_proj it picks (`domlora.probes.massive`)"""
    batch_size: int = 8
    """samples per forward pass"""


OPTIONS = {"kappa": KappaOptions, "aletheia": AletheiaOptions, "eva": EvaOptions, "massive": MassiveOptions}
"""peer -> its options; every placement strategy that needs the model is here"""
# what each peer reads from the data: nothing, the probe split, the training split
DATA = {"kappa": None, "aletheia": "probe", "eva": "train", "massive": "probe"}


def parse_options(peer: str, options: dict | None):
    """Validate a peer's options; an unknown option is named with the allowed ones."""
    if peer not in OPTIONS:
        raise ConfigError(f"{peer!r} is not a placement peer; peers: {', '.join(OPTIONS)}")
    return from_dict(OPTIONS[peer], options or {}, where=f"{peer} option")


# ---------------------------------------------------------------------------------------------- cost


_PROC_STATUS = "/proc/self/status"


def _proc_anon_mb() -> float:
    """The process's anonymous resident memory (its heap, tensors and arrays), in MB, from /proc.

    File-backed pages (mapped weight files, shared libraries) are left out: the kernel may drop or
    re-read them at any time, which would move the baseline under the work being measured.
    """
    with open(_PROC_STATUS) as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise OSError(f"{_PROC_STATUS} has no RssAnon line")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                 "fsmblks", "uordblks", "fordblks", "keepcost")]


def _malloc_heap_reader():
    """glibc's live allocation count (`mallinfo2`, every arena: bytes in use plus large mmapped blocks), or None."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _MallInfo2

    def read() -> float:
        m = fn()
        return (m.uordblks + m.hblkhd) / 2**20

    return read


def _statm_resident_mb() -> float:
    with open(_PROC_STATUS.replace("status", "statm")) as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _max_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_PROBE_MB = 16


def _moves(read) -> bool:
    """Whether `read` sees a fresh allocation of _PROBE_MB now: a reading that cannot be read (no /proc in a
    chroot or another PID namespace), or whose figure does not follow the process, fails this.

    The allocation is both kinds the work makes: fresh anonymous pages, touched (what resident readings see;
    the heap may reuse pages already resident), and a heap block (what the allocator's count sees).
    """
    import mmap

    n = _PROBE_MB * 2**20
    try:
        before = read()
        pages = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # anonymous, as the work's pages
        for i in range(0, n, mmap.PAGESIZE):
            pages[i] = 1
        block = bytearray(n)
        after = read()
        del block
        pages.close()
    except (OSError, ValueError, IndexError):
        return False
    return after - before >= _PROBE_MB / 2


def _memory_reader():
    """The best live memory reading this process has, as (read() -> MB, memory_kind).

    Each candidate is tried on a small allocation first, and the first that sees it is taken: glibc's live heap
    (what tensors and arrays hold, counted by the allocator itself, so always current, even for a block placed
    in pages the heap already holds resident, which resident figures miss); /proc's anonymous resident memory;
    /proc's whole resident set (file-backed pages in); else the process's peak so far, which cannot see
    work that stays under an earlier peak (its kind says so).
    """
    for read, kind in ((_malloc_heap_reader(), "malloc_heap_sampled"), (_proc_anon_mb, "process_rss_sampled"),
                       (_statm_resident_mb, "process_rss_with_files_sampled")):
        if read is not None and _moves(read):
            return read, kind
    logger.warning("no live memory reading in this process: peak memory is the process's peak so far")
    return _max_rss_mb, "process_max_rss"


@contextlib.contextmanager
def measure_cost(device: str = "cpu", *, interval_s: float = 0.02) -> Iterator[dict]:
    """Wall time and peak memory of the enclosed work, above what was resident when it started.

    CPU: glibc's live heap (tensors and arrays; mapped weight files left out), else the process's anonymous
    resident memory (`_memory_reader`), sampled every `interval_s` by a thread (so a short spike between samples
    can be missed); CUDA: `torch.cuda.max_memory_allocated`. Fills the yielded dict on exit; `memory_kind`
    names the reading.
    """
    cost: dict = {}
    cuda = device.startswith("cuda")
    # garbage still waiting for the cycle collector is resident now and may be freed inside the block:
    # collected first, it cannot hide the work's own memory behind a falling baseline
    gc.collect()
    read, kind = _memory_reader()
    start = read()
    peak = [start]
    stop = threading.Event()

    def sample():
        while not stop.wait(interval_s):
            peak[0] = max(peak[0], read())

    sampler = threading.Thread(target=sample, daemon=True)
    if cuda:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        stop.set()
        sampler.join()
        peak[0] = max(peak[0], read())
        cost.update({"wall_s": round(wall, 3), "peak_rss_mb": round(peak[0], 1),
                     "peak_over_model_mb": round(peak[0] - start, 1), "memory_kind": kind})
        if cuda:
            cost.update({"peak_over_model_mb": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1),
                         "memory_kind": "cuda_max_allocated"})


# ---------------------------------------------------------------------------------------------- peers


def _model_type(model) -> str:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return str(getattr(getattr(base, "config", None), "model_type", None) or type(base).__name__)


def _unsupported(peer: str, model, why: str, fix: str) -> ConfigError:
    return ConfigError(f"placement peer {peer} does not support model type {_model_type(model)!r}: {why}; fix: {fix}")


def _table(cands) -> dict[str, dict]:
    return {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out} for c in cands}


def kappa(model, opts: KappaOptions) -> dict:
    """KappaTune: condition numbers of every linear weight, the lowest ones chosen (PEFT's helper)."""
    from peft.helpers import KappaTuneSelector

    from domlora.modules import find_candidates

    cands = find_candidates(model)
    names = {c.name for c in cands}
    if all(c.conv1d for c in cands):
        raise _unsupported("kappa", model, "PEFT's KappaTune helper analyses nn.Linear weights, and this model's "
                           "projections are Conv1D", "use another placement for this architecture")
    # note: `find_kappa_target_modules(model, top_p)` is this selector's `get_best_targets(top_p=top_p)`; building
    # it here keeps the condition numbers for the evidence (the helper returns only the names)
    selector = KappaTuneSelector(model, max_dim_size_to_analyze=opts.max_dim_size_to_analyze, show_progress=False)
    kappas = selector.get_best_targets()  # computes and sorts; the numbers are kept on the selector
    numbers = dict(getattr(selector, "_condition_numbers", None) or {})
    if opts.num_modules is None:
        picked = selector.get_best_targets(top_p=opts.top_p)
        rule = f"the helper's top_p={opts.top_p}: the {len(picked)} of {len(kappas)} analysed linear modules with " \
               "the lowest condition number"
    else:
        ranked = [n for n in kappas if n in names]
        picked = ranked[: opts.num_modules]
        rule = f"the {opts.num_modules} block projection(s) with the lowest condition number"
    chosen = [n for n in picked if n in names]
    outside = [n for n in picked if n not in names]
    if not chosen:
        raise _unsupported("kappa", model, f"the helper chose no block projection (it chose {outside[:3]})",
                           "use another placement for this architecture")
    skipped = sorted(names - set(numbers))
    return {"chosen": chosen, "scores": {n: numbers[n] for n in sorted(numbers, key=numbers.get) if n in names},
            "evidence": {"rule": rule, "condition_numbers": {n: round(numbers[n], 4) for n in chosen},
                         "not_candidates": outside, "not_analysed": skipped, "n_analysed": len(numbers)},
            "modules": _table(cands)}


def _aletheia_module():
    try:
        import aletheia_lora
    except ImportError:
        raise ConfigError(f"placement aletheia needs the package aletheia-lora, which is not installed; fix: pip "
                          f"install -e '.[{ALETHEIA_EXTRA}]' (the `{ALETHEIA_EXTRA}` extra pins {ALETHEIA_PIN})") from None
    return aletheia_lora


def aletheia(model, encoded, opts: AletheiaOptions) -> dict:
    """Aletheia: the package's gradient probe and layer selection, its default target modules in those layers."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    from domlora.modules import find_candidates, num_layers

    pkg = _aletheia_module()
    cands = find_candidates(model)
    n_layers = num_layers(cands)
    cfg = pkg.aletheia_lora_config(selected_layers=list(range(n_layers)), target_modules=list(opts.target_modules))
    reachable = [c.name for c in cands if check_target_module_exists(cfg, c.name)]
    if not reachable:
        present = sorted({c.name.rsplit(".", 1)[-1] for c in cands})
        raise _unsupported("aletheia", model, f"its target modules {', '.join(opts.target_modules)} are not in this "
                           f"model (its projections: {', '.join(present)})",
                           "pass the model's own projection names as the option target_modules")
    if not encoded:
        raise ConfigError("placement peer aletheia needs probe samples; fix: pass a non-empty probe set")
    if len(encoded) < opts.probe_batches:
        logger.warning("aletheia asked for %d probe batches, the probe set holds %d samples", opts.probe_batches,
                       len(encoded))
    # the package's probe reads a dataset of tokenised rows (batches of one: no padding)
    rows = [{"input_ids": torch.tensor(e.input_ids), "attention_mask": torch.ones(len(e.input_ids), dtype=torch.long)}
            for e in encoded]
    was_training = model.training
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        scores = pkg.gradient_probe(model=model, dataset=rows, num_layers=n_layers, probe_batches=opts.probe_batches,
                                    chunk_size=opts.chunk_size, seed=opts.seed)
    finally:
        for n, p in model.named_parameters():  # the probe leaves every weight frozen; restore what was there
            p.requires_grad_(grads[n])
            p.grad = None
        model.train(was_training)
    if opts.num_layers is None:
        layers = pkg.select_layers(scores, top_pct=opts.top_pct)
        rule = f"the package's select_layers(top_pct={opts.top_pct:g}): {len(layers)} of {n_layers} layers"
    else:
        if opts.num_layers > n_layers:
            raise ConfigError(f"aletheia option num_layers={opts.num_layers} exceeds the model's {n_layers} layers")
        layers = sorted(sorted(scores, key=lambda i: -scores[i])[: opts.num_layers])
        rule = f"the {opts.num_layers} layer(s) with the largest gradient norm"
    cfg = pkg.aletheia_lora_config(selected_layers=list(layers), target_modules=list(opts.target_modules))
    chosen = [c.name for c in cands if check_target_module_exists(cfg, c.name)]
    return {"chosen": chosen, "scores": {str(k): float(v) for k, v in sorted(scores.items())},
            "evidence": {"rule": rule, "layers": list(layers), "target_modules": list(opts.target_modules),
                         "layer_scores": {str(i): round(float(scores[i]), 6) for i in layers},
                         "loss": "the package's: full-sequence next-token loss, prompt included",
                         "n_probe_samples": min(opts.probe_batches, len(encoded))},
            "modules": _table(cands)}


def eva_batches(encoded, *, batch_size: int, pad_id: int, device=None) -> list[dict]:
    """EVA's dataloader: batches in file order with `labels` = the target tokens (-100 elsewhere), so PEFT's
    label mask keeps the SVD on assistant tokens as the training loss does."""
    from domlora.samples import collate

    out = []
    for k in range(0, len(encoded), batch_size):
        b = collate(encoded[k:k + batch_size], pad_id=pad_id, device=device)
        target = (b["loss_mask"] * b["attention_mask"]).bool()
        out.append({"input_ids": b["input_ids"], "attention_mask": b["attention_mask"],
                    "labels": b["input_ids"].masked_fill(~target, -100)})
    return out


def check_eva(batches: list[dict], *, rank: int, rho: float, min_d_in: int) -> None:
    """EVA's SVD keeps rho x rank components per module: each batch needs that many target tokens, and every
    module that many input features."""
    need = round(rank * rho)
    if need > min_d_in:
        raise ConfigError(f"EVA keeps rho x rank = {need} components, more than the {min_d_in} input features of "
                          "the smallest placed module; fix: a smaller rank or eva_rho")
    short = min(int((b["labels"] != -100).sum()) for b in batches) if batches else 0
    if short < need:
        raise ConfigError(f"EVA's SVD needs at least rho x rank = {need} target tokens per batch, and a batch here "
                          f"holds {short}; fix: raise eva_batch_size (or eva_samples)")


def eva_forward(model, inputs: dict):
    """EVA's forward pass: the projections' inputs are what it reads, so no logits and no loss are computed."""
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False,
                 logits_to_keep=1)


EVA_MAX_PASSES = 12
"""PEFT's EVA cycles over its batches until every module's components have converged (cosine >= tau), with no
bound of its own: after this many passes over the samples it is stopped with an error that says what to change"""


def bounded_eva_forward(n_batches: int, *, tau: float, max_passes: int = EVA_MAX_PASSES):
    """`eva_forward` that refuses to run past `max_passes` passes over the `n_batches` batches."""
    calls = [0]

    def forward(model, inputs):
        calls[0] += 1
        if calls[0] > max_passes * n_batches:
            raise ConfigError(f"EVA's SVD has not converged (tau {tau}) after {max_passes} passes over its "
                              f"{n_batches} batch(es); fix: more samples (eva_samples), larger batches "
                              "(eva_batch_size), or a lower eva_tau")
        if calls[0] % n_batches == 0:
            logger.info("EVA: pass %d over the samples", calls[0] // n_batches)
        return eva_forward(model, inputs)

    return forward


def eva(model, encoded, opts: EvaOptions, *, pad_id: int) -> dict:
    """EVA: PEFT's rank redistribution over every projection from the SVD of their inputs on training data."""
    from peft import EvaConfig, LoraConfig, get_eva_state_dict

    from domlora.modules import find_candidates

    cands = find_candidates(model)
    if not encoded:
        raise ConfigError("placement peer eva needs training samples; fix: pass a non-empty training set")
    cfg = LoraConfig(r=opts.rank, lora_alpha=opts.alpha, target_modules=[c.name for c in cands],
                     init_lora_weights="eva", eva_config=EvaConfig(rho=opts.rho, tau=opts.tau),
                     fan_in_fan_out=any(c.conv1d for c in cands))
    batches = eva_batches(encoded, batch_size=opts.batch_size, pad_id=pad_id, device=next(model.parameters()).device)
    check_eva(batches, rank=opts.rank, rho=opts.rho, min_d_in=min(c.d_in for c in cands))
    with _quiet_eva():
        state = get_eva_state_dict(model, batches, peft_config=cfg,
                                   forward_fn=bounded_eva_forward(len(batches), tau=opts.tau),
                                   gather_distributed_inputs=False, show_progress_bar=False)
    ranks = {c.name: int(state[c.name].shape[0]) if c.name in state else 0 for c in cands}
    return {"chosen": [c.name for c in cands], "scores": ranks,
            "evidence": eva_evidence(ranks, _table(cands), rank=opts.rank) | {
                "rho": opts.rho, "tau": opts.tau, "n_samples": len(encoded), "batch_size": opts.batch_size},
            "modules": _table(cands)}


def eva_evidence(ranks: dict[str, int], table: dict[str, dict], *, rank: int) -> dict:
    """What EVA's allocation amounts to: ranks per module and type, modules left without an adapter, parameters."""
    by_type: dict[str, int] = {}
    for n, r in ranks.items():
        by_type[table[n]["type"]] = by_type.get(table[n]["type"], 0) + r
    params = sum(r * (table[n]["d_in"] + table[n]["d_out"]) for n, r in ranks.items())
    return {"rule": f"{EVA_TYPES_NOTE}; budget {rank} x {len(ranks)} = {rank * len(ranks)}",
            "ranks": ranks, "rank_by_type": by_type, "zero_rank": [n for n, r in ranks.items() if r == 0],
            "lora_params": int(params)}


@contextlib.contextmanager
def _quiet_eva():
    # note: PEFT prints (not logs) a line per skipped SVD step; the token check above makes those rare
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield


def massive(model, encoded, opts: MassiveOptions, *, model_name: str) -> dict:
    """The forward-only predictor, as a `massive.json` document (the `massive` strategy's input)."""
    from domlora.probes.massive import massive_predict, massive_summary

    pred, report = massive_predict(model, encoded, rule=opts.rule, batch_size=opts.batch_size)
    return massive_summary(pred, report, model=model_name)


def run_peer(peer: str, model, *, options: dict | None = None, encoded: Sequence | None = None,
             model_name: str | None = None, pad_id: int = 0) -> dict:
    """Run one peer on a loaded model (and its data) and return its document with the cost.

    Args:
        peer: `kappa`, `aletheia`, `eva` or `massive`.
        model: a `transformers` causal LM.
        options: the peer's options (`OPTIONS[peer]`), validated here; an unknown one is an error.
        encoded: tokenised samples (`samples.encode_samples`): the probe split for aletheia and massive, the
            first training samples for eva; kappa reads none.
        model_name: what the document names as the model.

    Returns:
        {"kind": "peer", "peer", "model", "model_type", "options", "chosen", "scores", "evidence", "modules",
        "cost": {"wall_s", "peak_rss_mb", "peak_over_model_mb", "memory_kind"}} (massive: its massive.json + cost).
    """
    opts = parse_options(peer, options)
    device = str(next(model.parameters()).device)
    with measure_cost(device) as cost:
        if peer == "kappa":
            doc = kappa(model, opts)
        elif peer == "aletheia":
            doc = aletheia(model, list(encoded or []), opts)
        elif peer == "eva":
            doc = eva(model, list(encoded or []), opts, pad_id=pad_id)
        else:
            doc = massive(model, list(encoded or []), opts, model_name=model_name or _model_type(model))
    if peer == "massive":
        return doc | {"cost": cost, "options": asdict(opts)}
    return {"kind": DOC_KIND, "peer": peer, "model": model_name or _model_type(model), "model_type": _model_type(model),
            "options": asdict(opts), **doc, "cost": cost}
