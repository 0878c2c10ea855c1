"""PAGE across checkpoints: a full fine-tuning run that saves steps, probing them, adapters merged in, plots."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import chat_samples, make_tiny_llama

from domlora.studies.checkpoints import (finetune_checkpoints, is_adapter_dir, layer_curves, load_checkpoint,
                                 plot_checkpoint_curves, probe_checkpoints, step_of)
from domlora.errors import ConfigError, ModelError
from domlora.models import LoadedModel


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(s) + "\n" for s in chat_samples(8)))
    return p


@pytest.fixture
def run(tiny_model, tiny_tokenizer, data, tmp_path):
    base = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    man = finetune_checkpoints(model=LoadedModel(tiny_model, tiny_tokenizer, "tiny", ""), train_data=data,
                               out_dir=tmp_path / "ck", steps=3, save_steps=(0, 1, 3), lr=5e-3, batch_size=2,
                               max_length=64, warmup_ratio=0.0)
    return man, base


def _state(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


class TestFinetune:
    def test_saves_requested_steps(self, run, tmp_path):
        man, base = run
        assert [c["step"] for c in man["checkpoints"]] == [0, 1, 3]
        out = tmp_path / "ck"
        assert {p.name for p in out.iterdir()} == {"step-0000", "step-0001", "step-0003", "checkpoints.json", "train"}
        assert json.loads((out / "checkpoints.json").read_text())["checkpoints"] == man["checkpoints"]
        assert len(man["loss"]) == 3
        s0, s1, s3 = (_state(out / f"step-{k:04d}") for k in (0, 1, 3))
        for k in s0:
            assert torch.equal(s0[k], base[k])  # step 0 is the untouched base
        # every parameter trained, embeddings and norms included
        for key in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.mlp.down_proj.weight"):
            assert not torch.equal(s1[key], s0[key]) and not torch.equal(s3[key], s1[key])
        assert man["trainable_params"] == sum(v.numel() for v in base.values())

    def test_bad_steps(self, tiny_model, tiny_tokenizer, data, tmp_path):
        lm = LoadedModel(tiny_model, tiny_tokenizer, "tiny", "")
        with pytest.raises(ConfigError):
            finetune_checkpoints(model=lm, train_data=data, out_dir=tmp_path, steps=0)
        with pytest.raises(ConfigError, match="save_steps"):
            finetune_checkpoints(model=lm, train_data=data, out_dir=tmp_path, steps=2, save_steps=(0, 5))


class TestProbe:
    def test_curves_per_checkpoint(self, run, data, tmp_path):
        man, _ = run
        paths = [c["path"] for c in man["checkpoints"]]
        doc = probe_checkpoints(paths, data=data, samples=4, max_length=64, massive=True)
        assert all(r["massive"].endswith("down_proj") and r["massive_agrees"] == (r["massive"] == r["dominant"])
                   for r in doc["checkpoints"])
        assert [r["label"] for r in doc["checkpoints"]] == ["step 0", "step 1", "step 3"]
        assert [r["step"] for r in doc["checkpoints"]] == [0, 1, 3]
        for r in doc["checkpoints"]:
            assert set(r["curves"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
            assert all(len(v) == 3 for v in r["curves"].values())
            assert r["dominant"].endswith("down_proj")
        assert doc["dominant_stable"] == (len(set(doc["dominants"])) == 1)
        c0, c3 = doc["checkpoints"][0]["curves"], doc["checkpoints"][2]["curves"]
        assert c0["down_proj"] != c3["down_proj"]  # training changed the gradients
        png = plot_checkpoint_curves(doc, tmp_path / "fig.png")
        assert png.read_bytes()[:4] == b"\x89PNG"
        json.dumps(doc)

    def test_auto_batch_size(self, run, data):
        """`auto` (the paper profile's probe batch size) is planned from free memory, as the probe stage plans
        it, and gives the curves a fixed batch size gives."""
        man, _ = run
        paths = [c["path"] for c in man["checkpoints"]][:2]
        auto = probe_checkpoints(paths, data=data, samples=4, max_length=64, batch_size="auto")
        fixed = probe_checkpoints(paths, data=data, samples=4, max_length=64, batch_size=1)
        assert auto["dominants"] == fixed["dominants"]
        for ra, rf in zip(auto["checkpoints"], fixed["checkpoints"]):
            assert ra["curves"]["down_proj"] == pytest.approx(rf["curves"]["down_proj"], rel=1e-4)
        for bad in (0, "big", True):
            with pytest.raises(ConfigError, match="batch_size"):
                probe_checkpoints(paths, data=data, samples=4, max_length=64, batch_size=bad)

    def test_adapter_checkpoint_is_merged(self, tiny_model, tiny_tokenizer, data, tmp_path):
        from domlora.adapters.variants import attach, save_adapter

        base = tmp_path / "base"
        tiny_model.save_pretrained(base)
        tiny_tokenizer.save_pretrained(base)
        name = "model.layers.1.mlp.down_proj"
        peft = attach(make_tiny_llama(len(tiny_tokenizer)), [name], variant="lora", rank=2, alpha=4)
        with torch.no_grad():
            for n, p in peft.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.5)
        adapter = tmp_path / "adapter"
        save_adapter(peft, adapter, variant="lora", meta={"base_model": str(base)})
        assert is_adapter_dir(adapter) and not is_adapter_dir(base)
        merged = load_checkpoint(adapter)
        w_base = tiny_model.model.layers[1].mlp.down_proj.weight
        w_merged = merged.model.model.layers[1].mlp.down_proj.weight
        assert not torch.allclose(w_base, w_merged)
        assert torch.equal(tiny_model.model.layers[0].mlp.down_proj.weight,
                           merged.model.model.layers[0].mlp.down_proj.weight)
        doc = probe_checkpoints([base, adapter], data=data, samples=3, max_length=64, labels=["base", "lora"])
        assert [r["adapter"] for r in doc["checkpoints"]] == [False, True]
        assert doc["checkpoints"][0]["curves"]["down_proj"] != doc["checkpoints"][1]["curves"]["down_proj"]


class TestBadInput:
    def test_other_architecture(self, tiny_model, tiny_tokenizer, data, tmp_path):
        a, b = tmp_path / "a", tmp_path / "b"
        tiny_model.save_pretrained(a)
        tiny_tokenizer.save_pretrained(a)
        make_tiny_llama(len(tiny_tokenizer), layers=2).save_pretrained(b)
        tiny_tokenizer.save_pretrained(b)
        with pytest.raises(ModelError, match="another architecture"):
            probe_checkpoints([a, b], data=data, samples=2, max_length=64)

    def test_missing_and_empty(self, data, tmp_path):
        with pytest.raises(ModelError, match="do not exist"):
            probe_checkpoints([tmp_path / "nope"], data=data)
        with pytest.raises(ConfigError, match="no checkpoints"):
            probe_checkpoints([], data=data)
        adapter = tmp_path / "ad"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        with pytest.raises(ModelError, match="base model"):
            load_checkpoint(adapter)

    def test_empty_probe_set(self, tiny_model, tiny_tokenizer, tmp_path):
        from domlora.errors import DataError

        a = tmp_path / "a"
        tiny_model.save_pretrained(a)
        tiny_tokenizer.save_pretrained(a)
        empty = tmp_path / "empty.jsonl"
        empty.write_text("")
        with pytest.raises(DataError):
            probe_checkpoints([a], data=empty)


def test_helpers():
    assert step_of("runs/x/step-0010") == 10 and step_of("checkpoint-7") == 7 and step_of("final") is None
    doc = {"modules": {"m.layers.0.mlp.down_proj": {"type": "down_proj", "layer": 0, "PAGE": 2.0},
                       "m.layers.2.mlp.down_proj": {"type": "down_proj", "layer": 2, "PAGE": 3.0}}}
    curves = layer_curves(doc)
    assert curves["down_proj"][0] == 2.0 and curves["down_proj"][2] == 3.0 and curves["down_proj"][1] != 2.0


def test_cli(run, data, tmp_path):
    from domlora.cli import main

    man, _ = run
    out = tmp_path / "why"
    args = ["checkpoints", "probe", "--data", str(data), "--out", str(out), "--samples", "2", "--max-length", "64"]
    for c in man["checkpoints"][::2]:
        args += ["--checkpoint", c["path"]]
    assert main(args) == 0
    assert {p.name for p in out.iterdir()} == {"checkpoints.json", "checkpoints.png"}
    assert json.loads((out / "checkpoints.json").read_text())["n_samples"] == 2
    assert main(["checkpoints", "finetune", "--model", "x", "--data", str(data), "--out", str(out),
                 "--save-steps", "0,a"]) == 2
