"""Sparse-B LoRA: budgets, selection, masks on B's gradient and Adam state, save/load, diagnostics."""
from __future__ import annotations

import json

import pytest
import torch

from domlora.pipeline.sparse_b_report import render_report_section
from domlora.regimes import sparse_b as sb
from domlora.errors import ConfigError, ModelError

from conftest import chat_samples, make_tiny_llama, tiny_loaded

MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj", "model.layers.2.self_attn.q_proj"]


def _peft(tok, *, modules=MODULES, rank=4, seed=0):
    model = make_tiny_llama(len(tok))
    return sb.attach_lora(model, modules, rank=rank, alpha=8.0, seed=seed)


def _encoded(tok, n=8):
    from domlora.samples import encode_samples

    enc, _ = encode_samples(tok, chat_samples(n), max_length=64)
    return enc


def _train_steps(pm, tok, steps=4, *, lr=1e-2, weight_decay=0.0, seed=1):
    """A plain AdamW loop over the adapter's trainable parameters (as train() builds it)."""
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    loss_fn = sb.sft_probe_loss(pm, _encoded(tok), pad_id=tok.pad_token_id, batch_size=4, seed=seed)
    pm.train()
    for s in range(steps):
        loss = loss_fn(s)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt


class TestSpec:
    @pytest.mark.parametrize("k", [0, -3])
    def test_nonpositive_k(self, k):
        with pytest.raises(ConfigError, match="k must be >= 1"):
            sb.SparseBSpec(k=k)

    @pytest.mark.parametrize("k", [2.5, "10", True])
    def test_non_integer_k(self, k):
        with pytest.raises(ConfigError, match="integer"):
            sb.SparseBSpec(k=k)

    def test_unknown_selection_and_budget(self):
        with pytest.raises(ConfigError, match="selection"):
            sb.SparseBSpec(k=4, selection="best")
        with pytest.raises(ConfigError, match="budget"):
            sb.SparseBSpec(k=4, budget="layer")

    def test_informed_needs_two_probe_steps(self):
        with pytest.raises(ConfigError, match="probe_steps >= 2"):
            sb.SparseBSpec(k=4, selection="informed", probe_steps=1)
        sb.SparseBSpec(k=4, selection="magnitude", probe_steps=1)


class TestAllocate:
    SIZES = {"a": 100, "b": 30, "c": 10}

    def test_k_larger_than_b(self):
        with pytest.raises(ConfigError, match=r"larger than B's size.*140.*k <= 140"):
            sb.allocate(141, self.SIZES, "global")
        assert sb.allocate(140, self.SIZES, "global") is None

    def test_per_module_proportional(self):
        alloc = sb.allocate(28, self.SIZES, "per_module")
        assert sum(alloc.values()) == 28
        assert alloc == {"a": 20, "b": 6, "c": 2}
        alloc = sb.allocate(17, self.SIZES, "per_module")
        assert sum(alloc.values()) == 17 and min(alloc.values()) >= 1

    def test_per_module_that_starves_a_module(self):
        with pytest.raises(ConfigError, match=r"leaves 1 module\(s\) with no trainable entry, e\.g\. c.*k >= 14"):
            sb.allocate(5, self.SIZES, "per_module")
        # the suggested minimum really works
        assert min(sb.allocate(14, self.SIZES, "per_module").values()) >= 1


def _scores(primary: dict, mean_grad: dict, mean_abs: dict) -> sb.EntryScores:
    t = {n: torch.tensor(v, dtype=torch.float32).view(1, -1) for n, v in primary.items()}
    return sb.EntryScores(sign_agreement=t,
                          mean_grad={n: torch.tensor(v).view(1, -1) for n, v in mean_grad.items()},
                          mean_abs={n: torch.tensor(v).view(1, -1) for n, v in mean_abs.items()},
                          steps=4, seconds=0.0)


