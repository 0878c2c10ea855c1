"""IST controller: layer sampling from scores, rollouts with suppressed layers, the score update, RST."""
from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from conftest import make_tiny_llama
from domlora.adapters.ist import ISTConfig, ISTController
from domlora.adapters.variants import attach
from domlora.errors import ConfigError
from domlora.modules import find_candidates
from domlora.train.config import TrainConfig


def lora_net(tokenizer, layers: int = 4, b_scale: dict[int, float] | None = None):
    """A tiny Llama with LoRA everywhere and non-zero B (scaled per layer), so adapters change the output."""
    model = make_tiny_llama(len(tokenizer), layers=layers)
    m = attach(model, [c.name for c in find_candidates(model)], variant="lora", rank=2, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                layer = int(n.split("layers.")[1].split(".")[0])
                p.copy_(torch.randn(p.shape, generator=g) * (b_scale or {}).get(layer, 1.0))
    return m


@pytest.fixture
def net(tiny_tokenizer):
    return lora_net(tiny_tokenizer)


def suppressed_layers(ctl: ISTController) -> list[int]:
    """Which layers the controller has scaled down right now (read from the adapters themselves)."""
    out = []
    for layer, mods in ctl.tuners.items():
        s = mods[0].scaling["default"]
        if not math.isclose(s, mods[0].lora_alpha["default"] / mods[0].r["default"]):
            out.append(layer)
    return sorted(out)


def synthetic_loss(ctl: ISTController, cost: dict[int, float], calls: list | None = None):
    """A loss that is the sum of `cost` over the currently suppressed layers."""
    def loss_fn():
        sup = suppressed_layers(ctl)
        if calls is not None:
            calls.append(sup)
        return sum(cost.get(layer, 0.0) for layer in sup)
    return loss_fn


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("active_layers", 0), ("active_layers", -0.5), ("active_layers", 2.5), ("active_layers", float("nan")),
    ("suppressed_layers", 0), ("suppressed_layers", 1.5), ("update_every", 0), ("update_every", 2.5),
    ("rollouts", 1), ("rollouts", 0), ("suppression_factor", 1.0), ("suppression_factor", -0.1),
    ("score_lr", 0.0), ("score_lr", float("inf"))])
def test_bad_settings_name_the_field_and_the_fix(field, value):
    with pytest.raises(ConfigError, match=f"ist_{field}") as e:
        ISTConfig(**{field: value})
    assert "fix:" in str(e.value)
    with pytest.raises(ConfigError, match=f"ist_{field}"):  # the same through the training recipe
        TrainConfig(**{f"ist_{field}": value})


def test_unknown_mode_names_the_choices():
    with pytest.raises(ConfigError, match="ist, rst"):
        ISTConfig(mode="random")


def test_defaults_are_the_references():
    c = ISTConfig()
    assert (c.mode, c.active_layers, c.update_every, c.rollouts, c.suppressed_layers, c.suppression_factor,
            c.score_lr) == ("ist", 0.25, 10, 3, 0.5, 0.25, 10.0)
    t = TrainConfig()
    assert t.ist_config("rst") == ISTConfig(mode="rst")


def test_too_few_distinct_suppression_sets_is_refused(tiny_tokenizer):
    two = lora_net(tiny_tokenizer, layers=2)  # 2 layers, 1 suppressed: only 2 different sets
    with pytest.raises(ConfigError, match="ist_rollouts") as e:
        ISTController(two, ISTConfig(rollouts=3))
    assert "fix:" in str(e.value)
    assert ISTController(two, ISTConfig(rollouts=2)).m == 1
    assert ISTController(two, ISTConfig(mode="rst")).k == 1  # rst has no rollouts


def test_counts_from_fraction_are_floored_like_the_reference(net):
    # int(n * fraction), at least 1, at most n
    assert ISTController(net, ISTConfig(active_layers=0.25)).k == 1
    assert ISTController(net, ISTConfig(active_layers=0.7)).k == 2
    assert ISTController(net, ISTConfig(active_layers=0.1)).k == 1
    assert ISTController(net, ISTConfig(active_layers=3)).k == 3
    assert ISTController(net, ISTConfig(active_layers=10)).k == 4
    assert ISTController(net, ISTConfig()).m == 2
    assert ISTController(net, ISTConfig(suppressed_layers=0.8)).m == 3


# -- the fine-tuning loop ------------------------------------------------------------------------


