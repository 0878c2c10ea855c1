"""IST controller: per-layer sampling, activation, response suppression, score updates."""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import make_tiny_llama
from domlora.adapters.variants import attach
from domlora.errors import ConfigError
from domlora.adapters.ist import ISTConfig, ISTController
from domlora.modules import find_candidates


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and the machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def net(tiny_tokenizer):
    model = make_tiny_llama(len(tiny_tokenizer), layers=4)
    m = attach(model, [c.name for c in find_candidates(model)], variant="lora", rank=2, alpha=4)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-zero B so that switching adapters off changes the output
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    return m


def test_config_validation():
    with pytest.raises(ConfigError, match="ist_active_layers"):
        ISTConfig(active_layers=2.5)
    with pytest.raises(ConfigError, match="ist_beta"):
        ISTConfig(beta=1.0)
    with pytest.raises(ConfigError, match="ist_update_every"):
        ISTConfig(update_every=0)


def test_k_from_fraction_or_count(net):
    assert ISTController(net, ISTConfig(active_layers=0.25)).k == 1
    assert ISTController(net, ISTConfig(active_layers=0.5)).k == 2
    assert ISTController(net, ISTConfig(active_layers=3)).k == 3
    assert ISTController(net, ISTConfig(active_layers=10)).k == 4


def test_sampling_is_deterministic_distinct_and_uniform_at_start(net):
    ist = ISTController(net, ISTConfig(active_layers=2), seed=5)
    picks = [ist.sample(s) for s in range(400)]
    assert picks == [ISTController(net, ISTConfig(active_layers=2), seed=5).sample(s) for s in range(400)]
    assert all(len(set(p)) == 2 for p in picks)
    freq = Counter(l for p in picks for l in p)
    assert set(freq) == {0, 1, 2, 3}
    assert max(freq.values()) - min(freq.values()) < 80  # 200 expected each


def test_high_score_layer_is_preferred(net):
    ist = ISTController(net, ISTConfig(active_layers=1, temperature=0.05), seed=0)
    ist.scores[2] = 1.0
    assert all(ist.sample(s) == [2] for s in range(50))


def test_activate_only_selected_layers(net):
    ist = ISTController(net, ISTConfig(active_layers=2))
    ist.activate([1, 3])
    for name, p in net.named_parameters():
        if "lora_" in name:
            layer = int(name.split("layers.")[1].split(".")[0])
            assert p.requires_grad == (layer in (1, 3)), name
    ist.activate_all()
    assert all(p.requires_grad for n, p in net.named_parameters() if "lora_" in n)


def test_suppression_gives_base_output_for_those_layers(net):
    ist = ISTController(net, ISTConfig())
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        full = net(input_ids=ids).logits
        with ist.suppressed(ist.layers):
            with net.disable_adapter():
                base = net(input_ids=ids).logits
            off = net(input_ids=ids).logits
        with ist.suppressed([1]):
            part = net(input_ids=ids).logits
        again = net(input_ids=ids).logits
    assert torch.allclose(off, base) and not torch.allclose(full, base)
    assert not torch.allclose(part, full) and not torch.allclose(part, base)
    assert torch.equal(again, full)  # switched back on afterwards


def test_update_moves_scores_towards_reward(net):
    ist = ISTController(net, ISTConfig(beta=0.5))
    r = ist.update([0, 2], loss_full=2.0, loss_suppressed=3.0)
    assert r == pytest.approx(0.5)
    assert ist.scores.tolist() == pytest.approx([0.25, 0.0, 0.25, 0.0])
    ist.update([0], 2.0, 1.0)
    assert ist.scores[0] == pytest.approx(0.5 * 0.25 - 0.25)
    state = ist.state_dict()
    other = ISTController(net, ISTConfig(beta=0.5))
    other.load_state_dict(state)
    assert torch.equal(other.scores, ist.scores)