class TestSelect:
    SHAPES = {"m1": (6, 2), "m2": (3, 2)}

    def test_random_is_seeded_and_exact(self):
        spec = sb.SparseBSpec(k=5, selection="random", seed=3)
        a = sb.select_entries(spec, self.SHAPES)
        b = sb.select_entries(spec, self.SHAPES)
        c = sb.select_entries(sb.SparseBSpec(k=5, selection="random", seed=4), self.SHAPES)
        assert sum(int(m.sum()) for m in a.values()) == 5
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert not all(torch.equal(a[n], c[n]) for n in a)
        assert {n: tuple(m.shape) for n, m in a.items()} == self.SHAPES

    def test_random_per_module_counts(self):
        masks = sb.select_entries(sb.SparseBSpec(k=6, selection="random", budget="per_module"), self.SHAPES)
        assert {n: int(m.sum()) for n, m in masks.items()} == {"m1": 4, "m2": 2}

    def test_informed_prefers_consistent_sign_over_magnitude(self):
        # entry 0: always the same sign, small; entry 1: huge but flips; entry 2/3: tie on agreement
        scores = _scores({"m": [1.0, 0.0, 0.5, 0.5]}, {"m": [0.01, 0.0, 0.2, -0.3]}, {"m": [0.01, 9.0, 0.4, 0.5]})
        shapes = {"m": (1, 4)}
        inf = sb.select_entries(sb.SparseBSpec(k=2, selection="informed"), shapes, scores)["m"].flatten()
        assert inf.tolist() == [True, False, False, True]  # tie at 0.5 broken by |mean g|: 0.3 > 0.2
        mag = sb.select_entries(sb.SparseBSpec(k=2, selection="magnitude"), shapes, scores)["m"].flatten()
        assert mag.tolist() == [False, True, False, True]

    def test_scores_without_signal_fall_back_to_a_spread_choice(self):
        zeros = {n: [0.0] * 40 for n in ("a", "b", "c")}
        scores = _scores(zeros, zeros, zeros)
        masks = sb.select_entries(sb.SparseBSpec(k=30, selection="informed", seed=0),
                                  {n: (1, 40) for n in zeros}, scores)
        counts = [int(m.sum()) for m in masks.values()]
        assert sum(counts) == 30 and min(counts) >= 4  # not the first 30 entries of module "a"

    def test_gradient_selection_needs_scores(self):
        with pytest.raises(ConfigError, match="needs gradient scores"):
            sb.select_entries(sb.SparseBSpec(k=2, selection="informed"), self.SHAPES)

    def test_global_informed_ranks_across_modules(self):
        scores = _scores({"a": [0.2, 1.0], "b": [1.0, 0.1]}, {"a": [0.1, 0.1], "b": [0.1, 0.1]},
                         {"a": [1, 1], "b": [1, 1]})
        masks = sb.select_entries(sb.SparseBSpec(k=2, selection="informed"), {"a": (1, 2), "b": (1, 2)}, scores)
        assert masks["a"].flatten().tolist() == [False, True] and masks["b"].flatten().tolist() == [True, False]


class TestScoring:
    def test_scores_are_the_probe_gradients_and_nothing_changes(self, tiny_tokenizer):
        pm = _peft(tiny_tokenizer)
        before = {n: p.detach().clone() for n, p in pm.named_parameters()}
        flags = {n: p.requires_grad for n, p in pm.named_parameters()}
        loss_fn = sb.sft_probe_loss(pm, _encoded(tiny_tokenizer), pad_id=tiny_tokenizer.pad_token_id,
                                    batch_size=2, seed=0)
        scores = sb.score_entries(pm, loss_fn, steps=3)
        # reference: plain autograd on the same three batches
        bs = sb.lora_b_params(pm)
        grads = [torch.autograd.grad(loss_fn(s), list(bs.values())) for s in range(3)]
        for i, n in enumerate(bs):
            g = torch.stack([gs[i] for gs in grads])
            torch.testing.assert_close(scores.mean_grad[n], g.mean(0))
            torch.testing.assert_close(scores.mean_abs[n], g.abs().mean(0))
            torch.testing.assert_close(scores.sign_agreement[n], torch.sign(g).mean(0).abs())
            assert float(scores.mean_abs[n].sum()) > 0  # B = 0 still gets a gradient through A
        for n, p in pm.named_parameters():
            assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
        assert len(scores.losses) == 3 and scores.seconds > 0