def test_sampling_is_deterministic_distinct_and_uniform_at_start(net):
    ist = ISTController(net, ISTConfig(active_layers=2), seed=5)
    picks = [ist.sample(s) for s in range(400)]
    assert picks == [ISTController(net, ISTConfig(active_layers=2), seed=5).sample(s) for s in range(400)]
    assert picks != [ISTController(net, ISTConfig(active_layers=2), seed=6).sample(s) for s in range(400)]
    assert all(len(set(p)) == 2 for p in picks)
    freq = Counter(layer for p in picks for layer in p)
    assert set(freq) == {0, 1, 2, 3}
    assert max(freq.values()) - min(freq.values()) < 80  # 200 expected each


def test_low_score_layer_is_trained_more_often(net):
    # the reference trains with weight sigmoid(-score): a low score means the layer matters
    ist = ISTController(net, ISTConfig(active_layers=1))
    ist.scores[:] = torch.tensor([0.0, 0.0, -4.0, 0.0], dtype=torch.float64)
    freq = Counter(ist.sample(s)[0] for s in range(400))
    w = torch.tensor([0.5, 0.5, 1 / (1 + math.exp(-4)), 0.5])
    assert freq[2] / 400 == pytest.approx(float(w[2] / w.sum()), abs=0.06)  # 0.39 (uniform: 0.25)
    assert ist.summary()["first_draw_prob"][2] == pytest.approx(float(w[2] / w.sum()), abs=1e-6)


def test_activate_only_selected_layers(net):
    ist = ISTController(net, ISTConfig(active_layers=2))
    ist.activate([1, 3])
    for name, p in net.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            assert p.requires_grad == (layer in (1, 3)), name
    assert ist.selected_count.tolist() == [0, 1, 0, 1]
    ist.activate_all()
    assert all(p.requires_grad for n, p in net.named_parameters() if "lora_" in n)


# -- suppression ---------------------------------------------------------------------------------


def test_suppression_scales_the_adapter_delta_and_restores_it(net):
    ist = ISTController(net, ISTConfig(suppression_factor=0.25))
    q = net.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(1))
    before = dict(q.scaling)
    with torch.no_grad():
        full = q(x)
        with net.disable_adapter():
            base = q(x)
        with ist.suppressed([1]):
            part = q(x)
            assert suppressed_layers(ist) == [1]
        with ist.suppressed([0, 2]):  # other layers' adapters only
            other = q(x)
        with pytest.raises(RuntimeError), ist.suppressed([1]):
            raise RuntimeError("inside")
        again = q(x)
    assert not torch.allclose(full, base)
    assert torch.allclose(part - base, 0.25 * (full - base), atol=1e-6)  # scaled down, not removed
    assert torch.equal(other, full) and torch.equal(again, full)
    assert q.scaling == before and suppressed_layers(ist) == []


# -- the importance loop -------------------------------------------------------------------------


def test_update_follows_the_reference_rule(net):
    cfg = ISTConfig(rollouts=3, score_lr=10.0)
    ist = ISTController(net, cfg, seed=3)
    calls: list = []
    cost = {0: 0.1, 1: 0.4, 2: 2.0, 3: 0.2}
    net.train()
    rec = ist.update_importance(synthetic_loss(ist, cost, calls), step=10)
    assert net.training  # put back in train mode after the eval-mode rollouts
    assert len(calls) == 3 and all(len(c) == 2 for c in calls) and len({tuple(c) for c in calls}) == 3
    assert rec["suppressed"] == calls
    assert rec["losses"] == pytest.approx([sum(cost[i] for i in c) for c in calls])
    # reward = exp(-loss) minus the rollouts' mean; the suppressed layers get reward * p(1-p) * lr, p = 0.5
    r = [math.exp(-x) for x in rec["losses"]]
    r = [x - sum(r) / 3 for x in r]
    want = [sum(rk * 0.25 * 10.0 for rk, c in zip(r, calls) if layer in c) for layer in range(4)]
    assert ist.scores.tolist() == pytest.approx(want, abs=1e-12)
    assert ist.updates == 1


def test_rollouts_run_in_eval_mode_without_grad(net):
    ist = ISTController(net, ISTConfig())
    seen = []

    def loss_fn():
        seen.append((net.training, torch.is_grad_enabled()))
        return 1.0

    net.train()
    ist.update_importance(loss_fn, step=10)
    assert seen == [(False, False)] * 3 and net.training


