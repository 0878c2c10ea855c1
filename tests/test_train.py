"""Training loop: artefacts, resume after a real kill, NaN stop, frozen-below-the-adapter, variants, CLI."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import chat_samples
from domlora.errors import ConfigError, DataError, ModelError
from domlora.config import ModelSpec
from domlora.train.config import TrainConfig, TrainingDiverged
from domlora.train.loop import train

ROOT = Path(__file__).resolve().parents[1]
# resumed vs uninterrupted adapters: same ops in the same order on CPU, so they agree to round-off
RESUME_ATOL = 1e-6
DOWN2 = ["model.layers.2.mlp.down_proj"]


def tiny_cfg(**kw) -> TrainConfig:
    base = dict(rank=4, alpha=8, lr=1e-2, max_steps=6, batch_size=2, grad_accum=2, max_length=64, save_every=2,
                gradient_checkpointing=False)
    return TrainConfig(**(base | kw))


@pytest.fixture
def base_dir(tiny_checkpoint):
    return tiny_checkpoint


@pytest.fixture
def data(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(s) + "\n" for s in chat_samples(12)))
    return p


def adapter_tensors(out: Path) -> dict:
    f = out / "adapter" / "adapter_model.safetensors"
    return load_file(str(f if f.exists() else out / "adapter" / "full_weights.safetensors"))


class TestConfig:
    def test_defaults_are_the_papers(self):
        c = TrainConfig()
        assert (c.rank, c.alpha, c.dropout, c.lr, c.warmup_ratio, c.weight_decay, c.epochs) == \
               (64, 128.0, 0.0, 2e-5, 0.03, 0.0, 1)
        assert (c.lr_schedule, c.gradient_checkpointing, c.batch_size, c.grad_accum, c.max_length) == \
               ("cosine", True, 4, 8, 3072)

    @pytest.mark.parametrize("field,value,allowed", [
        ("variant", "qlora", "dora"), ("lr_schedule", "step", "cosine"), ("rank", 0, ">= 1"),
        ("lr", -1.0, "> 0"), ("warmup_ratio", 1.5, "warmup_ratio <"), ("max_steps", 0, "-1"),
        ("layer_sampling", "lisa", "rst"), ("device", "tpu", "cuda"), ("ist_active_layers", 0, "fraction"),
        ("adalora_tinit", 0.9, "adalora_tfinal")])
    def test_errors_name_field_and_allowed(self, field, value, allowed):
        with pytest.raises(ConfigError, match=field) as e:
            TrainConfig(**{field: value})
        assert allowed in str(e.value)


class TestStepPlan:
    def test_epoch_covers_every_sample_once_then_reshuffles(self):
        from domlora.train.plan import StepPlan

        plan = StepPlan.make(10, TrainConfig(batch_size=2, grad_accum=1, epochs=2), world=1)
        assert plan.total_steps == 10
        seen = [i for s in range(plan.total_steps) for i in plan.step_samples(s)]
        assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
        assert seen[:10] != seen[10:]
        assert seen == [i for s in range(10) for i in plan.step_samples(s)]  # a pure function of (seed, step)

    def test_processes_split_each_step(self):
        from domlora.train.plan import StepPlan

        plan = StepPlan.make(9, TrainConfig(batch_size=2, grad_accum=2, max_steps=3), world=2)
        lengths = list(range(9))
        for s in range(3):
            parts = [plan.micro_batches(s, rank=r, world=2, batch_size=2, lengths=lengths) for r in (0, 1)]
            assert all(len(p) == 2 and all(len(mb) == 2 for mb in p) for p in parts)  # accum x batch each
            flat = sorted(i for p in parts for mb in p for i in mb)
            assert flat == sorted(plan.step_samples(s))


class TestTrain:
    def test_artefacts_and_metrics(self, base_dir, data, tmp_path):
        out = tmp_path / "run"
        doc = train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=out, cfg=tiny_cfg())
        assert sorted(p.name for p in out.iterdir()) == ["adapter", "train_metrics.json"]
        assert sorted(p.name for p in (out / "adapter").iterdir()) == \
            ["README.md", "adapter_config.json", "adapter_model.safetensors", "domlora_adapter.json"]
        saved = json.loads((out / "train_metrics.json").read_text())
        assert saved["status"] == doc["status"] == "success"
        for key in ("loss", "lr", "tokens_per_s", "wall_time_s", "peak_memory_mb", "trainable_params",
                    "placement", "config", "run_info"):
            assert saved[key] not in (None, [], {}), key
        assert len(saved["loss"]) == 6 and saved["trainable_params"] == 4 * (24 + 16)
        assert saved["placement"]["modules"] == DOWN2
        assert saved["run_info"]["versions"]["peft"]
        # warm-up from 0 (ceil(0.03 * 6) = 1 step) then cosine decay to 0
        assert saved["lr"][0] == 0.0 and saved["lr"][1] == pytest.approx(1e-2)
        assert all(a >= b for a, b in zip(saved["lr"][1:], saved["lr"][2:]))

    def test_loss_falls(self, base_dir, data, tmp_path):
        # the tiny model's frozen lm_head keeps logits small, so the loss can only move a little
        doc = train(model=str(base_dir), train_data=data, placement=None, out_dir=tmp_path / "r",
                    cfg=tiny_cfg(max_steps=10, lr=3e-2, warmup_ratio=0.0, lr_schedule="constant", save_every=0))
        assert sum(doc["loss"][-3:]) / 3 < doc["loss"][0] - 0.04

    def test_resume_after_exception_equals_uninterrupted(self, base_dir, data, tmp_path):
        full = tmp_path / "full"
        train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=full, cfg=tiny_cfg())

        def crash(step, m):
            if step == 3:
                raise RuntimeError("killed at step 3")

        part = tmp_path / "part"
        with pytest.raises(RuntimeError, match="step 3"):
            train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=part, cfg=tiny_cfg(), on_step=crash)
        assert not (part / "adapter").exists()
        assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-0000002"]
        assert json.loads((part / "train_metrics.json").read_text())["status"] == "failed"
        doc = train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=part, cfg=tiny_cfg())
        assert doc["resumed_from"] == 2 and doc["status"] == "success" and len(doc["loss"]) == 6
        a, b = adapter_tensors(full), adapter_tensors(part)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.allclose(a[k], b[k], atol=RESUME_ATOL, rtol=0), k
        assert not (part / "checkpoints").exists()

    def test_resume_after_sigkill(self, base_dir, data, tmp_path):
        """A process killed with SIGKILL mid-run; rerunning ends with the uninterrupted adapter."""
        cfg = dict(rank=4, alpha=8, lr=1e-2, max_steps=5, batch_size=2, grad_accum=1, max_length=64, save_every=2,
                   gradient_checkpointing=True, variant="lora_plus")
        full = tmp_path / "full"
        train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=full, cfg=TrainConfig(**cfg))
        part = tmp_path / "part"
        script = textwrap.dedent(f"""
            import os, signal
            import torch
            from domlora.train.config import TrainConfig
            from domlora.train.loop import train
            torch.set_num_threads(1)
            def kill(step, m):
                if step == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
            train(model={str(base_dir)!r}, train_data={str(data)!r}, placement={DOWN2!r}, out_dir={str(part)!r},
                  cfg=TrainConfig(**{cfg!r}), on_step=kill)
        """)
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                              env=os.environ | {"PYTHONPATH": str(ROOT)})
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        assert not (part / "adapter").exists() and not (part / "train_metrics.json").exists()
        doc = train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=part, cfg=TrainConfig(**cfg))
        assert doc["resumed_from"] == 2
        a, b = adapter_tensors(full), adapter_tensors(part)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=RESUME_ATOL, rtol=0), k

    def test_other_config_does_not_resume(self, base_dir, data, tmp_path):
        out = tmp_path / "r"
        with pytest.raises(RuntimeError):
            train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=out, cfg=tiny_cfg(),
                  on_step=lambda s, m: (_ for _ in ()).throw(RuntimeError("stop")) if s == 3 else None)
        doc = train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=out, cfg=tiny_cfg(lr=5e-3))
        assert doc["resumed_from"] is None

    def test_nan_stops_with_step_and_keeps_checkpoint(self, base_dir, data, tmp_path):
        calls = {"n": 0}

        def poison(net):
            def hook(mod, inp, output):
                calls["n"] += 1
                return output * float("nan") if calls["n"] >= 4 else output

            net.get_base_model().lm_head.register_forward_hook(hook)

        out = tmp_path / "r"
        with pytest.raises(TrainingDiverged, match=r"step 4 .*step-0000002.*lower the learning rate"):
            train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=out,
                  cfg=tiny_cfg(grad_accum=1), model_hook=poison)
        doc = json.loads((out / "train_metrics.json").read_text())
        assert doc["status"] == "failed" and "step 4" in doc["error"] and doc["completed_steps"] == 3
        assert len(doc["loss"]) == 3
        assert (out / "checkpoints" / "step-0000002" / "state.pt").is_file()
        assert not (out / "adapter").exists()

    @pytest.mark.parametrize("checkpointing", [False, True])
    def test_backward_stops_at_the_adapter(self, base_dir, data, tmp_path, checkpointing):
        """Adapter at layer 2: layers 0-1 get no backward and no frozen weight gets a gradient."""
        seen: dict[int, list] = {0: [], 1: [], 2: []}
        backward_calls = {0: 0, 1: 0, 2: 0}
        frozen_grads = []

        def hook(net):
            layers = net.get_base_model().model.layers
            for i, layer in enumerate(layers):
                layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(
                    (o[0] if isinstance(o, tuple) else o).requires_grad))
                layer.register_full_backward_hook(lambda m, gi, go, i=i: backward_calls.__setitem__(
                    i, backward_calls[i] + 1))

        def check_grads(step, m):
            net_params = hook_state["net"].named_parameters()
            frozen_grads.extend(n for n, p in net_params if not p.requires_grad and p.grad is not None)

        hook_state = {}

        def keep(net):
            hook_state["net"] = net
            hook(net)

        train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=tmp_path / "r",
              cfg=tiny_cfg(max_steps=2, gradient_checkpointing=checkpointing), model_hook=keep, on_step=check_grads)
        assert seen[0] and not any(seen[0]) and not any(seen[1])
        assert all(seen[2])  # positive control: the adapter's layer is on the backward path
        assert backward_calls[0] == backward_calls[1] == 0 and backward_calls[2] > 0
        assert frozen_grads == []

    def test_loss_on_target_positions_equals_labels_path(self, tiny_model, tiny_tokenizer):
        from domlora.samples import collate, encode_samples
        from domlora.train.loop import _forward_loss

        enc, _ = encode_samples(tiny_tokenizer, chat_samples(5), max_length=64)
        batch = collate(enc, pad_id=tiny_tokenizer.pad_token_id)
        a = _forward_loss(tiny_model, batch)
        b = _forward_loss(tiny_model, batch, full_logits=True)
        assert float(a) == pytest.approx(float(b), abs=1e-5)

    def test_lora_plus_groups(self, tiny_model):
        from domlora.adapters.variants import attach
        from domlora.train.loop import _build_optimizer

        net = attach(tiny_model, DOWN2, variant="lora_plus", rank=4, alpha=8)
        opt = _build_optimizer(net, TrainConfig(variant="lora_plus", lr=1e-3, lora_plus_ratio=16))
        by_lr = {g["lr"]: [p.shape for p in g["params"]] for g in opt.param_groups if g["params"]}
        assert by_lr == {1e-3: [torch.Size([4, 24])], 1.6e-2: [torch.Size([16, 4])]}

    def test_adalora_allocates_to_target_budget(self, base_dir, data, tmp_path):
        two = DOWN2 + ["model.layers.1.self_attn.q_proj"]
        doc = train(model=str(base_dir), train_data=data, placement=two, out_dir=tmp_path / "r",
                    cfg=tiny_cfg(variant="adalora", rank=6, adalora_target_r=2, max_steps=12, adalora_delta_t=1,
                                 save_every=0))
        ranks = doc["adalora_rank_pattern"]
        assert len(ranks) == 2 and sum(ranks.values()) == 2 * 2  # target_r x modules

    @pytest.mark.parametrize("variant", ["dora", "rslora", "gralora", "norm", "full"])
    def test_variants_train_and_load(self, base_dir, data, tmp_path, variant):
        from domlora.adapters.variants import load_for_eval

        out = tmp_path / variant
        doc = train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=out,
                    cfg=tiny_cfg(variant=variant, max_steps=3, save_every=0))
        assert doc["status"] == "success" and all(map(torch.isfinite, torch.tensor(doc["loss"])))
        meta = json.loads((out / "adapter" / "domlora_adapter.json").read_text())
        assert meta["variant"] == variant and meta["modules"] == DOWN2
        if variant == "norm":
            assert 1 <= doc["norm"][DOWN2[0]]["kept"] <= 4
        assert load_for_eval(str(base_dir), out / "adapter", device="cpu").model is not None


class TestIST:
    @staticmethod
    def _watch(seen: dict, inputs: list):
        """A model_hook recording, per forward, whether each layer's output needs grad, and the input ids."""
        def hook(net):
            base = net.get_base_model().model
            base.embed_tokens.register_forward_hook(lambda m, a, o: inputs.append(a[0].clone()))
            for i, layer in enumerate(base.layers):
                layer.register_forward_hook(lambda m, a, o, i=i: seen[i].append(
                    (o[0] if isinstance(o, tuple) else o).requires_grad))
        return hook

    def test_ist_trains_sampled_layers_and_stops_below(self, base_dir, data, tmp_path):
        seen: dict[int, list] = {0: [], 1: [], 2: []}
        inputs: list = []
        actives, forwards_after = [], []

        def record(step, m):
            actives.append(m["active_layers"])
            forwards_after.append(len(seen[0]))

        doc = train(model=str(base_dir), train_data=data, placement=None, out_dir=tmp_path / "r",
                    cfg=tiny_cfg(max_steps=8, grad_accum=1, ist_active_layers=1, ist_update_every=1,
                                 save_every=0, layer_sampling="ist"), model_hook=self._watch(seen, inputs),
                    on_step=record)
        assert all(len(a) == 1 for a in actives) and len({a[0] for a in actives}) > 1
        ist = doc["ist"]
        assert ist["mode"] == "ist" and ist["active_per_step"] == 1 and ist["suppressed_per_rollout"] == 1
        assert sum(ist["times_selected"]) == 8 and len(ist["times_selected"]) == len(ist["scores"]) == 3
        assert ist["times_selected"] == [sum(a == [layer] for a in actives) for layer in range(3)]
        # an importance update after every step but the last, 3 rollouts each, with scores learnt from them
        assert ist["importance_updates"] == 7 and any(s != 0 for s in ist["scores"])
        last = ist["last_update"]
        assert last["step"] == 7 and len(last["losses"]) == 3 and len({tuple(x) for x in last["suppressed"]}) == 3
        # per step: one training forward, then (steps 1-7) three rollouts without grad
        assert forwards_after == [4 * s for s in range(1, 8)] + [29]
        assert all(len(v) == 29 for v in seen.values())
        fresh_differs = 0
        for step, (layer,) in enumerate(actives):
            at = 0 if step == 0 else forwards_after[step - 1]
            on_path = [seen[i][at] for i in range(3)]
            assert on_path == [i >= layer for i in range(3)], (step, layer, on_path)
            if step < 7:
                rollouts = inputs[at + 1: at + 4]
                assert not any(seen[i][at + j] for i in range(3) for j in (1, 2, 3))
                assert all(torch.equal(r, rollouts[0]) for r in rollouts)  # one fresh batch per update
                fresh_differs += not torch.equal(rollouts[0], inputs[at])
        assert fresh_differs >= 5  # measured on other samples than the step's own batch

    def test_rst_samples_layers_uniformly_without_rollouts(self, base_dir, data, tmp_path):
        seen: dict[int, list] = {0: [], 1: [], 2: []}
        actives: list = []
        doc = train(model=str(base_dir), train_data=data, placement=None, out_dir=tmp_path / "r",
                    cfg=tiny_cfg(max_steps=8, grad_accum=1, ist_active_layers=1, ist_update_every=1,
                                 save_every=0, layer_sampling="rst"), model_hook=self._watch(seen, []),
                    on_step=lambda step, m: actives.append(m["active_layers"]))
        rst = doc["ist"]
        assert doc["config"]["layer_sampling"] == "rst" and rst["mode"] == "rst"
        assert rst["scores"] == [0.0] * 3 and rst["importance_updates"] == 0 and rst["last_update"] is None
        assert rst["times_selected"] == [sum(a == [layer] for a in actives) for layer in range(3)]
        assert sum(rst["times_selected"]) == 8 and len({a[0] for a in actives}) > 1
        assert all(len(v) == 8 for v in seen.values())  # training forwards only

    def test_ist_resume_equals_uninterrupted(self, base_dir, data, tmp_path):
        # updates after steps 2, 4 and 6: the last one happens after the resume from step 4
        cfg = tiny_cfg(max_steps=8, grad_accum=1, ist_active_layers=1, ist_update_every=2, save_every=2,
                       layer_sampling="ist")
        full, part = tmp_path / "full", tmp_path / "part"
        train(model=str(base_dir), train_data=data, placement=None, out_dir=full, cfg=cfg)

        def crash(step, m):
            if step == 5:
                raise RuntimeError("stop")

        with pytest.raises(RuntimeError):
            train(model=str(base_dir), train_data=data, placement=None, out_dir=part, cfg=cfg, on_step=crash)
        doc = train(model=str(base_dir), train_data=data, placement=None, out_dir=part, cfg=cfg)
        assert doc["resumed_from"] == 4
        want = json.loads((full / "train_metrics.json").read_text())["ist"]
        got = doc["ist"]
        assert want["importance_updates"] == got["importance_updates"] == 3 and any(s != 0 for s in want["scores"])
        assert got["scores"] == pytest.approx(want["scores"], abs=1e-5)
        assert got["times_selected"] == want["times_selected"]
        assert got["last_update"]["suppressed"] == want["last_update"]["suppressed"]
        a, b = adapter_tensors(full), adapter_tensors(part)
        for k in a:
            assert torch.allclose(a[k], b[k], atol=RESUME_ATOL, rtol=0), k

    def test_ist_rejects_full(self, base_dir, data, tmp_path):
        with pytest.raises(ConfigError, match="IST"):
            tiny_cfg(variant="full", layer_sampling="ist")


