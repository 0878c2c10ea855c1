"""lm-eval bridge: the model (+ adapter) as an lm-eval `HFLM`, greedy decoding that drops finished rows,
one task through lm-eval, its results in eval.json's form."""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from domlora.errors import ConfigError
from domlora.samples import CHAT_TEMPLATE_ARGS

logger = logging.getLogger(__name__)


CPU_BATCH_SIZE = 32
"""what `batch_size="auto"` means on CPU (lm-eval's auto-detection probes with full-length
batches, far too slow on CPU); chosen by bench/eval.py on the 2-core reference machine"""



MAX_LENGTH = 4096
"""context cap handed to HFLM: long enough for every task here, small enough for auto batch sizing"""



BOOTSTRAP_ITERS = 1000



def resolve_batch_size(batch_size: int | str, device: str) -> int | str:
    """`auto` on CPU -> CPU_BATCH_SIZE; on GPU lm-eval's own detection; numbers as they are."""
    if isinstance(batch_size, str):
        if batch_size.startswith("auto"):
            return batch_size if device.startswith(("cuda", "xpu", "npu", "hpu", "mps")) else CPU_BATCH_SIZE
        return int(batch_size)
    return int(batch_size)



MATH_DEPS = "math-deps"
"""folder of the environment holding antlr4 4.11 + math-verify (scripts/install.sh), kept apart from DVC's 4.9"""


def math_path() -> None:
    """Put the MATH answer checker's own antlr4 4.11 first on this process's path (before lm-eval loads it).

    Raises:
        ConfigError: the folder is missing, or this process already imported another antlr4 (e.g. through
            DVC's hydra), which the checker cannot use.
    """
    import importlib
    import sys

    folder = Path(sys.prefix) / MATH_DEPS
    if not folder.is_dir():
        raise ConfigError(f"MATH's answer checker needs antlr4 4.11 and math-verify in {folder}; fix: "
                          "bash scripts/install.sh (it installs them there)")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
        importlib.invalidate_caches()
    loaded = sys.modules.get("antlr4")
    if loaded is not None and not str(getattr(loaded, "__file__", "")).startswith(str(folder)):
        raise ConfigError("MATH's answer checker needs antlr4 4.11 but this process already imported another "
                          "antlr4 (DVC's hydra uses 4.9); fix: evaluate in a process of its own (the evaluate "
                          "stage and `domlora evaluate` do)")


_GREEDY_KEYS = {"attention_mask", "do_sample", "temperature", "top_p", "top_k"}



def greedy_generate(model, input_ids, attention_mask, *, max_new_tokens: int, stop: Sequence[str] = (),
                    tokenizer=None, eos_token_ids: Sequence[int] = (), pad_token_id: int = 0):
    """Greedy decoding that drops each row from the batch as soon as it is finished.

    `model.generate` keeps computing finished rows until the longest one ends; on a CPU a decode
    step costs roughly a fixed part plus a part per row, so with answers of uneven length most of
    a batch's work goes to rows that are already done. Here a row leaves the batch (and the KV
    cache) when it emits an EOS id or a `stop` string appears in its last tokens (lm-eval's rule).
    The tokens are what `generate(do_sample=False)` gives; the output has generate's layout:
    [batch, prompt + max_new_tokens], padded with `pad_token_id` after each row's end.
    """
    import torch
    from transformers import DynamicCache

    b, t = input_ids.shape
    out = torch.full((b, t + max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    out[:, :t] = input_ids
    mask = attention_mask.to(input_ids.device).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    eos = torch.tensor(sorted(set(eos_token_ids)), dtype=torch.long, device=input_ids.device)
    stops = [s for s in stop if s] if tokenizer else []
    # tokens to decode so the longest stop string fits in the tail (+2 for merges at its edges)
    lookback = max((len(tokenizer.encode(s, add_special_tokens=False)) + 2 for s in stops), default=0)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1, :]
        active = torch.arange(b, device=input_ids.device)
        next_pos = pos[:, -1] + 1
        for step in range(max_new_tokens):
            tok = logits.argmax(-1)
            out[active, t + step] = tok
            done = torch.isin(tok, eos) if eos.numel() else torch.zeros_like(tok, dtype=torch.bool)
            if stops:
                for j, row in enumerate(active.tolist()):
                    if done[j]:
                        continue
                    tail = tokenizer.decode(out[row, max(t, t + step + 1 - lookback):t + step + 1].tolist())
                    if any(s in tail for s in stops):
                        done[j] = True
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                active, tok, mask, next_pos = active[keep], tok[keep], mask[keep], next_pos[keep]
                cache.batch_select_indices(keep)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            logits = model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                           past_key_values=cache, use_cache=True).logits[:, -1, :]
            next_pos = next_pos + 1
    return out