class TestMasks:
    def test_masked_training_keeps_unselected_entries_and_adam_state_zero(self, tiny_tokenizer):
        pm = _peft(tiny_tokenizer)
        a_before = {n: m.lora_A["default"].weight.detach().clone() for n, m in sb.lora_layers(pm).items()}
        masks = sb.select_entries(sb.SparseBSpec(k=20, selection="random", seed=1),
                                  {n: tuple(p.shape) for n, p in sb.lora_b_params(pm).items()})
        handle = sb.install(pm, masks)
        assert handle.k == 20
        opt = _train_steps(pm, tiny_tokenizer, steps=4)
        moved = 0
        for n, p in sb.lora_b_params(pm).items():
            m = masks[n]
            assert torch.count_nonzero(p.detach()[~m]) == 0
            st = opt.state[p]
            assert torch.count_nonzero(st["exp_avg"][~m]) == 0 and torch.count_nonzero(st["exp_avg_sq"][~m]) == 0
            moved += int(torch.count_nonzero(p.detach()[m]))
        assert moved > 10  # the chosen entries did train
        for n, layer in sb.lora_layers(pm).items():
            assert not layer.lora_A["default"].weight.requires_grad
            assert torch.equal(layer.lora_A["default"].weight, a_before[n])
        assert sb.outside_mask_nonzero(pm, masks) == 0
        handle.remove()

    def test_weight_decay_does_not_leak(self, tiny_tokenizer):
        # AdamW's decoupled decay scales B; entries that start at 0 stay 0
        pm = _peft(tiny_tokenizer)
        masks = sb.select_entries(sb.SparseBSpec(k=12, selection="random"),
                                  {n: tuple(p.shape) for n, p in sb.lora_b_params(pm).items()})
        sb.install(pm, masks)
        _train_steps(pm, tiny_tokenizer, steps=3, weight_decay=0.1)
        assert sb.outside_mask_nonzero(pm, masks) == 0

    def test_save_load_keeps_it_sparse(self, tiny_tokenizer, tmp_path):
        from domlora.adapters.variants import save_adapter

        pm = _peft(tiny_tokenizer)
        masks = sb.select_entries(sb.SparseBSpec(k=16, selection="random", seed=2),
                                  {n: tuple(p.shape) for n, p in sb.lora_b_params(pm).items()})
        sb.install(pm, masks)
        _train_steps(pm, tiny_tokenizer, steps=3)
        trained = {n: p.detach().clone() for n, p in sb.lora_b_params(pm).items()}
        save_adapter(pm, tmp_path / "adapter", variant="lora")
        sb.save_masks(tmp_path / "adapter", masks, meta={"note": "x"})
        meta = json.loads((tmp_path / "adapter" / sb.META_FILE).read_text())
        assert meta["k"] == 16 and meta["note"] == "x"

        fresh = make_tiny_llama(len(tiny_tokenizer))
        pm2, handle = sb.load_sparse_adapter(fresh, tmp_path / "adapter", is_trainable=True)
        loaded, _ = sb.load_masks(tmp_path / "adapter")
        assert all(torch.equal(loaded[n], masks[n]) for n in masks)
        for n, p in sb.lora_b_params(pm2).items():
            torch.testing.assert_close(p.detach(), trained[n])
        assert handle is not None and handle.k == 16
        # training continues sparse with a fresh optimizer: masked entries and their Adam state stay zero
        opt = _train_steps(pm2, tiny_tokenizer, steps=2, seed=5)
        for n, p in sb.lora_b_params(pm2).items():
            assert torch.count_nonzero(p.detach()[~masks[n]]) == 0
            assert torch.count_nonzero(opt.state[p]["exp_avg"][~masks[n]]) == 0
        assert any(not torch.equal(p.detach(), trained[n]) for n, p in sb.lora_b_params(pm2).items())

    def test_mismatched_masks(self, tiny_tokenizer, tmp_path):
        pm = _peft(tiny_tokenizer)
        shapes = {n: tuple(p.shape) for n, p in sb.lora_b_params(pm).items()}
        masks = sb.select_entries(sb.SparseBSpec(k=4, selection="random"), shapes)
        first = MODULES[0]
        with pytest.raises(ModelError, match="without a mask"):
            sb.install(pm, {n: m for n, m in masks.items() if n != first})
        bad = dict(masks)
        bad[first] = torch.ones(3, 3, dtype=torch.bool)
        with pytest.raises(ModelError, match="shape"):
            sb.install(pm, bad)
        with pytest.raises(ModelError, match="no sparse-B masks"):
            sb.load_masks(tmp_path)

    def test_masks_file_with_modules_of_zero_entries(self, tmp_path):
        masks = {"a": torch.zeros(4, 2, dtype=torch.bool), "b": torch.eye(3, 2, dtype=torch.bool)}
        sb.save_masks(tmp_path, masks)
        back, meta = sb.load_masks(tmp_path)
        assert meta["per_module"] == {"a": 0, "b": 2}
        assert all(torch.equal(back[n], masks[n]) for n in masks)

    def test_no_lora_adapter(self, tiny_tokenizer):
        with pytest.raises(ModelError, match="no LoRA adapter"):
            sb.lora_b_params(make_tiny_llama(len(tiny_tokenizer)))


