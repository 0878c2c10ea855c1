"""Activation statistics: where massive activations appear, and which `down_proj` weights make them.

Forward hooks only (no gradients, the model is never modified). Per Transformer block: the
largest |value| of the residual stream after the block, at which sample / token position /
channel, its ratio to the hidden state's median magnitude and its jump from the block's input;
per `down_proj`: the largest |input| and |output| and, at the output's peak, which single
weight contributes most ("super weight" candidate, Yu et al. 2024). A value is *massive*
(Sun et al. 2024) when |value| > 100 and >= 1000x the median |value| of its hidden state.

The `diagnose` study (`domlora.studies.diagnostics`) plots them; `probes.massive` predicts the
dominant module from them.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from domlora.errors import ConfigError, ModelError
from domlora.modules import BLOCK_RE, Candidate, find_candidates
from domlora.probes.runner import run_pass
from domlora.samples import Encoded

logger = logging.getLogger(__name__)



@dataclass(frozen=True)
class MassiveCriterion:
    """When a hidden-state value counts as massive (Sun et al. 2024, Sec. 2)."""

    abs_threshold: float = 100.0
    """|value| must exceed this"""
    ratio: float = 1000.0
    """and be at least this many times the median |value| of its hidden state (one sequence)"""
    min_fraction: float = 0.5
    """a layer is massive when this fraction of the probe samples has a massive value there"""

    def __post_init__(self):
        if not (self.abs_threshold >= 0 and math.isfinite(self.abs_threshold)):
            raise ConfigError(f"abs_threshold must be a finite number >= 0, got {self.abs_threshold!r}")
        if not (self.ratio >= 1 and math.isfinite(self.ratio)):
            raise ConfigError(f"ratio must be a finite number >= 1, got {self.ratio!r}")
        if not 0 < self.min_fraction <= 1:
            raise ConfigError(f"min_fraction must be in (0, 1], got {self.min_fraction!r}")

    def is_massive(self, value: float, median: float) -> bool:
        return abs(value) > self.abs_threshold and abs(value) >= self.ratio * max(median, 1e-30)


@dataclass
class Peak:
    """The largest |value| of one tensor over the probe set, and where it is."""

    value: float
    """signed value at the peak"""
    sample: int
    position: int
    channel: int

    @property
    def magnitude(self) -> float:
        return abs(self.value)


@dataclass
class LayerStats:
    """The residual stream after one block (its output hidden state)."""

    layer: int
    peak: Peak
    """largest |h| over all samples"""
    median: float
    """median over samples of each sample's median |h|"""
    ratio: float
    """peak magnitude / median |h| of the peak's sample"""
    jump: float
    """median over samples of max|h_out| / max|h_in| (how much the block grows the largest value)"""
    peak_before: float
    """|h_in| at the peak's (sample, position, channel): small when the block created the value"""
    mlp_share: float
    """the block's FFN output at the peak's entry / (h_out - h_in) there: 1 when the FFN made the jump"""
    massive_fraction: float
    """fraction of samples whose hidden state here holds a massive value"""
    first_token_fraction: float
    """fraction of samples whose largest |h| is at position 0"""
    channel_fraction: float
    """fraction of samples whose largest |h| is in the peak's channel"""


@dataclass
class SuperWeight:
    """At a `down_proj` output peak y_j = sum_k x_k W_jk: the weight contributing most."""

    row: int
    """output channel j (the peak's channel)"""
    col: int
    """input channel k of the largest contribution x_k W_jk"""
    weight: float
    """W_jk"""
    input_value: float
    """x_k at the peak's token"""
    share: float
    """x_k W_jk / y_j: the fraction of the output peak this one weight produces"""
    aligned: bool
    """k is also the channel of the largest |input| of this down_proj (the massive input channel)"""
    weight_z: float
    """|W_jk| / std of all of W (how much of an outlier the weight is)"""
    column_rank: int
    """1 = the largest |W_.k| in its column"""
    column_outliers: list[dict] = field(default_factory=list)
    """the largest |W_.k'| in the column of the massive input channel k', with |W| / median |W_.k'|"""


@dataclass
class DownProjStats:
    """One `down_proj`: its input (the FFN's hidden activation) and output."""

    name: str
    layer: int
    input_peak: Peak
    output_peak: Peak
    input_median_max: float
    """median over samples of each sample's max |input|"""
    output_median_max: float
    """median over samples of each sample's max |output|"""
    first_token_energy: float
    """mean over samples of the share of ||X||_F^2 on position 0"""
    super_weight: SuperWeight | None = None