class TestBadInput:
    def test_missing_placement_file(self, base_dir, data, tmp_path):
        with pytest.raises(ConfigError, match="domlora select"):
            train(model=str(base_dir), train_data=data, placement=tmp_path / "p.json", out_dir=tmp_path / "r",
                  cfg=tiny_cfg())

    def test_placement_module_not_in_model(self, base_dir, data, tmp_path):
        with pytest.raises(ModelError, match="does not have"):
            train(model=str(base_dir), train_data=data, placement=["model.layers.7.mlp.down_proj"],
                  out_dir=tmp_path / "r", cfg=tiny_cfg())

    def test_missing_data(self, base_dir, tmp_path):
        with pytest.raises(DataError, match="does not exist"):
            train(model=str(base_dir), train_data=tmp_path / "none.jsonl", placement=DOWN2, out_dir=tmp_path / "r",
                  cfg=tiny_cfg())

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
    def test_gpu_only_options_on_cpu(self, base_dir, data, tmp_path):
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            train(model=str(base_dir), train_data=data, placement=DOWN2, out_dir=tmp_path / "r",
                  cfg=tiny_cfg(device="cuda"))
        with pytest.raises(ConfigError, match="float16 training needs a GPU"):
            train(model=ModelSpec(str(base_dir), dtype="float16"), train_data=data, placement=DOWN2,
                  out_dir=tmp_path / "r", cfg=tiny_cfg())

    def test_unknown_layer_sampling(self):
        with pytest.raises(ConfigError, match="layer_sampling.*allowed values: none, ist, rst"):
            TrainConfig.from_dict({"layer_sampling": "lisa"})