class TestDiagnostics:
    def test_landing(self):
        masks = {"l0.v": torch.tensor([[True, True], [False, False]]), "l0.q": torch.tensor([[True, False]]),
                 "l1.down": torch.tensor([[True, True, True]])}
        info = {"l0.v": {"type": "v_proj", "layer": 0}, "l0.q": {"type": "q_proj", "layer": 0},
                "l1.down": {"type": "down_proj", "layer": 1}}
        land = sb.landing(masks, info)
        assert land["k"] == 6 and land["available"] == 9
        assert land["by_type"]["v_proj"]["selected"] == 2
        assert land["vod_share"] == pytest.approx(5 / 6)
        assert land["by_type"]["q_proj"]["enrichment"] == pytest.approx((1 / 6) / (2 / 9))
        assert land["by_layer"]["1"]["selected"] == 3

    def test_effective_rank(self):
        assert sb.effective_rank(torch.ones(5)) == pytest.approx(5.0)
        assert sb.effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)

    def test_recorder_tells_stable_from_orthogonal_gradients(self):
        gen = torch.Generator().manual_seed(0)
        u, v = torch.randn(32, 1, generator=gen), torch.randn(1, 4, generator=gen)
        stable = sb.GradRecorder()
        for s in range(6):
            stable.add("m", (1 + 0.01 * s) * (u @ v))  # rank one, same direction every step
            stable.end_step()
        rough = sb.GradRecorder()
        for _ in range(6):
            rough.add("m", torch.randn(32, 4, generator=gen))
            rough.end_step()
        a, b = stable.summary(), rough.summary()
        assert a["effective_rank_mean"] == pytest.approx(1.0, abs=1e-3)
        assert a["cos_prev_mean"] == pytest.approx(1.0, abs=1e-4)
        assert a["trajectory_effective_rank"] == pytest.approx(1.0, abs=1e-3)
        assert b["effective_rank_mean"] > 3.0
        assert abs(b["cos_prev_mean"]) < 0.3
        assert b["trajectory_effective_rank"] > 5.0
        assert "trajectory_effective_rank_first8" not in a  # 6 steps < the default window of 8
        w = sb.GradRecorder(window=4)
        for _ in range(6):
            w.add("m", torch.randn(32, 4, generator=gen))
            w.end_step()
        assert w.summary()["trajectory_effective_rank_first4"] > 3.0

    def test_recorder_accumulates_micro_batches(self):
        rec = sb.GradRecorder()
        rec.add("m", torch.ones(2, 2))
        rec.add("m", torch.ones(2, 2))
        row = rec.end_step(7)
        assert row["step"] == 7 and row["grad_norm"] == pytest.approx(4.0)
        assert rec.end_step() is None  # nothing new since