@dataclass
class ActivationReport:
    """Everything `activation_diagnostics` measured."""

    n_samples: int
    n_tokens: int
    criterion: MassiveCriterion
    embedding: LayerStats
    """the input of the first block (layer -1)"""
    layers: list[LayerStats]
    down_proj: list[DownProjStats]
    candidates: list[Candidate]
    seconds: float = 0.0

    @property
    def onset_layer(self) -> int | None:
        """The first block after which most samples hold a massive value (None: no such block)."""
        for s in self.layers:
            if s.massive_fraction >= self.criterion.min_fraction:
                return s.layer
        return None

    def down_proj_at(self, layer: int) -> DownProjStats | None:
        return next((d for d in self.down_proj if d.layer == layer), None)

    def to_dict(self) -> dict:
        return {"n_samples": self.n_samples, "n_tokens": self.n_tokens, "criterion": asdict(self.criterion),
                "onset_layer": self.onset_layer, "seconds": self.seconds,
                "embedding": _layer_dict(self.embedding),
                "layers": [_layer_dict(s) for s in self.layers],
                "down_proj": [_down_dict(d) for d in self.down_proj]}


def _layer_dict(s: LayerStats) -> dict:
    d = asdict(s)
    d["max"] = s.peak.magnitude
    return d


def _down_dict(d: DownProjStats) -> dict:
    out = asdict(d)
    out["input_max"] = d.input_peak.magnitude
    out["output_max"] = d.output_peak.magnitude
    return out


def block_name(cand: Candidate) -> str:
    """`model.layers.11.mlp.down_proj` -> `model.layers.11`."""
    m = BLOCK_RE.search(cand.name)
    if m is None:  # pragma: no cover - find_candidates only returns names that match
        raise ModelError(f"cannot tell which block {cand.name} belongs to")
    return cand.name[: m.end() - 1]


def ffn_down_candidates(model) -> tuple[list[Candidate], list[Candidate]]:
    """All candidates and the `down_proj` ones, one per layer.

    Raises:
        ModelError: no projections, or no FFN down projection among them.
    """
    cands = find_candidates(model)
    downs = [c for c in cands if c.type == "down_proj"]
    if not downs:
        types = sorted({c.type for c in cands})
        raise ModelError(f"no FFN down projection recognised in {type(model).__name__} (module types found: "
                         f"{', '.join(types)}); the massive-activation diagnostics need each block's FFN output "
                         "projection (`mlp.down_proj`, GPT-2 `mlp.c_proj`, `dense_4h_to_h`, `mlp.fc2`); fix: use a "
                         "decoder LM with a supported architecture (Llama, Qwen2/3, Mistral, Gemma, Phi-3, GPT-2)")
    layers = [c.layer for c in downs]
    if len(set(layers)) != len(layers):
        raise ModelError(f"more than one down projection per block in {type(model).__name__} (e.g. a mixture of "
                         "experts); these diagnostics support one FFN per block")
    return cands, downs


def _weight_matrix(module, cand: Candidate):
    """W as d_out x d_in (nn.Linear convention), detached; GPT-2 Conv1D stores the transpose."""
    w = module.weight.detach()
    return w.T if cand.conv1d else w


def _row_abs_max(H):
    """max |H| over the last dimension, without forming |H| (max of the largest and minus the smallest)."""
    import torch

    return torch.maximum(H.amax(-1), -H.amin(-1))


_SAMPLE_INDEX: dict = {}


