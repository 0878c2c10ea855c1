"""Turn probe results into the `page.json` / `nfn.json` schema and the layer x type heatmap."""
from __future__ import annotations

import math
from pathlib import Path

from domlora.io import save_figure
from domlora.modules import TYPES, num_layers, types_present
from domlora.placement import dominant_module
from domlora.probes.nfn import NFNResult
from domlora.probes.page import PageResult


def page_summary(result: PageResult, *, model: str, top_k: int = 10) -> dict:
    """The `page.json` document: per-module S, PAGE and shares, the `dom` module and the argmax."""
    page = result.page
    total = sum(page.values()) or 1.0
    by_type: dict[str, float] = {}
    for c in result.candidates:
        by_type[c.type] = by_type.get(c.type, 0.0) + page[c.name]
    modules = {
        c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out, "S": result.S[c.name],
                 "PAGE": page[c.name], "share_total": page[c.name] / total,
                 "share_type": page[c.name] / (by_type[c.type] or 1.0)}
        for c in result.candidates
    }
    ranked = sorted(modules, key=lambda n: -modules[n]["PAGE"])
    has_down = any(m["type"] == "down_proj" for m in modules.values())
    dom = dominant_module(modules) if has_down else None
    doc = {
        "model": model,
        "alpha": result.alpha,
        "rank": result.rank,
        "n_samples": result.n_samples,
        "dominant": dom,
        "argmax": ranked[0],
        "argmax_differs": dom is not None and ranked[0] != dom,
        "n_layers": num_layers(result.candidates),
        "top_k": [{"name": n, "PAGE": modules[n]["PAGE"], "share_total": modules[n]["share_total"]} for n in ranked[:top_k]],
        "type_share": {t: by_type[t] / total for t in types_present(result.candidates)},
        "seconds": result.seconds,
        "methods": result.methods,
        "modules": modules,
    }
    if dom:
        doc["dominant_share_total"] = modules[dom]["share_total"]
        doc["dominant_share_type"] = modules[dom]["share_type"]
    if result.encode_report is not None:
        doc["samples"] = result.encode_report.to_dict()
    return doc


def nfn_summary(result: NFNResult, *, model: str) -> dict:
    modules = {c.name: {"type": c.type, "layer": c.layer, "d_in": c.d_in, "d_out": c.d_out,
                        "NFN": result.module_scores[c.name]} for c in result.candidates}
    ts = result.type_scores
    return {"model": model, "n_tokens": result.n_tokens, "seconds": result.seconds,
            "type_scores": ts, "type_ranking_low_to_high": sorted(ts, key=ts.get), "modules": modules}


def layer_type_matrix(doc: dict, key: str = "PAGE"):
    """Rows: types present; columns: layers; NaN where a type has no module in a layer."""
    mods = doc["modules"]
    types = [t for t in TYPES if any(m["type"] == t for m in mods.values())]
    n_layers = max(m["layer"] for m in mods.values()) + 1
    grid = [[math.nan] * n_layers for _ in types]
    for m in mods.values():
        row = types.index(m["type"])
        v = m[key]
        grid[row][m["layer"]] = v if math.isnan(grid[row][m["layer"]]) else grid[row][m["layer"]] + v
    return types, grid