class TestReport:
    def test_render(self):
        base = {"budget": "global", "seed": 0, "train_seconds": 100.0, "score_seconds": 1.0, "score_fraction": 0.01,
                "eval": {"accuracy": 0.25, "stderr": 0.05}, "vod_share": 0.6,
                "landing_by_type": {"v_proj": 0.3, "o_proj": 0.2, "down_proj": 0.1, "q_proj": 0.4},
                "grad": {"steps": 5, "effective_rank_mean": 2.5, "top_sv_share_mean": 0.6, "cos_prev_mean": 0.1,
                         "trajectory_effective_rank": 4.2, "trajectory_steps": 5}, "warnings": []}
        rows = [base | {"regime": "sft", "method": "sft_sparse_random", "k": 1000, "selection": "random",
                        "loss_first": 2.0, "loss_last": 1.0},
                base | {"regime": "grpo", "method": "grpo_full_lora", "k": None, "selection": None,
                        "reward_first": 0.1, "reward_last": 0.3, "landing_by_type": None,
                        "warnings": ["constant rewards"]}]
        md = render_report_section(rows)
        assert "| sft | sft_sparse_random | 1,000 |" in md
        assert "reward 0.100 → 0.300" in md and "loss 2.0000 → 1.0000" in md
        assert "0.250 ± 0.050" in md and "1.00%" in md
        assert "**0.60**" in md and "4.20 of 5" in md
        assert "- grpo_full_lora: constant rewards" in md
        assert "No sparse-B" in render_report_section([])


def _eval_rows(path, n=4):
    rows = []
    for i in range(n):
        rows.append({"id": str(i), "messages": [], "question": f"What is {i} plus 2?", "answer": str(i + 2)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class TestSFTStage:
    def _cfg(self, **kw):
        from domlora.train.config import TrainConfig

        base = {"rank": 4, "alpha": 8, "lr": 1e-2, "max_steps": 3, "batch_size": 2, "grad_accum": 1,
                "max_length": 64, "gradient_checkpointing": False, "save_every": 0, "warmup_ratio": 0.0}
        return TrainConfig(**(base | kw))

    def test_end_to_end_and_record(self, tiny_tokenizer, chat_jsonl, tmp_path):
        out = tmp_path / "run"
        ev = _eval_rows(tmp_path / "eval.jsonl")
        spec = sb.SparseBSpec(k=24, selection="informed", probe_steps=2, probe_batch_size=2)
        m = sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=MODULES, out_dir=out,
                            cfg=self._cfg(), spec=spec, eval_data=ev, eval_max_new_tokens=4)
        assert {p.name for p in out.iterdir()} == {"adapter", "train_metrics.json"}
        assert sb.has_masks(out / "adapter") and (out / "adapter" / "adapter_model.safetensors").is_file()
        assert m["status"] == "success" and m["trainable_entries"] == 24 and m["outside_mask_nonzero"] == 0
        assert m["steps"] == 3 and len(m["loss_curve"]) == 3 and m["grad"]["steps"] == 3
        assert m["score_seconds"] > 0 and m["score_fraction"] > 0 and m["eval"]["n"] == 4
        assert set(m["landing_by_type"]) <= {"down_proj", "v_proj", "q_proj"}
        diag = json.loads((out / "adapter" / "diagnostics.json").read_text())
        assert diag["landing"]["k"] == 24 and len(diag["grad_steps"]) == 3
        # the saved adapter is sparse where it was trained
        masks, meta = sb.load_masks(out / "adapter")
        pm, _ = sb.load_sparse_adapter(make_tiny_llama(len(tiny_tokenizer)), out / "adapter")
        assert sb.outside_mask_nonzero(pm, masks) == 0 and meta["spec"]["k"] == 24
        # the one record holds the config as trained, the study's settings as run and its outcome
        from domlora.train.config import TrainRecord

        rec = TrainRecord.read(out / "train_metrics.json")
        assert rec.config["rank"] == 4 and rec.study["sparse_b"] == spec.to_dict()
        assert rec.study["outcome"]["trainable_entries"] == 24 and len(rec.loss) == 3

    def test_full_lora_reference(self, tiny_tokenizer, chat_jsonl, tmp_path):
        m = sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=MODULES[:1],
                            out_dir=tmp_path / "full", cfg=self._cfg(max_steps=2), spec=None)
        assert m["method"] == "sft_full_lora" and m["trainable_entries"] == 4 * (24 + 16)
        assert not sb.has_masks(tmp_path / "full" / "adapter") and m["eval"] is None

    def test_resume_reuses_masks(self, tiny_tokenizer, chat_jsonl, tmp_path, monkeypatch):
        out = tmp_path / "run"
        kw = dict(train_data=chat_jsonl, placement=MODULES, out_dir=out, cfg=self._cfg(seed=1),
                  spec=sb.SparseBSpec(k=10, selection="magnitude", probe_steps=2, probe_batch_size=2))
        real = sb.train

        def crash(**a):
            # simulate a kill inside train, right after the masks were chosen
            real_hook = a["model_hook"]

            def hook(net):
                real_hook(net)
                raise KeyboardInterrupt

            return real(**(a | {"model_hook": hook}))

        monkeypatch.setattr(sb, "train", crash)
        with pytest.raises(KeyboardInterrupt):
            sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), **kw)
        assert sb.has_masks(out / sb._WORK) and not (out / "train_metrics.json").exists()
        first, _ = sb.load_masks(out / sb._WORK)
        monkeypatch.setattr(sb, "train", real)
        calls = []
        monkeypatch.setattr(sb, "score_entries", lambda *a, **k: calls.append(1))
        m = sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), **kw)
        assert not calls  # masks came from the interrupted run, not from a new scoring
        final, _ = sb.load_masks(out / "adapter")
        assert all(torch.equal(first[n], final[n]) for n in first)
        assert m["status"] == "success" and not (out / sb._WORK).exists()

    def test_bad_inputs(self, tiny_tokenizer, chat_jsonl, tmp_path):
        b_total = 4 * (16 + 8 + 16)
        with pytest.raises(ConfigError, match=f"k <= {b_total}"):
            sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=MODULES,
                            out_dir=tmp_path / "x", cfg=self._cfg(), spec=sb.SparseBSpec(k=b_total + 1, selection="random"))
        with pytest.raises(ConfigError, match="k must be >= 1"):
            sb.SparseBSpec(k=0)
        with pytest.raises(ConfigError, match="plain LoRA"):
            sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=MODULES,
                            out_dir=tmp_path / "x", cfg=self._cfg(variant="dora"), spec=sb.SparseBSpec(k=5))
        with pytest.raises(ConfigError, match="no trainable entry"):
            sb.sparse_b_sft(model=tiny_loaded(tiny_tokenizer), train_data=chat_jsonl, placement=MODULES,
                            out_dir=tmp_path / "x", cfg=self._cfg(),
                            spec=sb.SparseBSpec(k=2, budget="per_module", selection="random"))
        assert not (tmp_path / "x" / "train_metrics.json").exists()


