"""GRPO on the arithmetic task: answer parsing, the verifiable reward, signal checks, the TRL run."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import make_tiny_llama, tiny_loaded
from domlora.evaluate.scoring import final_int
from domlora.regimes import arith as A
from domlora.regimes import grpo as g
from domlora.regimes import sparse_b as sb
from domlora.errors import ConfigError, DataError

MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


class TestAnswers:
    @pytest.mark.parametrize("text,want", [
        ("3 + 4 = 7.\n#### 7", 7), ("#### 1,200", 1200), ("#### $12", 12), ("#### -5", -5),
        ("#### 3\nmore\n#### 12", 12), ("  ####   42  ", 42), ("#### 7.", 7),
        ("the answer is 7", None), ("#### seven", None), ("#### 7 apples", None), ("", None),
    ])
    def test_parse(self, text, want):
        assert final_int(text) == want

    def test_reward(self):
        r = g.ArithReward(answer_weight=1.0, format_weight=0.2)
        assert r.score("x\n#### 12", "12") == (pytest.approx(1.2), True, True)
        assert r.score("#### 11", "12") == (pytest.approx(0.2), True, False)
        assert r.score("12", "12") == (0.0, False, False)
        with pytest.raises(ConfigError):
            g.ArithReward(answer_weight=0.0, format_weight=0.0)

    def test_reward_func_handles_chat_completions_and_logs_groups(self):
        log = g.RewardLog()
        fn = g.ArithReward().reward_func(log)
        prompts = ["p1", "p1", "p2", "p2"]
        comps = [[{"role": "assistant", "content": "#### 3"}], [{"role": "assistant", "content": "#### 4"}],
                 "no answer", "still none"]
        out = fn(prompts=prompts, completions=comps, answer=["3", "3", "5", "5"])
        assert out == pytest.approx([1.2, 0.2, 0.0, 0.0])
        s = log.summary()
        assert s["groups"] == 2 and s["groups_zero_std"] == 1 and s["parse_rate"] == 0.5 and s["accuracy"] == 0.25


class TestSignal:
    def test_constant_rewards_warn(self, caplog):
        log, state = g.RewardLog(), g.RunState()
        log.record(["a", "a", "b", "b"], [0.2, 0.2, 0.0, 0.0], [True, True, False, False], [False] * 4)
        with caplog.at_level(logging.WARNING, logger="domlora.regimes.grpo"):
            s = g.check_signal(log, state)
        assert s["no_signal"] and not s["never_parsable"]
        assert any("no learning signal" in w for w in state.warnings)
        assert "no learning signal" in caplog.text

    def test_never_parsable_warns(self):
        log, state = g.RewardLog(), g.RunState()
        log.record(["a", "a"], [0.0, 0.0], [False, False], [False, False])
        s = g.check_signal(log, state)
        assert s["never_parsable"] and len(state.warnings) == 2

    def test_signal_present(self):
        log, state = g.RewardLog(), g.RunState()
        log.record(["a", "a"], [1.2, 0.0], [True, False], [True, False])
        s = g.check_signal(log, state)
        assert not s["no_signal"] and not s["never_parsable"] and not state.warnings


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_rows(n=6):
    return [{"messages": [{"role": "user", "content": f"What is {i} plus 2?"},
                          {"role": "assistant", "content": f"{i} + 2 = {i + 2}.\n#### {i + 2}"}]} for i in range(n)]


def _eval_rows(n=4):
    return [{"id": str(i), "messages": [], "question": f"What is {i} plus 3?", "answer": str(i + 3)} for i in range(n)]


class TestData:
    def test_read_prompts(self, tmp_path):
        rows = A.read_prompts(_write(tmp_path / "t.jsonl", _train_rows(3)))
        assert rows[1] == {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}], "answer": "3"}
        ev = A.read_prompts(_write(tmp_path / "e.jsonl", _eval_rows(2)), limit=1)
        assert ev == [{"prompt": [{"role": "user", "content": "What is 0 plus 3?"}], "answer": "3"}]

    def test_rows_without_answers(self, tmp_path):
        bad = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
        with pytest.raises(DataError, match="no row with a checkable integer answer"):
            A.read_prompts(_write(tmp_path / "b.jsonl", bad))
        with pytest.raises(DataError, match="does not exist"):
            A.read_prompts(tmp_path / "missing.jsonl")

    def test_settings_validation(self):
        with pytest.raises(ConfigError, match="num_generations must be >= 2"):
            g.GRPOSettings(num_generations=1)
        with pytest.raises(ConfigError, match="prompts_per_step"):
            g.GRPOSettings(prompts_per_step=0)
        with pytest.raises(ConfigError, match="temperature"):
            g.GRPOSettings(temperature=0.0)


class _LengthReward:
    """A stand-in reward that varies with the completion, so advantages are not all zero."""

    def score(self, text, answer):
        return float(len(text) % 3), True, False


class TestPolicyProbe:
    def test_sequence_logprob_matches_manual(self, tiny_tokenizer):
        model = make_tiny_llama(len(tiny_tokenizer))
        pids = torch.tensor([[5, 6, 7], [0, 8, 9]])
        pmask = torch.tensor([[1, 1, 1], [0, 1, 1]])
        comp = torch.tensor([[10, 11, 0], [12, 0, 0]])  # 0 is the pad id: rows end early
        lp = g.sequence_logprob(model, pids, pmask, comp, pad_id=0)
        # the first end marker is the policy's choice to stop, so it counts; what follows does not
        ids = torch.tensor([[5, 6, 7, 10, 11, 0]])
        logits = model(input_ids=ids).logits.log_softmax(-1)
        want0 = (logits[0, 2, 10] + logits[0, 3, 11] + logits[0, 4, 0]) / 3
        ids1 = torch.tensor([[8, 9, 12, 0]])
        l1 = model(input_ids=ids1).logits.log_softmax(-1)
        want1 = (l1[0, 1, 12] + l1[0, 2, 0]) / 2
        torch.testing.assert_close(lp, torch.stack([want0, want1]), atol=1e-4, rtol=1e-4)

    def test_probe_gradient(self, tiny_tokenizer):
        model = make_tiny_llama(len(tiny_tokenizer))
        pm = sb.attach_lora(model, MODULES, rank=4, alpha=8.0, seed=0)
        rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 2?"}], "answer": str(i + 2)}
                for i in range(4)]
        fn = g.policy_probe_loss(pm, tiny_tokenizer, rows, reward=_LengthReward(), num_generations=4,
                                 prompts_per_step=2, max_new_tokens=6, temperature=1.0, seed=0)
        scores = sb.score_entries(pm, fn, steps=2)
        assert sum(float(v.abs().sum()) for v in scores.mean_abs.values()) > 0
        # constant rewards: no advantage, so no gradient
        flat = g.policy_probe_loss(pm, tiny_tokenizer, rows, reward=g.ArithReward(), num_generations=2,
                                   prompts_per_step=1, max_new_tokens=4, temperature=1.0, seed=0)
        scores = sb.score_entries(pm, flat, steps=2)
        assert sum(float(v.abs().sum()) for v in scores.mean_abs.values()) == 0


class _LateReward:
    """Constant rewards for the first `flat` scored completions, then varying ones."""

    def __init__(self, flat: int):
        self.flat, self.n = flat, 0

    def score(self, text, answer):
        self.n += 1
        return (0.0 if self.n <= self.flat else float(len(text) % 3)), True, False


class TestProbeRedraw:
    def test_constant_groups_are_redrawn(self, tiny_tokenizer):
        pm = sb.attach_lora(make_tiny_llama(len(tiny_tokenizer)), MODULES, rank=4, alpha=8.0, seed=0)
        rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 2?"}], "answer": str(i + 2)}
                for i in range(4)]
        kw = dict(num_generations=4, prompts_per_step=1, max_new_tokens=6, temperature=1.0, seed=0)
        once = g.RewardLog()
        fn = g.policy_probe_loss(pm, tiny_tokenizer, rows, reward=_LateReward(flat=4), max_tries=1, log=once, **kw)
        assert sum(float(v.abs().sum()) for v in sb.score_entries(pm, fn, steps=1).mean_abs.values()) == 0
        log1 = g.RewardLog()
        fn = g.policy_probe_loss(pm, tiny_tokenizer, rows, reward=_LateReward(flat=4), max_tries=3, log=log1, **kw)
        assert sum(float(v.abs().sum()) for v in sb.score_entries(pm, fn, steps=1).mean_abs.values()) > 0
        assert once.summary()["calls"] == 1 and log1.summary()["calls"] == 2  # one redraw was enough
        with pytest.raises(ConfigError):
            g.policy_probe_loss(pm, tiny_tokenizer, rows, reward=g.ArithReward(), max_tries=0, **kw)


class TestGRPOStage:
    SETTINGS = dict(prompts_per_step=2, num_generations=2, max_completion_length=6, eval_max_new_tokens=4, n_eval=4)

    @staticmethod
    def _cfg(**kw):
        from domlora.train.config import TrainConfig

        return TrainConfig(**({"rank": 4, "alpha": 8.0, "lr": 2e-3, "max_steps": 2, "lr_schedule": "constant",
                               "warmup_ratio": 0.0} | kw))

    def test_sparse_run_artefacts_warnings_and_rerun(self, tiny_tokenizer, tmp_path):
        train = _write(tmp_path / "train.jsonl", _train_rows(6))
        ev = _write(tmp_path / "eval.jsonl", _eval_rows(4))
        out = tmp_path / "run"
        settings = g.GRPOSettings(**self.SETTINGS)
        spec = sb.SparseBSpec(k=12, selection="informed", probe_steps=2, probe_batch_size=1)
        m = g.grpo(model=tiny_loaded(tiny_tokenizer), train_data=train, eval_data=ev, placement=MODULES, out_dir=out,
                   cfg=self._cfg(), settings=settings, sparse_b=spec)
        assert {p.name for p in out.iterdir()} == {"adapter", "train_metrics.json"}
        assert sb.has_masks(out / "adapter") and (out / "adapter" / "diagnostics.json").is_file()
        assert m["status"] == "success" and m["steps"] == 2 and m["trainable_entries"] == 12
        assert len(m["reward_curve"]) == 2 and m["eval"]["n"] == 4 and m["outside_mask_nonzero"] == 0
        # a random tiny model never writes `#### N`: reported, and the run still finishes
        assert m["never_parsable"] and m["no_signal"] and len(m["warnings"]) >= 2
        assert m["score_seconds"] > 0 and m["grad"]["steps"] == 2
        # one record: the config GRPO trained with (rank 4, not a default), its sections and its outcome
        from domlora.train.config import TrainRecord

        rec = TrainRecord.read(out / "train_metrics.json")
        assert rec.regime == "grpo" and rec.config["rank"] == 4 and rec.config["lr"] == 2e-3
        assert rec.study["grpo"] == settings.to_dict() and rec.study["sparse_b"]["k"] == 12
        assert rec.study["outcome"]["trainable_entries"] == 12 and len(rec.reward) == 2

    def test_full_lora_and_bad_inputs(self, tiny_tokenizer, tmp_path):
        train = _write(tmp_path / "train.jsonl", _train_rows(6))
        ev = _write(tmp_path / "eval.jsonl", _eval_rows(4))
        settings = g.GRPOSettings(**self.SETTINGS)
        m = g.grpo(model=tiny_loaded(tiny_tokenizer), train_data=train, eval_data=ev, placement=MODULES[:1],
                   out_dir=tmp_path / "full", cfg=self._cfg(max_steps=1), settings=settings)
        assert m["method"] == "grpo_full_lora" and m["trainable_entries"] == 4 * (24 + 16)
        assert not sb.has_masks(tmp_path / "full" / "adapter")
        with pytest.raises(ConfigError, match="larger than B's size"):
            g.grpo(model=tiny_loaded(tiny_tokenizer), train_data=train, eval_data=ev, placement=MODULES,
                   out_dir=tmp_path / "x", cfg=self._cfg(), settings=settings,
                   sparse_b=sb.SparseBSpec(k=10_000, selection="random"))
        with pytest.raises(ConfigError, match="k must be >= 1"):
            sb.SparseBSpec(k=-1)
        with pytest.raises(ConfigError, match="plain LoRA"):
            g.grpo(model=tiny_loaded(tiny_tokenizer), train_data=train, eval_data=ev, placement=MODULES,
                   out_dir=tmp_path / "x", cfg=self._cfg(variant="dora"), settings=settings)
        with pytest.raises(DataError, match="fewer than prompts_per_step"):
            g.grpo(model=tiny_loaded(tiny_tokenizer), train_data=_write(tmp_path / "one.jsonl", _train_rows(1)),
                   eval_data=ev, placement=MODULES, out_dir=tmp_path / "x", cfg=self._cfg(), settings=settings,
                   sparse_b=sb.SparseBSpec(k=4, selection="random"))
        assert not (tmp_path / "x" / "train_metrics.json").exists()


class TestEval:
    def test_merged_eval_matches_unmerged_and_restores_weights(self, tiny_tokenizer):
        model = make_tiny_llama(len(tiny_tokenizer))
        pm = sb.attach_lora(model, MODULES, rank=4, alpha=8.0, seed=0)
        with torch.no_grad():
            for p in sb.lora_b_params(pm).values():
                p.normal_(0, 0.5)
        before = {n: p.detach().clone() for n, p in pm.named_parameters()}
        rows = [{"prompt": [{"role": "user", "content": f"What is {i} plus 2?"}], "answer": str(i + 2)}
                for i in range(3)]
        a = A.arith_accuracy(pm, tiny_tokenizer, rows, max_new_tokens=5, batch_size=2, merge=True)
        b = A.arith_accuracy(pm, tiny_tokenizer, rows, max_new_tokens=5, batch_size=2, merge=False)
        assert [s["completion"] for s in a["samples"]] == [s["completion"] for s in b["samples"]]
        for n, p in pm.named_parameters():
            torch.testing.assert_close(p, before[n], atol=1e-6, rtol=1e-6)
        assert a["n"] == 3 and 0.0 <= a["accuracy"] <= 1.0
        with pytest.raises(DataError):
            A.arith_accuracy(pm, tiny_tokenizer, [], max_new_tokens=2)