def plot_page_heatmap(doc: dict, path: str | Path, *, title: str | None = None) -> Path:
    """Layer x type heatmap of PAGE (log colour), dominant module boxed, argmax starred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm
    from matplotlib.patches import Rectangle

    types, grid = layer_type_matrix(doc)
    arr = np.array(grid, dtype=float)
    pos = arr[np.isfinite(arr) & (arr > 0)]
    vmin, vmax = (pos.min(), pos.max()) if pos.size else (1e-12, 1.0)
    fig, ax = plt.subplots(figsize=(max(6, 0.32 * arr.shape[1] + 2), 0.45 * len(types) + 1.6))
    im = ax.imshow(np.where(arr > 0, arr, np.nan), aspect="auto", cmap="viridis",
                   norm=LogNorm(vmin=vmin, vmax=max(vmax, vmin * 1.0001)))
    ax.set_yticks(range(len(types)), types)
    ax.set_xticks(range(arr.shape[1]), [str(i) for i in range(arr.shape[1])], fontsize=7)
    ax.set_xlabel("layer")
    mods = doc["modules"]
    for name, marker in ((doc.get("dominant"), "box"), (doc.get("argmax"), "star")):
        if name and name in mods:
            r, c = types.index(mods[name]["type"]), mods[name]["layer"]
            if marker == "box":
                ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="red", lw=2))
            else:
                ax.plot(c, r, marker="*", color="white", ms=10, mec="black")
    fig.colorbar(im, ax=ax, label="PAGE (log)")
    dom = doc.get("dominant")
    model = str(doc.get("model"))
    model = model if len(model) <= 48 else "..." + model[-45:]

    def short(name):
        return f"L{mods[name]['layer']} {mods[name]['type']}" if name in mods else str(name)

    ttl = title or (f"PAGE of {model} (N={doc.get('n_samples')})\n"
                    f"box: dom = {short(dom)}; star: argmax = {short(doc.get('argmax'))}")
    ax.set_title(ttl, fontsize=9)
    fig.tight_layout()

    return save_figure(fig, path)


def page_layer_curve(page_doc: dict, module_type: str = "down_proj") -> dict[int, float]:
    """layer -> PAGE of the `module_type` module there, from a `page.json` dict."""
    mods = page_doc.get("modules") or {}
    return {m["layer"]: m["PAGE"] for m in mods.values() if m.get("type") == module_type}


def plot_activations(report: dict, path: str | Path, *, page: dict | None = None, massive: dict | None = None,
                     title: str | None = None) -> Path:
    """Max |activation| per layer (residual stream and down_proj input), beside the down_proj PAGE curve.

    Args:
        report: `ActivationReport.to_dict()` (the `activations.json` dict).
        path: PNG to write (atomically).
        page: a `page.json` dict; adds the lower panel with its `down_proj` PAGE per layer.
        massive: a `massive.json` dict; marks the predicted module.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [s["layer"] for s in report["layers"]]
    resid = [s["max"] for s in report["layers"]]
    med = [s["median"] for s in report["layers"]]
    din = {d["layer"]: d["input_max"] for d in report["down_proj"]}
    dout = {d["layer"]: d["output_max"] for d in report["down_proj"]}
    rows = 2 if page else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(7, 0.28 * len(layers) + 3), 3.2 * rows), sharex=True,
                             squeeze=False)
    ax = axes[0][0]
    ax.semilogy(layers, resid, "o-", label="residual stream max |h| (after block)", color="C0")
    ax.semilogy(layers, med, ":", label="residual stream median |h|", color="C0", alpha=0.6)
    ax.semilogy(sorted(din), [din[k] for k in sorted(din)], "s-", ms=3, label="down_proj input max |x|", color="C1")
    ax.semilogy(sorted(dout), [dout[k] for k in sorted(dout)], "^-", ms=3, label="down_proj output max |y|",
                color="C2", alpha=0.7)
    onset = report.get("onset_layer")
    if onset is not None:
        ax.axvline(onset, color="red", ls="--", lw=1, label=f"massive onset (layer {onset})")
    ax.set_ylabel("max |activation|")
    ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    if page:
        curve = page_layer_curve(page)
        ax2 = axes[1][0]
        ks = sorted(curve)
        ax2.semilogy(ks, [curve[k] for k in ks], "o-", color="C3", label="down_proj PAGE")
        dom = page.get("dominant")
        if dom and dom in page.get("modules", {}):
            dl = page["modules"][dom]["layer"]
            ax2.plot([dl], [curve[dl]], marker="s", ms=11, mfc="none", mec="red", mew=2, ls="",
                     label=f"dom ({dom})")
        if massive and massive.get("layer") in curve:
            ml = massive["layer"]
            ax2.plot([ml], [curve[ml]], marker="*", ms=12, color="gold", mec="black", ls="",
                     label=f"massive pick (layer {ml})")
        ax2.set_ylabel("PAGE")
        ax2.legend(fontsize=7, loc="best")
        ax2.grid(alpha=0.3)
    axes[-1][0].set_xlabel("layer")
    axes[0][0].set_title(title or f"massive activations vs down_proj PAGE (N={report.get('n_samples')})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
