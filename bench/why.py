"""Why does one module dominate? Massive activations vs PAGE on the embedded model, side by side.

Per probe set (the embedded profile's arith, humaneval and strings probe splits): the forward-only
`massive` prediction against PAGE's `dom`, the share of the `dom` module's S that flows through
the first (sink) token, the effective rank of its per-sample gradients, predictor time vs PAGE
time (measured in the same run), and the bootstrap stability of `dom` and of the argmax; then
task stability across the probe sets, and optionally PAGE across full fine-tuning checkpoints.

Run as: nice -n 10 .venv/bin/python bench/why.py                     # ~1 h on 2 busy shared cores
        nice -n 10 .venv/bin/python bench/why.py --samples 8 --tasks arith   # a quick look
        nice -n 10 .venv/bin/python bench/why.py --checkpoints --ft-steps 12 # + Figure 2 on a short run
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

# profile sizes used when params.yaml cannot be read (the embedded profile's probe splits)
FALLBACK = {"seed": 1234, "arith": (384, 32, 60), "humaneval": (92, 32, 40), "strings": (256, 32, 40)}


def _profile_sizes(params: Path) -> tuple[int, dict[str, tuple[int, int, int]]]:
    try:
        from domlora.pipeline.params import load_params

        p = load_params(params, profile="embedded")
        return p.seed_data, {k: (d.n_train, d.n_probe, d.n_eval) for k, d in p.datasets.items()}
    except Exception as exc:  # noqa: BLE001 - a bench falls back, the library would not
        logging.warning("cannot read %s (%s); using built-in sizes", params, exc)
        return FALLBACK["seed"], {k: v for k, v in FALLBACK.items() if k != "seed"}


def _prepare(task: str, out: Path, seed: int, sizes: dict) -> Path:
    from domlora.data import prepare_dataset

    n_train, n_probe, n_eval = sizes[task]
    prepare_dataset(task, out / "data" / task, n_train=n_train, n_probe=n_probe, n_eval=n_eval, seed=seed)
    return out / "data" / task


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _short(name: str | None) -> str:
    if not name:
        return "-"
    parts = name.split(".")
    return f"L{parts[2]}.{parts[-1]}" if len(parts) > 3 and parts[2].isdigit() else name


def _table(rows: list[list], header: list[str]) -> str:
    cols = list(zip(*([header] + [[_fmt(c) for c in r] for r in rows])))
    widths = [max(len(str(c)) for c in col) for col in cols]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                     + [line([_fmt(c) for c in r]) for r in rows])


def _timed(fn):
    """(result, wall seconds, CPU seconds of this process): CPU time is what to compare on a shared machine."""
    t, c = time.perf_counter(), time.process_time()
    r = fn()
    return r, time.perf_counter() - t, time.process_time() - c


def run_task(model, tok, task: str, probe_file: Path, args, out: Path) -> dict:
    name = args.model
    import torch

    from domlora.studies.decompose import page_decompose
    from domlora.probes.summary import plot_activations
    from domlora.probes.massive import massive_predict, massive_summary
    from domlora.probes.page import page_probe
    from domlora.samples import encode_samples, read_samples
    from domlora.studies.stability import bootstrap_choice, spearman
    from domlora.probes.summary import page_summary

    enc, _ = encode_samples(tok, read_samples(probe_file, limit=args.samples), max_length=args.max_length)
    torch.manual_seed(0)
    (pred, report), t_massive, c_massive = _timed(lambda: massive_predict(model, enc, batch_size=args.batch_size))
    (pred_few, _), t_few, c_few = _timed(lambda: massive_predict(model, enc[: args.few], batch_size=args.batch_size))
    res, t_page, c_page = _timed(lambda: page_probe(model, enc, batch_size=args.batch_size))
    page = page_summary(res, model=name)
    dec, t_dec, c_dec = _timed(lambda: page_decompose(model, enc, sink="first", batch_size=args.batch_size,
                                                      rank_types=("down_proj", "v_proj")))
    ddoc = dec.to_dict(model=name)
    boot = bootstrap_choice(res, n_boot=args.n_boot, seed=0)
    boot_rest = bootstrap_choice(dec.page_result("rest"), n_boot=args.n_boot, seed=0)
    dom, argmax = page["dominant"], page["argmax"]
    table = ddoc["modules"]
    s_check = max(abs(table[n]["S"] - res.S[n]) / max(res.S[n], 1e-30) for n in res.S)
    mdoc = massive_summary(pred, report, model=name) | {"page_dominant": dom, "agrees_with_dom": pred.module == dom}
    task_dir = out / task
    task_dir.mkdir(parents=True, exist_ok=True)
    plot_activations(report.to_dict(), task_dir / "activations.png", page=page, massive=mdoc,
                     title=f"{name} / {task}: massive activations vs down_proj PAGE (N={len(enc)})")
    (task_dir / "page.json").write_text(json.dumps(page, indent=1))
    (task_dir / "massive.json").write_text(json.dumps(mdoc, indent=1))
    (task_dir / "decompose.json").write_text(json.dumps(ddoc, indent=1))
    (task_dir / "activations.json").write_text(json.dumps(report.to_dict(), indent=1))
    # does the down_proj PAGE curve follow the down_proj input peaks? (rank correlation over layers)
    curve = {m["layer"]: m["PAGE"] for m in page["modules"].values() if m["type"] == "down_proj"}
    layers = sorted(curve)
    rho_in = spearman([curve[k] for k in layers], [report.down_proj_at(k).input_median_max for k in layers])
    rho_sink = spearman([curve[k] for k in layers], [report.down_proj_at(k).first_token_energy for k in layers])
    onset = report.onset_layer
    onset_stats = next((s for s in report.layers if s.layer == onset), None)
    sw = report.down_proj_at(pred.layer).super_weight
    return {
        "task": task, "n": len(enc), "tokens": report.n_tokens,
        "dom": dom, "dom_share_type": page.get("dominant_share_type"), "dom_share_total": page.get("dominant_share_total"),
        "argmax": argmax,
        "massive": pred.module, "massive_agrees": pred.module == dom,
        "rules": {r: {"module": m, "agrees": m == dom} for r, m in pred.alternatives.items()},
        "massive_few": pred_few.module, "few": len(enc[: args.few]),
        "onset_layer": onset, "phenomenon": pred.phenomenon,
        "onset_first_token_fraction": onset_stats.first_token_fraction if onset_stats else None,
        "onset_jump": onset_stats.jump if onset_stats else None,
        "onset_max": onset_stats.peak.magnitude if onset_stats else None,
        "super_weight": {"row": sw.row, "col": sw.col, "weight": sw.weight, "share": sw.share, "z": sw.weight_z}
        if sw else None,
        "dom_sink_share": table[dom]["sink_share"], "dom_rest_share": table[dom]["rest_share"],
        "dom_input_energy_sink": table[dom]["input_energy_sink"], "dom_top_sv_share": table[dom]["top_sv_share"],
        "dom_effective_rank": table[dom]["effective_rank"],
        "argmax_sink_share": table[argmax]["sink_share"], "argmax_top_sv_share": table[argmax]["top_sv_share"],
        "median_down_proj_sink_share": _median([m["sink_share"] for n, m in table.items()
                                                if m["type"] == "down_proj" and n != dom]),
        "rho_page_input_max": rho_in, "rho_page_first_token_energy": rho_sink,
        "dom_without_sink": ddoc["without_sink"]["dominant"], "argmax_without_sink": ddoc["without_sink"]["argmax"],
        "t_massive": t_massive, "t_massive_few": t_few, "t_page": t_page, "t_decompose": t_dec,
        "cpu_massive": c_massive, "cpu_massive_few": c_few, "cpu_page": c_page, "cpu_decompose": c_dec,
        "boot_dom": boot.dom_stability, "boot_argmax": boot.argmax_stability, "boot_dom_share_ci": boot.dom_share_ci,
        "boot_argmax_counts": dict(list(boot.argmax_counts.items())[:3]),
        "boot_dom_without_sink": boot_rest.dom_stability, "boot_argmax_without_sink": boot_rest.argmax_stability,
        "S_check_max_rel_diff": s_check,
        "page_doc": page,
    }


def _median(xs):
    xs = sorted(x for x in xs if x is not None and not math.isnan(x))
    return xs[len(xs) // 2] if xs else float("nan")


def run_checkpoints(args, out: Path, seed: int, sizes: dict) -> dict:
    from domlora.studies.checkpoints import finetune_checkpoints, plot_checkpoint_curves, probe_checkpoints

    data = out / "data" / "arith"
    if not (data / "train.jsonl").is_file():
        _prepare("arith", out, seed, sizes)
    ck = out / "ckpt"
    steps = args.ft_steps
    save = sorted({0, 1, max(1, steps // 2), steps})
    t0 = time.perf_counter()
    man = finetune_checkpoints(model=args.model, train_data=data / "train.jsonl", out_dir=ck, steps=steps,
                               save_steps=save, lr=args.ft_lr, batch_size=4, max_length=160, warmup_ratio=0.0)
    t_ft = time.perf_counter() - t0
    t0 = time.perf_counter()
    doc = probe_checkpoints([c["path"] for c in man["checkpoints"]], data=data / "probe.jsonl",
                            samples=args.ckpt_samples, max_length=args.max_length, batch_size=args.batch_size,
                            massive=True)
    t_probe = time.perf_counter() - t0
    plot_checkpoint_curves(doc, out / "checkpoints.png",
                           title=f"embedded, full fine-tuning on arith (lr {args.ft_lr}): PAGE per type across steps")
    (out / "checkpoints.json").write_text(json.dumps(doc, indent=1))
    if not args.keep_checkpoints:
        for c in man["checkpoints"]:
            shutil.rmtree(c["path"], ignore_errors=True)
    return {"steps": save, "loss": man["loss"], "t_finetune": t_ft, "t_probe": t_probe, "doc": doc}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded", help="`embedded` (SmolLM2-135M) or `embedded-gemma` (Gemma-3-270M)")
    ap.add_argument("--tasks", default="arith,humaneval,strings", help="comma list of probe sets")
    ap.add_argument("--samples", type=int, default=32, help="probe samples per task (paper: 32)")
    ap.add_argument("--few", type=int, default=4, help="samples for the few-sample massive prediction")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per sample (embedded profile: 256)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--checkpoints", action="store_true", help="also fine-tune and probe checkpoints (slow)")
    ap.add_argument("--ft-steps", type=int, default=12, help="full fine-tuning steps (batch 4)")
    ap.add_argument("--ft-lr", type=float, default=1e-4, help="full fine-tuning peak lr")
    ap.add_argument("--ckpt-samples", type=int, default=8, help="probe samples per checkpoint")
    ap.add_argument("--keep-checkpoints", action="store_true", help="keep the ~0.5 GB step folders")
    ap.add_argument("--params", default="params.yaml", help="where the embedded profile's split sizes come from")
    ap.add_argument("--out", default="scratch/why", help="output folder (plots, JSON)")
    ap.add_argument("--reuse", action="store_true", help="reuse tasks already measured in --out (their row.json); "
                    "lets tasks run as separate processes and one last call print every table")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    import torch

    from domlora.models import config_hash, load_model
    from domlora.studies.stability import compare_probes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    seed, sizes = _profile_sizes(Path(args.params))
    tasks = [t for t in args.tasks.split(",") if t]
    t_start = time.perf_counter()
    lm = load_model(args.model, dtype="float32", device="cpu")
    print(f"# {args.model} = {type(lm.model).__name__} ({lm.model.config.num_hidden_layers} layers, config "
          f"{config_hash(lm.model)}), torch threads {torch.get_num_threads()}, N={args.samples}, "
          f"max_length={args.max_length}\n")
    rows = []
    for task in tasks:
        saved = out / task / "row.json"
        if args.reuse and saved.is_file():
            rows.append(json.loads(saved.read_text()))
            continue
        d = _prepare(task, out, seed, sizes)
        rows.append(run_task(lm.model, lm.tokenizer, task, d / "probe.jsonl", args, out))
        saved.write_text(json.dumps(rows[-1], default=str))
        gc.collect()

    if rows:
        _print_tasks(rows, args)
    stab = None
    if len(rows) >= 2:
        stab = compare_probes({r["task"]: r["page_doc"] for r in rows}, k=5)
        print("\n## Task stability across probe sets (one backbone)\n")
        print(_table([[f"{p.a} vs {p.b}", "yes" if p.dom_agree else "NO", "yes" if p.argmax_agree else "no",
                       p.spearman, p.spearman_down_proj, p.topk_overlap] for p in stab.pairs],
                     ["pair", "dom agrees", "argmax agrees", "Spearman (all modules)", "Spearman (down_proj)",
                      "top-5 overlap"]))
    ck = None
    if args.checkpoints:
        ck = run_checkpoints(args, out, seed, sizes)
        print(f"\n## PAGE across full fine-tuning checkpoints (arith, lr {args.ft_lr}, batch 4, "
              f"N={args.ckpt_samples})\n")
        loss = ck["loss"]
        print(_table([[r["label"], _short(r["dominant"]), r["dominant_share_type"], _short(r["argmax"]),
                       _short(r["massive"]), "yes" if r["massive_agrees"] else "NO",
                       loss[r["step"] - 1] if r["step"] else "-"] for r in ck["doc"]["checkpoints"]],
                     ["checkpoint", "dom", "dom share of down_proj", "argmax", "massive pick", "agrees",
                      "train loss at step"]))
        print(f"\nfine-tuning {ck['t_finetune']:.0f} s, probing {ck['t_probe']:.0f} s; plot {out / 'checkpoints.png'}")
    if rows:
        print(f"\nS from the decomposition vs page_probe: max relative difference "
              f"{max(r['S_check_max_rel_diff'] for r in rows):.1e}")
    print(f"total {time.perf_counter() - t_start:.0f} s; plots and JSON in {out}/")
    summary = {"args": vars(args), "rows": [{k: v for k, v in r.items() if k != "page_doc"} for r in rows],
               "stability": stab.to_dict() if stab else None,
               "checkpoints": {k: v for k, v in ck.items() if k != "doc"} | {"dominants": ck["doc"]["dominants"]}
               if ck else None}
    (out / ("why.json" if rows else "why_checkpoints.json")).write_text(json.dumps(summary, indent=1, default=str))
    return 0


def _print_tasks(rows: list[dict], args) -> None:
    print("## Forward-only prediction vs PAGE dom (massive = down_proj at the massive-activation onset)\n")
    print(_table([[r["task"], r["n"], _short(r["dom"]), r["dom_share_type"], _short(r["argmax"]),
                   _short(r["massive"]), "yes" if r["massive_agrees"] else "NO",
                   "/".join("y" if v["agrees"] else "n" for v in r["rules"].values()),
                   f"{_short(r['massive_few'])} (N={r['few']})", r["onset_layer"], r["onset_first_token_fraction"]]
                  for r in rows],
                 ["task", "N", "PAGE dom", "dom share of down_proj", "PAGE argmax", "massive pick", "agrees",
                  "onset/jump/output agree", "massive pick, few", "onset layer", "onset on token 0"]))
    print("\n## Cost (CPU seconds of this process, wall seconds in brackets; same run, same samples)\n")
    w = lambda c, t: f"{c:.1f} ({t:.0f})"  # noqa: E731
    print(_table([[r["task"], w(r["cpu_massive"], r["t_massive"]), w(r["cpu_massive_few"], r["t_massive_few"]),
                   w(r["cpu_page"], r["t_page"]), r["cpu_page"] / r["cpu_massive"],
                   r["cpu_page"] / r["cpu_massive_few"], w(r["cpu_decompose"], r["t_decompose"])] for r in rows],
                 ["task", "massive (N)", "massive (few)", "PAGE (N)", "PAGE / massive (N)", "PAGE / massive (few)",
                  "decomposition (N)"]))
    print("\n## Where the dom module's S comes from (sink = position 0)\n")
    print(_table([[r["task"], _short(r["dom"]), r["dom_sink_share"], r["dom_rest_share"], r["dom_input_energy_sink"],
                   r["median_down_proj_sink_share"], r["dom_top_sv_share"], r["dom_effective_rank"],
                   _short(r["dom_without_sink"]), _short(r["argmax"]), r["argmax_sink_share"],
                   r["argmax_top_sv_share"], _short(r["argmax_without_sink"])] for r in rows],
                 ["task", "dom", "S share via sink", "S share via rest", "input energy on sink",
                  "other down_proj sink share (median)", "dom top-sv share", "dom eff. rank", "dom w/o sink",
                  "argmax", "argmax sink share", "argmax top-sv share", "argmax w/o sink"]))
    print("\nSpearman over layers of down_proj PAGE vs that down_proj's max |input| (median over samples) and vs "
          "its input energy share on token 0:")
    print(_table([[r["task"], r["rho_page_input_max"], r["rho_page_first_token_energy"]] for r in rows],
                 ["task", "rho(PAGE, max |x|)", "rho(PAGE, token-0 energy)"]))
    print(f"\n## Bootstrap over probe samples ({args.n_boot} resamples)\n")
    print(_table([[r["task"], _short(r["dom"]), r["boot_dom"], f"[{r['boot_dom_share_ci'][0]:.3f}, "
                   f"{r['boot_dom_share_ci'][1]:.3f}]", _short(r["argmax"]), r["boot_argmax"],
                   ", ".join(f"{_short(k)}:{v}" for k, v in r["boot_argmax_counts"].items()),
                   r["boot_dom_without_sink"], r["boot_argmax_without_sink"]] for r in rows],
                 ["task", "dom", "dom stability", "dom share 95% CI", "argmax", "argmax stability",
                  "argmax winners", "dom stab. w/o sink", "argmax stab. w/o sink"]))


if __name__ == "__main__":
    sys.exit(main())