def test_cli_train(base_dir, data, tmp_path, capsys):
    from domlora.cli import main

    (tmp_path / "p.json").write_text(json.dumps({"strategy": "dom", "modules": DOWN2}))
    rc = main(["train", "--model", str(base_dir), "--data", str(data), "--placement", str(tmp_path / "p.json"),
               "--out", str(tmp_path / "r"), "--rank", "4", "--alpha", "8", "--lr", "1e-2", "--max-steps", "2",
               "--batch-size", "2", "--grad-accum", "1", "--max-length", "64", "--no-gradient-checkpointing"])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["status"] == "success" and line["steps"] == 2 and line["trainable_params"] == 160
    assert (tmp_path / "r" / "adapter" / "adapter_model.safetensors").is_file()
    assert main(["train", "--model", str(base_dir), "--data", str(tmp_path / "x.jsonl"), "--out",
                 str(tmp_path / "r2")]) == 2


def test_cli_train_reads_a_profile_through_the_one_schema(base_dir, data, tmp_path, capsys):
    """`--profile/--method` give exactly the pipeline's TrainConfig; flags and --set override any field."""
    from domlora.cli import main
    from domlora.commands.train import add_arguments, resolve_config
    from domlora.pipeline.params import load_params

    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    base = ["--model", "m", "--data", "d", "--out", "o", "--params", str(ROOT / "params.yaml")]
    want = load_params(ROOT / "params.yaml", profile="embedded").train_config("domlora")
    assert resolve_config(parser.parse_args(base + ["--profile", "embedded", "--method", "domlora"])) == want
    got = resolve_config(parser.parse_args(base + ["--profile", "embedded", "--method", "domlora", "--lr", "1e-3",
                                                   "--set", "lr_schedule=linear", "--set", "adalora_beta1=0.5"]))
    assert (got.lr, got.lr_schedule, got.adalora_beta1, got.rank) == (1e-3, "linear", 0.5, want.rank)
    assert resolve_config(parser.parse_args(base)) == TrainConfig()  # no profile: the paper's recipe
    # a mistyped field is named with its closest match before any model loads
    rc = main(["train", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"),
               "--set", "lr_shedule=linear"])
    assert rc == 2 and "lr_shedule" in capsys.readouterr().err
    rc = main(["train", "--model", str(base_dir), "--data", str(data), "--out", str(tmp_path / "r"),
               "--params", str(ROOT / "params.yaml"), "--profile", "embedded", "--method", "domlor"])
    assert rc == 2 and "did you mean domlora" in capsys.readouterr().err


