"""PAGE decomposition: how much of each module's S flows through the sink positions, and how low-rank G_i is.

For module m and sample i, `G_i = D_i^T X_i = sum_t d_t x_t^T`. Split the token positions
into the sink set P (the first token, or the positions holding a massive activation) and the
rest R: `G_i = G_P + G_R`, so

    ||G_i||^2 = ||G_P||^2 + ||G_R||^2 + 2 <G_P, G_R>

`S_rest` (the mean of ||G_R||^2) is exactly PAGE's S with the sink positions' inputs excluded
(`page_probe(..., exclude_positions=...)`); `S_sink` is S from the sink inputs alone. A module
whose S is mostly `S_sink` is dominant because of the attention sink, not because of the task.

All three come from the token Gram matrices K = X X^T and L = D D^T (T x T, as the ghost norm
uses): ||G||^2 = sum(K * L), restricted to the P x P, R x R and cross blocks. The nonzero
eigenvalues of K^{1/2} L K^{1/2} are the squared singular values of G_i, which give its
effective rank (top singular value share sigma_1^2 / sum sigma^2, and exp of the entropy of
the normalised sigma^2) without ever forming G_i. One forward + backward pass, weights frozen,
no weight gradients allocated.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from domlora.errors import ConfigError
from domlora.io import atomic_outputs, write_json
from domlora.models import load_model
from domlora.modules import Candidate, find_candidates
from domlora.placement import dominant_module
from domlora.probes.activations import MassiveCriterion, block_name
from domlora.probes.page import PageResult, check_lora_shape, excluded_positions, page_closed_form
from domlora.samples import EncodeReport, Encoded, encode_samples, iter_batches, per_sample_loss, read_samples
from domlora.studies.stability import bootstrap_choice

logger = logging.getLogger(__name__)

SINKS = ("first", "massive")
PARTS = ("total", "sink", "rest")


@dataclass
class Decomposition:
    """Per sample and module: ||G_i||^2 split into sink / rest parts, and G_i's effective rank."""

    candidates: list[Candidate]
    sink: str
    """how the sink positions were chosen: `first`, `massive`, `positions [..]` or `custom`"""
    alpha: float
    rank: int
    n_samples: int
    total: list[list[float]]
    """N x M: ||G_i||^2 (as PageResult.per_sample)"""
    sink_part: list[list[float]]
    """N x M: ||D^T X_P||^2, the sink positions' inputs alone"""
    rest_part: list[list[float]]
    """N x M: ||D^T X_R||^2, the sink positions' inputs excluded"""
    input_energy_sink: list[list[float]]
    """N x M: share of ||X_i||_F^2 on the sink positions"""
    top_sv_share: list[list[float]]
    """N x M: sigma_1^2 / sum sigma^2 of G_i (NaN where not computed)"""
    effective_rank: list[list[float]]
    """N x M: exp(entropy of sigma^2 / sum sigma^2) of G_i (NaN where not computed)"""
    sink_positions: list[list[int]]
    """per sample, the positions treated as sinks"""
    seconds: float = 0.0
    encode_report: EncodeReport | None = None
    methods: dict[str, str] = field(default_factory=dict)

    def _col(self, rows: list[list[float]], j: int) -> list[float]:
        return [r[j] for r in rows]

    def page_result(self, part: str = "total") -> PageResult:
        """PAGE scores from one part: `total` (= page_probe), `rest` (sinks excluded) or `sink` (sinks only)."""
        rows = {"total": self.total, "sink": self.sink_part, "rest": self.rest_part}.get(part)
        if rows is None:
            raise ConfigError(f"part must be one of {', '.join(PARTS)}, got {part!r}")
        n = self.n_samples
        S = {c.name: sum(r[j] for r in rows) / n for j, c in enumerate(self.candidates)}
        return PageResult(candidates=list(self.candidates), S=S, per_sample=[list(r) for r in rows],
                          alpha=self.alpha, rank=self.rank, n_samples=n, encode_report=self.encode_report,
                          seconds=self.seconds, methods=dict(self.methods))

    def module_table(self) -> dict[str, dict]:
        """Per module: S, its sink / rest / cross shares, input energy on sinks, effective rank."""
        n = self.n_samples
        out = {}
        for j, c in enumerate(self.candidates):
            S = sum(self._col(self.total, j)) / n
            Ss = sum(self._col(self.sink_part, j)) / n
            Sr = sum(self._col(self.rest_part, j)) / n
            tops = [v for v in self._col(self.top_sv_share, j) if not math.isnan(v)]
            eranks = [v for v in self._col(self.effective_rank, j) if not math.isnan(v)]
            out[c.name] = {
                "type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out,
                "S": S, "S_sink": Ss, "S_rest": Sr, "S_cross": S - Ss - Sr,
                "sink_share": Ss / S if S > 0 else float("nan"),
                "rest_share": Sr / S if S > 0 else float("nan"),
                "cross_share": (S - Ss - Sr) / S if S > 0 else float("nan"),
                "PAGE": page_closed_form(S, alpha=self.alpha, rank=self.rank, d_in=c.d_in),
                "PAGE_rest": page_closed_form(Sr, alpha=self.alpha, rank=self.rank, d_in=c.d_in),
                "input_energy_sink": sum(self._col(self.input_energy_sink, j)) / n,
                "top_sv_share": sum(tops) / len(tops) if tops else None,
                "top_sv_share_min": min(tops) if tops else None,
                "effective_rank": sum(eranks) / len(eranks) if eranks else None,
            }
        return out

    def to_dict(self, *, model: str | None = None) -> dict:
        """The `decompose.json` document: module table plus the rankings with and without the sinks."""
        table = self.module_table()
        has_down = any(m["type"] == "down_proj" for m in table.values())

        def ranking(key):
            ranked = sorted(table, key=lambda k: -table[k][key])
            mods = {k: {"type": v["type"], "PAGE": v[key]} for k, v in table.items()}
            return {"argmax": ranked[0], "dominant": dominant_module(mods) if has_down else None,
                    "top_5": ranked[:5]}

        with_sink, without = ranking("PAGE"), ranking("PAGE_rest")
        doc = {"model": model, "sink": self.sink, "alpha": self.alpha, "rank": self.rank,
               "n_samples": self.n_samples, "seconds": self.seconds,
               "sink_positions_per_sample": [len(p) for p in self.sink_positions],
               "sink_is_first_token": all(p == [0] for p in self.sink_positions),
               "with_sink": with_sink, "without_sink": without,
               "dominant_changes_without_sink": with_sink["dominant"] != without["dominant"],
               "argmax_changes_without_sink": with_sink["argmax"] != without["argmax"],
               "modules": table}
        for key in ("dominant", "argmax"):
            name = with_sink[key]
            if name:
                doc[f"{key}_split"] = {k: table[name][k] for k in
                                       ("sink_share", "rest_share", "cross_share", "input_energy_sink",
                                        "top_sv_share", "effective_rank")} | {"name": name}
        return doc