class TestCommand:
    @pytest.fixture
    def tiny_dir(self, tiny_tokenizer, tmp_path):
        d = tmp_path / "tiny"
        make_tiny_llama(len(tiny_tokenizer)).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        return d

    def test_sft_command(self, tiny_dir, chat_jsonl, tmp_path, capsys):
        from domlora.cli import main

        ev = _eval_rows(tmp_path / "eval.jsonl", n=2)
        rc = main(["sparse-b", "--regime", "sft", "--model", str(tiny_dir), "--train-data", str(chat_jsonl),
                   "--eval-data", str(ev), "--out", str(tmp_path / "run"), "--k", "30", "--selection", "magnitude",
                   "--probe-steps", "1", "--steps", "2", "--rank", "2", "--alpha", "4", "--n-eval", "2"])
        assert rc == 0
        line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert line["method"] == "sft_sparse_magnitude" and line["trainable_entries"] == 30 and line["steps"] == 2
        assert sb.has_masks(tmp_path / "run" / "adapter")

    def test_bad_k_is_a_clear_error(self, tiny_dir, chat_jsonl, tmp_path, capsys):
        from domlora.cli import main

        rc = main(["sparse-b", "--regime", "sft", "--model", str(tiny_dir), "--train-data", str(chat_jsonl),
                   "--out", str(tmp_path / "run"), "--k", "0"])
        assert rc == 2 and "k must be >= 1" in capsys.readouterr().err
        rc = main(["sparse-b", "--regime", "grpo", "--model", str(tiny_dir), "--train-data", str(chat_jsonl),
                   "--out", str(tmp_path / "run"), "--k", "none"])
        assert rc == 2 and "needs --eval-data" in capsys.readouterr().err
