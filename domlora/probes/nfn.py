"""NFN: Normalized Feature Norms, the alignment score behind PLoP (forward hooks only).

`NFN(W, x)^2 = ||W z||^2 / ||W z~||^2` with z the module input of a token and z~ a
centred Gaussian vector of the same dimension and norm. A module's score is the mean
over the tokens of the probe set; a type's score is the mean over its modules. PLoP
adapts the types with the lowest scores.

`||W z||^2` is read off the module's output (minus its bias), so it costs no matmul. For the
baseline, `||W z~||^2 = ||z||^2 q` with `q = ||W g||^2 / ||g||^2`, g ~ N(0, I): each module
draws a pool of K g's (`baseline_pool`: K = the longest sample's length, from a generator seeded
by the seed and the module's name), and the token at position t of sample i uses draw
`(t + o_i) mod K`, with o_i a hash of the sample's tokens (`sample_offset`), so that tokens two
samples share (a chat template's first tokens) do not share a draw. Each token's baseline is a
Gaussian z~ exactly as in the definition, but the draws cost one matmul of K rows per module
instead of one per token of the probe set (which costs as much as a second forward pass), and
the scores do not depend on the batch size or on the order of the samples.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.modules import Candidate, find_candidates, types_present
from domlora.probes.runner import run_pass
from domlora.samples import Encoded


@dataclass
class NFNResult:
    candidates: list[Candidate]
    module_scores: dict[str, float]
    n_tokens: int
    seconds: float = 0.0

    @property
    def type_scores(self) -> dict[str, float]:
        out = {}
        for t in types_present(self.candidates):
            vals = [self.module_scores[c.name] for c in self.candidates if c.type == t]
            out[t] = sum(vals) / len(vals)
        return out


def module_seed(seed: int, name: str) -> int:
    """A generator seed per (seed, module name): a module's draws do not depend on which others are scored."""
    digest = hashlib.blake2b(f"{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_offset(input_ids: Sequence[int], n: int, *, seed: int) -> int:
    """Where a sample starts in a module's pool of n draws: a hash of its tokens (order-free)."""
    digest = hashlib.blake2b(repr((int(seed), list(input_ids))).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % n


def _weight_in_out(module, cand: Candidate):
    """W as (d_in, d_out), detached: x @ W is the module's output without bias (GPT-2 Conv1D stores it so)."""
    w = module.weight.detach()
    return w if cand.conv1d else w.T


def baseline_draws(cand: Candidate, n: int, *, seed: int, device):
    """The n Gaussian vectors g (n, d_in) of one module, float32, drawn on `device`."""
    import torch

    gen = torch.Generator(device=device).manual_seed(module_seed(seed, cand.name))
    return torch.randn((n, cand.d_in), generator=gen, device=device, dtype=torch.float32)


def baseline_pool(module, cand: Candidate, n: int, *, seed: int, device):
    """`q_t = ||W g_t||^2 / ||g_t||^2` for the module's n draws g_t (shape n; float64 for a float64
    model, float32 otherwise)."""
    import torch

    w = _weight_in_out(module, cand)
    g = baseline_draws(cand, n, seed=seed, device=device)
    if w.is_cuda and w.dtype in (torch.bfloat16, torch.float16):
        # tensor cores: the draws rounded to the weights' dtype, products accumulated in float32; q is then the
        # exact ratio for the (rounded) vector used
        g = g.to(w.dtype)
        try:
            wg = torch.mm(g, w, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # pragma: no cover - a torch without mm(out_dtype=)
            wg = g.float() @ w.float()
        g = g.float()
    else:
        w = w.float() if w.dtype != torch.float64 else w
        g = g.to(w.dtype)
        wg = g @ w
    return wg.pow(2).sum(-1) / g.pow(2).sum(-1).clamp_min(1e-30)


class NFNCollector:
    """NFN's forward hooks: per token, ||y - b||^2 / (||z||^2 q_t), summed per module over real tokens."""

    needs_backward = False

    def __init__(self, candidates: Sequence[Candidate], *, seed: int = 0):
        self.candidates = list(candidates)
        self.seed = seed
        self.state: dict = {}
        self.n_tokens = 0

    def attach(self, ctx) -> list:
        import torch

        acc = torch.float64 if ctx.device.type != "mps" else torch.float32
        self.sums = torch.zeros(len(self.candidates), dtype=acc, device=ctx.device)
        self.pool_size = K = ctx.max_length
        self.offsets = torch.tensor([sample_offset(e.input_ids, K, seed=self.seed) for e in ctx.encoded],
                                    dtype=torch.long, device=ctx.device)
        handles = []
        for j, c in enumerate(self.candidates):
            mod = ctx.modules[c.name]
            pool = baseline_pool(mod, c, K, seed=self.seed, device=ctx.device)
            handles.append(mod.register_forward_hook(self._hook(j, mod, pool, ctx.group.get(c.name, -1 - j))))
        return handles

    def _hook(self, j: int, mod, pool, group: int):
        import torch

        bias = getattr(mod, "bias", None)
        bias = bias.detach() if bias is not None else None
        state, sums = self.state, self.sums

        def fwd(_m, inputs, output):
            y = output.detach()
            if bias is not None:
                y = y - bias
            acc = torch.float64 if y.dtype == torch.float64 else torch.float32
            zz = state["zz"].get(group)
            if zz is None:  # modules reading one input (q/k/v, gate/up) share ||z||^2
                zz = state["zz"][group] = torch.linalg.vector_norm(inputs[0].detach(), dim=-1, dtype=acc).square()
            yy = torch.linalg.vector_norm(y, dim=-1, dtype=acc).square()
            den = (zz * pool[state["draw"]]).clamp_min(1e-30)
            sums[j] += ((yy / den) * state["keep"]).sum(dtype=sums.dtype)
        return fwd

    def start_batch(self, idx: list[int], batch: dict) -> None:
        import torch

        mask = batch["attention_mask"]
        T = mask.shape[1]
        off = self.offsets[torch.as_tensor(idx, device=self.offsets.device)]
        self.state["draw"] = (torch.arange(T, device=off.device)[None, :] + off[:, None]) % self.pool_size
        self.state["keep"] = mask.float()
        self.state["zz"] = {}
        self.n_tokens += int(batch["attention_mask"].sum())

    def end_batch(self) -> None:
        self.state["zz"] = {}

    def result(self, *, seconds: float) -> NFNResult:
        sums = self.sums.cpu()
        n = max(self.n_tokens, 1)
        return NFNResult(candidates=self.candidates,
                         module_scores={c.name: float(sums[j] / n) for j, c in enumerate(self.candidates)},
                         n_tokens=self.n_tokens, seconds=seconds)


def nfn_probe(model, encoded: Sequence[Encoded], *, batch_size: int = 8,
              candidates: Sequence[Candidate] | None = None, seed: int = 0,
              show_progress: bool = False) -> NFNResult:
    """Score every candidate module by NFN with one forward pass over the samples.

    `probes.step0.step0_probe` computes the same numbers in the pass that also yields PAGE.

    Args:
        model: a causal LM (left untouched).
        encoded: tokenised samples; every non-padding token counts (PLoP uses inputs, no labels).
        batch_size: samples per forward pass; the scores do not depend on it.
        seed: seeds the Gaussian baseline vectors.
    """
    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample")
    cands = list(candidates) if candidates is not None else find_candidates(model)
    col = NFNCollector(cands, seed=seed)
    stats = run_pass(model, encoded, [col], batch_size=batch_size, show_progress=show_progress, desc="NFN probe")
    return col.result(seconds=stats.seconds)