def _sigma2(K, L):
    """Squared singular values of G = D^T X from K = X X^T and L = D D^T (float64, T x T)."""
    import torch

    lam, U = torch.linalg.eigh(K)
    root = (U * lam.clamp_min(0).sqrt()) @ U.T
    return torch.linalg.eigvalsh(root @ L @ root).clamp_min(0)


def _rank_stats(s2) -> tuple[float, float]:
    tot = float(s2.sum())
    if tot <= 0:
        return float("nan"), float("nan")
    p = s2 / tot
    p = p[p > 0]
    return float(s2.max()) / tot, math.exp(float(-(p * p.log()).sum()))


def page_decompose(model, encoded: Sequence[Encoded], *, sink: str | Sequence[int] | Callable = "first",
                   alpha: float = 16.0, rank: int = 8, batch_size: int = 4,
                   candidates: Sequence[Candidate] | None = None, rank_types: Collection[str] | None = None,
                   criterion: MassiveCriterion | None = None, show_progress: bool = False) -> Decomposition:
    """Split every module's PAGE S into sink / rest parts and measure the effective rank of G_i.

    Args:
        model: a causal LM; frozen and untouched (hooks only).
        encoded: tokenised probe samples with loss masks (as for `page_probe`).
        sink: `first` (position 0), `massive` (every position holding a massive residual-stream
            value in some block, per sample), a list of positions, or `fn(sample_indices, batch) -> bool (B, T)`.
        alpha, rank: the LoRA shape PAGE is scaled for.
        candidates: modules to decompose (default: all).
        rank_types: module types whose G_i effective rank is computed (default: all; `()` for none).
        criterion: what counts as massive (for `sink="massive"`).

    Raises:
        ConfigError: empty probe set, bad alpha / rank / sink.
    """
    import torch
    from tqdm.auto import tqdm

    check_lora_shape(alpha, rank)
    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample with an assistant turn")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(sink, str) and sink not in SINKS:
        raise ConfigError(f"sink must be one of {', '.join(SINKS)}, a list of positions or a callable; got {sink!r}")
    criterion = criterion or MassiveCriterion()
    cands = list(candidates) if candidates is not None else find_candidates(model)
    modules = dict(model.named_modules())
    missing = [c.name for c in cands if c.name not in modules]
    if missing:
        raise ConfigError(f"modules not in this model: {missing[:5]}")
    want_rank = {c.name for c in cands if rank_types is None or c.type in rank_types}
    device = next(model.parameters()).device
    pad_id = getattr(model.config, "pad_token_id", None) or 0
    n, M = len(encoded), len(cands)
    f64 = torch.float64
    parts = {k: torch.zeros((n, M), dtype=f64) for k in ("total", "sink", "rest", "energy")}
    top = torch.full((n, M), float("nan"), dtype=f64)
    erank = torch.full((n, M), float("nan"), dtype=f64)
    sink_pos: list[list[int]] = [[] for _ in range(n)]
    methods: dict[str, str] = {}
    state: dict = {}

    def reduce(j: int, c: Candidate, X, D):
        valid = state["valid"]  # B x T bool
        P = state["sink"] & valid
        R = valid & ~P
        acc = f64 if X.dtype == f64 else torch.float32
        Xm = X.to(acc) * valid.unsqueeze(-1)
        Dm = D.to(acc)
        B, T = valid.shape
        ix = torch.as_tensor(state["idx"])
        if T * (c.d_in + c.d_out) < c.d_in * c.d_out:  # the cheaper route, as page_probe's `auto`
            methods[c.name] = "gram"
            K = torch.bmm(Xm, Xm.transpose(1, 2)).to(f64)
            L = torch.bmm(Dm, Dm.transpose(1, 2)).to(f64)
            E = K * L
            PP = (P.unsqueeze(2) & P.unsqueeze(1)).to(f64)
            RR = (R.unsqueeze(2) & R.unsqueeze(1)).to(f64)
            tot = E.sum((1, 2))
            parts["total"][ix, j] += tot.cpu()
            parts["sink"][ix, j] += (E * PP).sum((1, 2)).cpu()
            parts["rest"][ix, j] += (E * RR).sum((1, 2)).cpu()
            diagK = torch.diagonal(K, dim1=1, dim2=2)
            parts["energy"][ix, j] = ((diagK * P).sum(1) / diagK.sum(1).clamp_min(1e-300)).cpu()
            if c.name in want_rank:
                lens = valid.sum(1)
                for b in range(B):
                    t = int(lens[b])
                    s2 = _sigma2(K[b, :t, :t], L[b, :t, :t])
                    top[ix[b], j], erank[ix[b], j] = _rank_stats(s2.cpu())
        else:
            methods[c.name] = "direct"
            for b in range(B):
                Gp = Dm[b].T @ (Xm[b] * P[b].unsqueeze(-1))
                Gr = Dm[b].T @ (Xm[b] * R[b].unsqueeze(-1))
                G = (Gp + Gr).to(f64)
                parts["total"][ix[b], j] += float((G * G).sum())
                parts["sink"][ix[b], j] += float((Gp.to(f64) ** 2).sum())
                parts["rest"][ix[b], j] += float((Gr.to(f64) ** 2).sum())
                e = (Xm[b].to(f64) ** 2).sum(-1)
                parts["energy"][ix[b], j] = float((e * P[b]).sum() / e.sum().clamp_min(1e-300))
                if c.name in want_rank:
                    top[ix[b], j], erank[ix[b], j] = _rank_stats((torch.linalg.svdvals(G) ** 2).cpu())

    def make_hook(j: int, c: Candidate):
        def fwd(_mod, inputs, output):
            X = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(lambda D: reduce(j, c, X, D.detach()))
        return fwd

    handles = [modules[c.name].register_forward_hook(make_hook(j, c)) for j, c in enumerate(cands)]
    emb = model.get_input_embeddings()
    handles.append(emb.register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    if sink == "massive":
        blocks = sorted({block_name(c) for c in cands})

        def massive_hook(_mod, _inp, out):
            h = (out[0] if isinstance(out, (tuple, list)) else out).detach().abs().float()
            valid = state["valid"]
            peak = h.max(-1).values * valid  # B x T
            for b in range(h.shape[0]):
                t = int(valid[b].sum())
                med = float(h[b, :t].median())
                state["sink"][b, :t] |= (peak[b, :t] > criterion.abs_threshold) & (peak[b, :t] >= criterion.ratio * med)
        handles += [modules[b].register_forward_hook(massive_hook) for b in blocks]

    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        total = math.ceil(n / batch_size)
        it = iter_batches(encoded, batch_size=batch_size, pad_id=pad_id, device=device)
        for idx, batch in tqdm(it, total=total, desc="PAGE decomposition", disable=not show_progress, unit="batch"):
            state["idx"] = idx
            state["valid"] = batch["attention_mask"].bool()
            if sink == "first":
                state["sink"] = excluded_positions([0], idx, batch)
            elif sink == "massive":
                state["sink"] = torch.zeros_like(state["valid"])
            else:
                state["sink"] = excluded_positions(sink, idx, batch)
            with torch.enable_grad():
                out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                losses = per_sample_loss(out.logits, batch)
                if not torch.isfinite(losses).all():
                    raise ConfigError("the probe loss is not finite; fix: check the model dtype (use float32 on CPU)")
                losses.sum().backward()
            for b, i in enumerate(idx):
                sink_pos[i] = [int(t) for t in (state["sink"][b] & state["valid"][b]).nonzero().flatten()]
            del out, losses
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    seconds = time.perf_counter() - t0
    leaked = [name for name, p in model.named_parameters() if p.grad is not None]
    assert not leaked, f"PAGE decomposition allocated weight gradients: {leaked[:3]}"
    label = sink if isinstance(sink, str) else ("custom" if callable(sink) else f"positions {list(sink)}")
    return Decomposition(candidates=cands, sink=label, alpha=float(alpha), rank=int(rank), n_samples=n,
                         total=parts["total"].tolist(), sink_part=parts["sink"].tolist(),
                         rest_part=parts["rest"].tolist(), input_energy_sink=parts["energy"].tolist(),
                         top_sv_share=top.tolist(), effective_rank=erank.tolist(), sink_positions=sink_pos,
                         seconds=seconds, methods=methods)


def decompose(*, model: str, data: str, out_dir: str, samples: int = 32, max_length: int = 256,
              alpha: float = 16.0, rank: int = 8, batch_size: int = 4, sink: str = "first", n_boot: int = 1000,
              seed: int = 0, dtype: str = "auto", device: str | None = None, cache_dir: str | None = None,
              trust_remote_code: bool = False, model_name: str | None = None, show_progress: bool = False) -> dict:
    """Decompose stage: write `decompose.json` (sink / rest split, effective rank, bootstrap) into `out_dir`."""
    check_lora_shape(alpha, rank)
    if samples < 1:
        raise ConfigError(f"--samples must be >= 1, got {samples}")
    if sink not in SINKS:
        raise ConfigError(f"--sink must be one of {', '.join(SINKS)}, got {sink!r}")
    if n_boot < 0:
        raise ConfigError(f"--bootstrap must be >= 0, got {n_boot}")
    chosen = read_samples(data, limit=samples)
    loaded = load_model(model, dtype=dtype, device=device, cache_dir=cache_dir, trust_remote_code=trust_remote_code)
    encoded, report = encode_samples(loaded.tokenizer, chosen, max_length=max_length)
    dec = page_decompose(loaded.model, encoded, sink=sink, alpha=alpha, rank=rank, batch_size=batch_size,
                         show_progress=show_progress)
    dec.encode_report = report
    doc = dec.to_dict(model=model_name or model) | {"data": str(data), "max_length": max_length}
    if n_boot:
        doc["bootstrap"] = bootstrap_choice(dec.page_result("total"), n_boot=n_boot, seed=seed).to_dict()
        doc["bootstrap_without_sink"] = bootstrap_choice(dec.page_result("rest"), n_boot=n_boot, seed=seed).to_dict()
    with atomic_outputs(out_dir) as stage:
        write_json(stage / "decompose.json", doc)
    split = doc.get("dominant_split") or {}
    logger.info("dom %s: %.1f%% of its S through the sink positions; without them dom is %s",
                doc["with_sink"]["dominant"], 100 * (split.get("sink_share") or float("nan")),
                doc["without_sink"]["dominant"])
    return doc