@pytest.mark.slow
def test_deepspeed_zero2_step_on_cpu(base_dir, data, tmp_path):
    """One ZeRO-2 optimizer step through the DeepSpeed engine, single process on CPU (gloo)."""
    pytest.importorskip("deepspeed")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(ROOT), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                        "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = tmp_path / "ds"
    script = textwrap.dedent(f"""
        import json
        from domlora.train.config import TrainConfig
        from domlora.train.loop import train
        doc = train(model={str(base_dir)!r}, train_data={str(data)!r}, placement={DOWN2!r}, out_dir={str(out)!r},
                    cfg=TrainConfig(rank=4, alpha=8, lr=1e-2, max_steps=3, batch_size=2, grad_accum=2,
                                    max_length=64, save_every=2, gradient_checkpointing=True,
                                    deepspeed={str(ROOT / 'configs' / 'deepspeed_zero2.json')!r}))
        print("RESULT", json.dumps({{"status": doc["status"], "loss": doc["loss"], "lr": doc["lr"]}}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert res["status"] == "success" and len(res["loss"]) == 3
    assert res["lr"][0] == 0.0 and res["lr"][1] > 0
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # the engine really updated the adapter: B started at zero
    b = [v for k, v in load_file(str(out / "adapter" / "adapter_model.safetensors")).items() if "lora_B" in k]
    assert b and float(b[0].abs().sum()) > 0


@pytest.mark.slow
def test_two_processes_ddp_on_cpu(base_dir, data, tmp_path):
    """The same loop under torchrun: 2 gloo processes, each step = batch x accum x 2 samples."""
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, os, pathlib, torch
        from domlora.train.config import TrainConfig
        from domlora.train.loop import train
        torch.set_num_threads(1)
        doc = train(model={str(base_dir)!r}, train_data={str(data)!r}, placement={DOWN2!r}, out_dir={str(out)!r},
                    cfg=TrainConfig(rank=4, alpha=8, lr=1e-2, max_steps=3, batch_size=2, grad_accum=2,
                                    max_length=64, save_every=2, gradient_checkpointing=True))
        # one file per process: two processes printing to one pipe may interleave their lines
        pathlib.Path({str(tmp_path)!r}, "result_" + os.environ["RANK"] + ".json").write_text(
            json.dumps({{k: doc[k] for k in ("status", "world_size", "samples_per_step", "loss")}}))
    """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)],
                          capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"result_{rank}.json").read_text()) for rank in (0, 1)]
    assert len(results) == 2 and all(r["status"] == "success" for r in results)
    assert results[0]["world_size"] == 2 and results[0]["samples_per_step"] == 2 * 2 * 2
    assert results[0]["loss"] == results[1]["loss"]  # the logged loss is reduced over both processes
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_the_process_group_is_destroyed_at_exit(tmp_path):
    """A launched process leaves with its gloo group destroyed, before the interpreter's own teardown, and
    registering twice registers once."""
    out = tmp_path / "at_exit.txt"
    script = textwrap.dedent(f"""
        import atexit, pathlib, torch.distributed as dist
        from domlora.train.distributed import close_process_group_at_exit
        # registered first, so it runs after the hook under test (atexit runs last-in first-out)
        atexit.register(lambda: pathlib.Path({str(out)!r}).write_text(str(dist.is_initialized())))
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
        close_process_group_at_exit()
        close_process_group_at_exit()
        import domlora.train.distributed as t
        assert len(t._CLOSE_AT_EXIT) == 1
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.read_text() == "False"