def lower_median(x) -> float:
    """`x.median()` (the lower median of a 1-D tensor), found on a CPU by selecting inside a bracket.

    A fixed pseudo-random subsample of 1024 values brackets the median's rank (4 standard deviations
    of the sampled rank each side); counting the values below the bracket and partitioning those
    inside it gives the exact element, in a third of `torch.median`'s time. If the bracket misses
    (about 1 in 10^4), it falls back to `torch.median`.
    """
    import numpy as np
    import torch

    n = x.numel()
    k = (n - 1) // 2
    if n < 8192 or x.device.type != "cpu":
        return float(x.median())
    a = (x if x.dtype in (torch.float32, torch.float64) else x.float()).contiguous().numpy()
    sample = _SAMPLE_INDEX.get(n)
    if sample is None:
        sample = _SAMPLE_INDEX[n] = np.random.default_rng(n).integers(0, n, 1024)
    s = np.sort(a[sample])
    r = k * s.size / n
    w = 4 * math.sqrt(s.size * 0.25) + 2
    lo, hi = s[max(int(r - w), 0)], s[min(int(r + w), s.size - 1)]
    below = int(np.count_nonzero(a < lo))
    inside = a[(a >= lo) & (a <= hi)]
    j = k - below
    if 0 <= j < inside.size:
        return float(np.partition(inside, j)[j])
    return float(x.median())


class _Tracker:
    """Per-sample reductions of one hooked tensor: max |value| with its position/channel, and medians.

    They stay where the model runs until `to_cpu` (a GPU pass is not stalled by a copy per layer)."""

    def __init__(self, n: int, *, medians: bool):
        self.n = n
        self.medians = medians
        self.max = None

    def _alloc(self, device) -> None:
        import torch

        def zeros(dtype):
            return torch.zeros(self.n, dtype=dtype, device=device)

        self.max, self.val = zeros(torch.float64), zeros(torch.float64)
        self.pos, self.ch = zeros(torch.long), zeros(torch.long)
        self.median = zeros(torch.float64) if self.medians else None

    def update(self, H, ix, lengths, lens: list[int]):
        """H (B, T, d); ix: the samples' indices and lengths: their lengths, on H's device; lens: lengths on the host."""
        import torch

        if self.max is None:
            self._alloc(H.device)
        H = H.detach()
        B, T, _d = H.shape
        # the largest |value| of each row (no copy of H), padded rows below any real one
        row_max = _row_abs_max(H).float()
        valid = torch.arange(T, device=H.device)[None, :] < lengths[:, None]
        vmax, pos = row_max.masked_fill(~valid, -1.0).max(1)  # first position holding the peak
        ar = torch.arange(B, device=H.device)
        rows = H[ar, pos]
        ch = rows.abs().argmax(-1)  # first channel holding it
        self.max[ix] = vmax.double()
        self.val[ix] = rows[ar, ch].double()
        self.pos[ix] = pos
        self.ch[ix] = ch
        if self.medians:
            A = H.abs()
            if H.device.type == "cpu":
                self.median[ix] = torch.tensor([lower_median(A[b, : lens[b]].reshape(-1)) for b in range(B)],
                                               dtype=torch.float64)
            else:  # one selection per sample (a batched median along a dim sorts: slower on a GPU)
                for b in range(B):
                    self.median[ix[b:b + 1]] = A[b, : lens[b]].median().double().reshape(1)
        return pos, ch

    def to_cpu(self) -> None:
        for k in ("max", "val", "pos", "ch", "median"):
            v = getattr(self, k)
            if v is not None:
                setattr(self, k, v.cpu())

    def peak(self) -> Peak:
        i = int(self.max.argmax())
        return Peak(value=float(self.val[i]), sample=i, position=int(self.pos[i]), channel=int(self.ch[i]))


