"""NFN: Normalized Feature Norms, the alignment score behind PLoP (forward hooks only).

`NFN(W, x)^2 = ||W z||^2 / ||W z~||^2` with z the module input of a token and z~ a
centred Gaussian vector of the same dimension and norm. A module's score is the mean
over the tokens of the probe set; a type's score is the mean over its modules. PLoP
adapts the types with the lowest scores.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from domlora.errors import ConfigError
from domlora.modules import Candidate, find_candidates, types_present
from domlora.samples import Encoded, iter_batches


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


def nfn_probe(model, encoded: Sequence[Encoded], *, batch_size: int = 8,
              candidates: Sequence[Candidate] | None = None, seed: int = 0,
              show_progress: bool = False) -> NFNResult:
    """Score every candidate module by NFN with one forward pass over the samples.

    Args:
        model: a causal LM (left untouched).
        encoded: tokenised samples; every non-padding token counts (PLoP uses inputs, no labels).
        seed: seeds the Gaussian baseline vectors.
    """
    import torch
    from tqdm.auto import tqdm

    if not encoded:
        raise ConfigError("the probe set is empty; fix: pass at least one sample")
    cands = list(candidates) if candidates is not None else find_candidates(model)
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sums = torch.zeros(len(cands), dtype=torch.float64)
    state: dict = {"tokens": 0}
    handles = []

    def make_hook(j: int, cand: Candidate):
        mod = modules[cand.name]

        def fwd(_m, inputs, output):
            z = inputs[0].detach()[state["keep"]].float()  # (tokens, d_in)
            w = mod.weight.detach().float()
            wt = w if cand.conv1d else w.T  # (d_in, d_out)
            num = (z @ wt).pow(2).sum(-1)
            g = torch.randn(z.shape, generator=gen).to(z.device)
            g = g * (z.norm(dim=-1, keepdim=True) / g.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            den = (g @ wt).pow(2).sum(-1).clamp_min(1e-30)
            sums[j] += (num / den).sum().double().cpu()
        return fwd

    for j, c in enumerate(cands):
        handles.append(modules[c.name].register_forward_hook(make_hook(j, c)))
    t0 = time.perf_counter()
    try:
        pad_id = getattr(model.config, "pad_token_id", None) or 0
        it = iter_batches(encoded, batch_size=batch_size, pad_id=pad_id, device=device)
        total = (len(encoded) + batch_size - 1) // batch_size
        with torch.no_grad():
            for _idx, batch in tqdm(it, total=total, desc="NFN probe", disable=not show_progress, unit="batch"):
                state["keep"] = batch["attention_mask"].bool()
                state["tokens"] += int(state["keep"].sum())
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    n_tok = state["tokens"]
    return NFNResult(candidates=cands, module_scores={c.name: float(sums[j] / n_tok) for j, c in enumerate(cands)},
                     n_tokens=n_tok, seconds=time.perf_counter() - t0)
