"""The `massive` placement strategy read from a `massive.json` document (what `probes.massive` writes): the
module its forward-only prediction names, with the evidence. Pure: placement reads it without the probes."""
from __future__ import annotations

from domlora.errors import ConfigError

DOC_KIND = "massive"
"""the `kind` of a massive.json document"""


def choose_from_doc(doc: dict | None, mods: dict[str, dict], probe: dict | None = None) -> tuple[list[str], dict]:
    """The `massive` placement strategy: read the module from a `massive.json` dict.

    Raises:
        ConfigError: no document, not a massive.json, or a module this model does not have.
    """
    if doc is None:
        if probe is not None and "signals" in probe and "activations" not in probe["signals"]:
            raise ConfigError("strategy `massive` needs the forward-only prediction, but this probe ran without the "
                              "activation statistics (`domlora probe --no-activations`); fix: rerun `domlora probe` "
                              "without --no-activations, or pass --activations FILE (a massive.json of the same "
                              "model)")
        raise ConfigError("strategy `massive` needs the forward-only prediction (massive.json, which `domlora probe` "
                          "writes unless --no-activations, as does `domlora diagnose`); fix: pass --activations "
                          "DIR/massive.json, or rerun `domlora probe` without --no-activations")
    if not isinstance(doc, dict) or doc.get("kind") != DOC_KIND or not doc.get("predicted"):
        raise ConfigError("the activations document is not a massive.json (no `kind: massive` / `predicted`); "
                          "fix: pass the massive.json written by `domlora diagnose`")
    name = doc["predicted"]
    if name not in mods:
        raise ConfigError(f"massive.json predicts {name}, which is not a module of this model (it was written for "
                          f"{doc.get('model')!r}); fix: run `domlora diagnose` on the same model as the probe")
    evidence = {"rule": doc.get("rule"), "layer": doc.get("layer"), "phenomenon": doc.get("phenomenon"),
                "fallback": doc.get("fallback"), "onset_layer": doc.get("onset_layer"),
                "alternatives": doc.get("alternatives", {}), "signal": doc.get("evidence", {})}
    if probe is not None and probe.get("dominant"):
        evidence["page_dominant"] = probe["dominant"]
        evidence["agrees_with_dom"] = probe["dominant"] == name
    return [name], evidence