def test_scores_single_out_the_layer_whose_suppression_hurts(tiny_tokenizer):
    # layer 2's adapter carries almost all of the adapters' effect on the output
    net = lora_net(tiny_tokenizer, b_scale={0: 0.002, 1: 0.002, 2: 1.0, 3: 0.002})
    ids = torch.randint(3, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = net(input_ids=ids).logits

    def mse():
        return float(((net(input_ids=ids).logits - target) ** 2).mean())

    ist = ISTController(net, ISTConfig(active_layers=1), seed=0)
    with torch.no_grad():
        with ist.suppressed([2]):
            unit = mse()
        with ist.suppressed([0, 1, 3]):
            rest = mse()
    assert rest < 0.05 * unit  # the setup: suppressing layer 2 costs far more than all others together
    picks_before = Counter(ist.sample(s)[0] for s in range(400))
    for u in range(6):
        ist.update_importance(lambda: 2.0 * mse() / unit, step=10 * (u + 1))
    s = ist.scores.tolist()
    assert s[2] < -2.0 and all(s[2] < s[i] - 2.0 for i in (0, 1, 3)), s
    prob = ist.summary()["first_draw_prob"]  # one active layer: the selection probability
    assert prob[2] > 0.5 and all(prob[2] > prob[i] + 0.2 for i in (0, 1, 3)), prob  # uniform: 0.25
    picks = Counter(ist.sample(s)[0] for s in range(1000, 1400))
    assert picks[2] > 200 and picks_before[2] < 130, (picks, picks_before)  # uniform: 100 of 400


def test_nan_loss_leaves_scores_unchanged(net):
    ist = ISTController(net, ISTConfig())
    rec = ist.update_importance(lambda: float("nan"), step=10)
    assert rec["rewards"] is None and ist.updates == 0 and ist.scores.abs().sum() == 0


def test_saturated_scores_do_not_hang_the_rollouts(net, caplog):
    ist = ISTController(net, ISTConfig(), seed=1)
    ist.scores[:] = torch.tensor([6.0, 6.0, -6.0, -6.0], dtype=torch.float64)  # near the scores' saturation
    calls: list = []
    ist.update_importance(synthetic_loss(ist, {}, calls), step=10)
    assert len({tuple(c) for c in calls}) == 3  # still distinct sets, as in the reference
    # beyond any reachable score a set may repeat: the reference would redraw forever here
    ist.scores[:] = torch.tensor([30.0, 30.0, -30.0, -30.0], dtype=torch.float64)
    calls.clear()
    ist.update_importance(synthetic_loss(ist, {}, calls), step=20)
    assert len(calls) == 3 and "repeating one" in caplog.text


# -- determinism and resume ----------------------------------------------------------------------


def run(ist: ISTController, steps: range, cost: dict) -> list:
    """The loop's calls: sample + activate each step, an importance update when due."""
    picks = []
    for step in steps:
        active = ist.sample(step)
        ist.activate(active)
        picks.append(active)
        if ist.due(step + 1, 10_000):
            ist.update_importance(synthetic_loss(ist, cost), step=step + 1)
    return picks


def test_same_seed_same_scores_and_choices_and_resume_repeats_them(net):
    cost = {0: 0.3, 1: 0.1, 2: 1.5, 3: 0.0}
    cfg = ISTConfig(update_every=2)
    a = ISTController(net, cfg, seed=11)
    picks_a = run(a, range(40), cost)
    b = ISTController(net, cfg, seed=11)
    assert run(b, range(40), cost) == picks_a and torch.equal(a.scores, b.scores)
    c = ISTController(net, cfg, seed=12)
    assert run(c, range(40), cost) != picks_a
    # stop after 17 steps, restore into a fresh controller, continue
    d = ISTController(net, cfg, seed=11)
    first = run(d, range(17), cost)
    e = ISTController(net, cfg, seed=11)
    e.load_state_dict(d.state_dict())
    assert first + run(e, range(17, 40), cost) == picks_a
    assert torch.equal(e.scores, a.scores) and torch.equal(e.selected_count, a.selected_count)
    assert e.updates == a.updates == 20 and e.summary() == a.summary()


def test_checkpoint_of_another_layout_is_refused(net, tiny_tokenizer):
    state = ISTController(net, ISTConfig()).state_dict()
    other = ISTController(lora_net(tiny_tokenizer, layers=3), ISTConfig())
    with pytest.raises(ConfigError, match="checkpoints"):
        other.load_state_dict(state)


# -- rst -----------------------------------------------------------------------------------------


def test_rst_stays_uniform_and_never_measures(net):
    ist = ISTController(net, ISTConfig(mode="rst", active_layers=1), seed=2)

    def loss_fn():
        raise AssertionError("rst must not run rollouts")

    picks = []
    for step in range(400):
        picks.append(ist.sample(step)[0])
        assert not ist.due(step + 1, 10_000)
        if (step + 1) % 10 == 0:
            assert ist.update_importance(loss_fn, step=step + 1) is None
    assert ist.scores.abs().sum() == 0 and ist.updates == 0
    freq = Counter(picks)
    assert set(freq) == {0, 1, 2, 3} and max(freq.values()) - min(freq.values()) < 50  # 100 expected each
    summary = ist.summary()
    assert summary["mode"] == "rst" and summary["first_draw_prob"] == [0.25] * 4