class ActivationCollector:
    """The activation statistics' forward hooks: each block's input and output, each `down_proj`'s
    input and output, reduced per sample as the batches pass (nothing of size tokens x width is kept)."""

    needs_backward = False

    def __init__(self, candidates: Sequence[Candidate], downs: Sequence[Candidate], n_samples: int, *,
                 criterion: MassiveCriterion | None = None, n_column_outliers: int = 3):
        import torch

        self.candidates = list(candidates)
        self.downs = list(downs)
        self.n = n = n_samples
        self.criterion = criterion or MassiveCriterion()
        self.n_column_outliers = n_column_outliers
        blocks: dict[int, str] = {}
        for c in self.candidates:
            blocks.setdefault(c.layer, block_name(c))
        self.blocks = blocks
        self.layers = layers = sorted(blocks)
        self.emb = _Tracker(n, medians=True)
        self.res = {L: _Tracker(n, medians=True) for L in layers}
        self.dx = {c.layer: _Tracker(n, medians=False) for c in self.downs}
        self.dy = {c.layer: _Tracker(n, medians=False) for c in self.downs}
        self.state: dict = {}
        self.n_tokens = 0

    def _alloc(self, device) -> None:
        import torch

        def zeros(*shape):
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        n = self.n
        self.jump = {L: zeros(n) for L in self.layers}
        self.before = {L: zeros(n) for L in self.layers}
        self.ffn_at_peak = {L: zeros(n) for L in self.layers}
        self.first_energy = {c.layer: zeros(n) for c in self.downs}
        # the input row at each sample's output peak, to attribute the peak to single weights
        self.x_at_peak = {c.layer: torch.zeros(n, c.d_in, dtype=torch.float32, device=device) for c in self.downs}

    def attach(self, ctx) -> list:
        self.modules = ctx.modules
        self._alloc(ctx.device)
        handles = []
        for L in self.layers:
            blk = ctx.modules[self.blocks[L]]
            handles.append(blk.register_forward_pre_hook(self._pre_block(L), with_kwargs=True))
            handles.append(blk.register_forward_hook(self._post_block(L), with_kwargs=True))
        for c in self.downs:
            handles.append(ctx.modules[c.name].register_forward_hook(self._down_hook(c)))
        return handles

    def start_batch(self, idx: list[int], batch: dict) -> None:
        import torch

        self.state.clear()
        lengths = batch["attention_mask"].sum(1)
        self.state["ix"] = torch.as_tensor(idx, device=lengths.device)
        self.state["len"] = lengths
        self.state["lens"] = lens = lengths.tolist()  # one copy per batch, for slicing on the host
        self.n_tokens += sum(lens)

    def end_batch(self) -> None:
        self.state.clear()

    def _pre_block(self, L):
        state = self.state

        def hook(_mod, args, kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            state["h_in"] = h.detach()
            if L == self.layers[0]:
                self.emb.update(h, state["ix"], state["len"], state["lens"])
        return hook

    def _post_block(self, L):
        import torch

        state, res = self.state, self.res

        def hook(_mod, _args, _kwargs, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            h = h.detach()
            ix = state["ix"]
            pos, ch = res[L].update(h, ix, state["len"], state["lens"])
            h_in = state.pop("h_in")
            B = h.shape[0]
            ar = torch.arange(B, device=h.device)
            valid = torch.arange(h.shape[1], device=h.device)[None, :] < state["len"][:, None]
            in_max = (_row_abs_max(h_in).float() * valid).max(1).values
            self.jump[L][ix] = res[L].max[ix] / in_max.double().clamp_min(1e-30)
            self.before[L][ix] = h_in[ar, pos, ch].abs().double()
            y = state.pop(("y", L), None)
            if y is not None:
                delta = (h[ar, pos, ch] - h_in[ar, pos, ch]).double()
                made = y[ar, pos, ch].double()
                self.ffn_at_peak[L][ix] = made / torch.where(delta.abs() > 0, delta, torch.ones_like(delta))
        return hook

    def _down_hook(self, c: Candidate):
        import torch

        state = self.state

        def hook(_mod, inputs, out):
            X = inputs[0].detach()
            y = out.detach()
            ix, lengths, lens = state["ix"], state["len"], state["lens"]
            self.dx[c.layer].update(X, ix, lengths, lens)
            pos, _ = self.dy[c.layer].update(y, ix, lengths, lens)
            state[("y", c.layer)] = y
            B = X.shape[0]
            ar = torch.arange(B, device=X.device)
            valid = torch.arange(X.shape[1], device=X.device)[None, :] < lengths[:, None]
            acc = torch.promote_types(X.dtype, torch.float32)
            energy = torch.linalg.vector_norm(X, dim=-1, dtype=acc).square() * valid  # B x T
            self.x_at_peak[c.layer][ix] = X[ar, pos].float()
            self.first_energy[c.layer][ix] = (energy[:, 0] / energy.sum(1).clamp_min(1e-30)).double()
        return hook

    def result(self, *, seconds: float) -> ActivationReport:
        n, criterion = self.n, self.criterion
        for tr in [self.emb, *self.res.values(), *self.dx.values(), *self.dy.values()]:
            tr.to_cpu()
        for d in (self.jump, self.before, self.ffn_at_peak, self.first_energy):
            for k in d:
                d[k] = d[k].cpu()

        def layer_stats(L: int, tr: _Tracker, j=None, bef=None, ffn=None) -> LayerStats:
            pk = tr.peak()
            massive = [criterion.is_massive(float(tr.max[i]), float(tr.median[i])) for i in range(n)]
            return LayerStats(
                layer=L, peak=pk, median=float(tr.median.median()),
                ratio=pk.magnitude / max(float(tr.median[pk.sample]), 1e-30),
                jump=float(j.median()) if j is not None else float("nan"),
                peak_before=float(bef[pk.sample]) if bef is not None else float("nan"),
                mlp_share=float(ffn[pk.sample]) if ffn is not None else float("nan"),
                massive_fraction=sum(massive) / n,
                first_token_fraction=float((tr.pos == 0).double().mean()),
                channel_fraction=float((tr.ch == pk.channel).double().mean()))

        embedding = layer_stats(-1, self.emb)
        layer_list = [layer_stats(L, self.res[L], self.jump[L], self.before[L],
                                  self.ffn_at_peak[L] if L in self.dx else None) for L in self.layers]
        down_list = []
        for c in self.downs:
            W = _weight_matrix(self.modules[c.name], c)
            dx, dy = self.dx[c.layer], self.dy[c.layer]
            ip, op = dx.peak(), dy.peak()
            sw = _super_weight(W, self.x_at_peak[c.layer][op.sample], op, ip, self.n_column_outliers)
            down_list.append(DownProjStats(
                name=c.name, layer=c.layer, input_peak=ip, output_peak=op,
                input_median_max=float(dx.max.median()), output_median_max=float(dy.max.median()),
                first_token_energy=float(self.first_energy[c.layer].mean()), super_weight=sw))
        return ActivationReport(n_samples=n, n_tokens=self.n_tokens, criterion=criterion, embedding=embedding,
                                layers=layer_list, down_proj=down_list, candidates=self.candidates,
                                seconds=seconds)


def activation_diagnostics(model, encoded: Sequence[Encoded], *, batch_size: int = 8,
                           criterion: MassiveCriterion | None = None, n_column_outliers: int = 3,
                           show_progress: bool = False) -> ActivationReport:
    """Measure the residual stream and every `down_proj` on a probe set (forward only).

    `probes.step0.step0_probe` computes the same report in the pass that also yields PAGE and NFN.

    Args:
        model: a causal LM; only forward hooks are attached (and removed), nothing is written.
        encoded: tokenised samples (`samples.encode_samples`); no labels are used.
        batch_size: samples per forward pass; the report does not depend on it.
        criterion: what counts as a massive activation.
        n_column_outliers: how many of the largest weights of the massive input channel's column to list.

    Raises:
        ConfigError: an empty probe set.
        ModelError: no recognisable FFN down projection.
    """
    criterion = criterion or MassiveCriterion()
    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one tokenised sample")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    cands, downs = ffn_down_candidates(model)
    col = ActivationCollector(cands, downs, len(encoded), criterion=criterion, n_column_outliers=n_column_outliers)
    stats = run_pass(model, encoded, [col], batch_size=batch_size, show_progress=show_progress, desc="activations")
    return col.result(seconds=stats.seconds)


def _super_weight(W, x_row, out_peak: Peak, in_peak: Peak, n_outliers: int) -> SuperWeight | None:
    """Attribute y_j at the output peak to single weights x_k W_jk; describe the input channel's column."""
    import torch

    if x_row is None:
        return None
    Wf = W.float()  # where the weights are: on a GPU, an 8B model's down_proj need not cross to the CPU
    x_row = x_row.to(Wf.device)
    j = out_peak.channel
    contrib = x_row * Wf[j]
    k = int(contrib.abs().argmax())
    y = float(contrib.sum())
    std = float(Wf.std()) or 1e-30
    col = Wf[:, k].abs()
    rank = int((col > col[j]).sum()) + 1
    kin = in_peak.channel
    colin = Wf[:, kin].abs()
    med = float(colin.median()) or 1e-30
    top = torch.topk(colin, min(n_outliers, colin.numel()))
    outliers = [{"row": int(r), "weight": float(Wf[int(r), kin]), "ratio_to_median": float(v) / med}
                for v, r in zip(top.values, top.indices)]
    return SuperWeight(row=j, col=k, weight=float(Wf[j, k]), input_value=float(x_row[k]),
                       share=float(contrib[k]) / y if y else float("nan"), aligned=k == kin,
                       weight_z=abs(float(Wf[j, k])) / std, column_rank=rank, column_outliers=outliers)