def make_lm(loaded, *, batch_size: int | str, show_progress: bool):
    from lm_eval.models.huggingface import HFLM

    class _HFLM(HFLM):
        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            # greedy requests (all of ours) go through the shrinking-batch loop; anything else to HF
            greedy = (set(generation_kwargs) <= _GREEDY_KEYS and not generation_kwargs.get("do_sample")
                      and not generation_kwargs.get("temperature"))
            if self.backend != "causal" or not greedy:
                return super()._model_generate(context, max_length, stop, **generation_kwargs)
            eos = self.model.generation_config.eos_token_id if getattr(self.model, "generation_config", None) else None
            eos = [eos] if isinstance(eos, int) else list(eos or [])
            if self.tokenizer.eos_token_id is not None:
                eos.append(self.tokenizer.eos_token_id)
            mask = generation_kwargs.get("attention_mask")
            return greedy_generate(self.model, context, context.new_ones(context.shape) if mask is None else mask,
                                   max_new_tokens=max_length - context.shape[1], stop=stop, tokenizer=self.tokenizer,
                                   eos_token_ids=eos, pad_token_id=self.tokenizer.pad_token_id or 0)

        # lm-eval shows a tqdm bar per request type; follow show_progress instead
        def generate_until(self, requests, disable_tqdm: bool = False):
            return super().generate_until(requests, disable_tqdm=disable_tqdm or not show_progress)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not show_progress)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not show_progress)

    cfg = loaded.model.config
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return _HFLM(pretrained=loaded.model, tokenizer=loaded.tokenizer, batch_size=batch_size, max_batch_size=64,
                 max_length=min(int(max_pos), MAX_LENGTH),
                 # the switches training and the probe render with (Qwen3-style templates: no thinking)
                 chat_template_args=dict(CHAT_TEMPLATE_ARGS))



def run_lm_eval(lm, task_manager, task: str, *, limit: int | None, chat_template: bool, gen_kwargs: dict,
                allow_unsafe_code: bool, seed: int = 1234, log_samples: bool = False) -> dict:
    """One task or group through `lm_eval.evaluator.evaluate`, set up as `simple_evaluate` does it.

    (`simple_evaluate` also gathers environment information by running `collect_env`
    subprocesses, ~10 s per call on a busy 2-core machine; eval.json keeps its own `run_info`.)
    """
    import random

    import numpy as np
    import torch
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    random.seed(0)
    np.random.seed(seed)
    torch.manual_seed(seed)
    loaded = task_manager.load([task])
    for obj in loaded["tasks"].values():
        if obj.get_config("output_type") == "generate_until" and gen_kwargs:
            obj.set_config(key="generation_kwargs", value=dict(gen_kwargs), update=True)
        if obj.get_config("num_fewshot") is None:
            obj.set_config(key="num_fewshot", value=0)
        obj.set_fewshot_seed(seed=seed)
    return lm_eval_evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=BOOTSTRAP_ITERS, log_samples=log_samples,
                            apply_chat_template=chat_template, fewshot_as_multiturn=chat_template,
                            confirm_run_unsafe_code=allow_unsafe_code)



def _metric_name(metric: str, filt: str, single_filter: bool) -> str:
    if filt == "none" or single_filter:
        return metric
    return f"{metric}_{filt}".replace("-", "_")



def _stderr(v) -> float | None:
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None



def _leaf_n(res: dict, name: str) -> int:
    subs = res.get("group_subtasks", {}).get(name)
    if subs:
        return sum(_leaf_n(res, s) for s in subs)
    ns = res.get("n-samples", {}).get(name, {})
    return int(ns.get("effective", ns.get("original", 0)) or 0)



def _metrics_of(entry: dict, n: int) -> dict[str, dict]:
    """lm-eval's {"acc,none": v, "acc_stderr,none": s, ...} -> {"acc": {value, stderr, n}}."""
    pairs = [k.split(",", 1) for k in entry if "," in k]
    by_metric: dict[str, set] = {}
    for m, f in pairs:
        if not m.endswith("_stderr"):
            by_metric.setdefault(m, set()).add(f)
    out = {}
    for m, filters in by_metric.items():
        for f in sorted(filters):
            v = entry.get(f"{m},{f}")
            if not isinstance(v, (int, float)):
                continue
            out[_metric_name(m, f, len(filters) == 1)] = {"value": float(v),
                                                          "stderr": _stderr(entry.get(f"{m}_stderr,{f}")), "n": n}
    return out



def summarize_lm_eval(res: dict, name: str) -> dict:
    """The part of one lm-eval result that eval.json keeps for task/group `name`."""
    entry = (res.get("groups") or {}).get(name) or res["results"].get(name) or {}
    n = _leaf_n(res, name)
    out: dict[str, Any] = {"n": n, "metrics": _metrics_of(entry, n)}
    subs = res.get("group_subtasks", {}).get(name)
    if subs:
        leaves = {}
        for s in subs:
            e = res["results"].get(s, {})
            leaves[s] = {k: v["value"] for k, v in _metrics_of(e, _leaf_n(res, s)).items()}
        out["subtasks"] = leaves
    shots = res.get("n-shot", {})
    if name in shots:
        out["num_fewshot"] = shots[name]
    if name in res.get("versions", {}):
        out["version"] = res["versions"][name]
    return out



@contextlib.contextmanager
def torch_threads(n: int | None):
    import torch

    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n is not None:
            torch.set_num_threads(prev)
