"""NoRM: exact SVD of the update, Sim-Search on a constructed example, the reduced adapter loads in PEFT."""
from __future__ import annotations

import pytest
import torch

from domlora.adapters.variants import attach, load_for_eval
from domlora.errors import ConfigError
from domlora.adapters.norm import candidate_ranks, reduce_model, save_reduced, sim_search, subspace_similarity, update_svd

# the reference script's grid for r = 64, step 0.1, range_start 1: int(t * 64) for t = 0.1..0.9, then 64
GRID_R64 = [6, 12, 19, 25, 32, 38, 44, 51, 57, 64]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and the machine's cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def _orthonormal(n, k, g):
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return q


def test_candidate_ranks_match_reference_grid():
    assert [c for _, c in candidate_ranks(64)] == GRID_R64
    assert [c for _, c in candidate_ranks(64, range_start=5)] == [32, 38, 44, 51, 57, 64]
    assert [c for _, c in candidate_ranks(4)] == [1, 2, 3, 4]  # duplicates collapse
    with pytest.raises(ConfigError):
        candidate_ranks(8, step=0)


def test_update_svd_is_exact():
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(6, 20, generator=g), torch.randn(30, 6, generator=g)
    U, S, Vh = update_svd(A, B, scaling=2.0)
    dw = 2.0 * (B @ A).double()
    assert torch.allclose(U @ torch.diag(S) @ Vh, dw, atol=1e-9)
    assert torch.allclose(S, torch.linalg.svdvals(dw)[:6], atol=1e-9)
    assert torch.allclose(U.T @ U, torch.eye(6, dtype=torch.float64), atol=1e-9)


def test_subspace_similarity_bounds():
    g = torch.Generator().manual_seed(0)
    q = _orthonormal(40, 8, g)
    assert subspace_similarity(q[:, :3], q) == pytest.approx(1.0)
    assert subspace_similarity(q[:, :3], q[:, 3:]) == pytest.approx(0.0, abs=1e-12)


class TestSimSearch:
    """Update = k strong directions inside the base weight's top-r subspace + r-k weaker ones outside it."""

    @staticmethod
    def build(k: int, r: int = 10, d_out: int = 48, d_in: int = 40, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        basis = _orthonormal(d_out, d_out, g)
        top, rest = basis[:, :r], basis[:, r:]
        W = top @ torch.diag(torch.linspace(10, 5, r, dtype=torch.float64)) @ _orthonormal(d_in, r, g).T
        W = W + 0.01 * rest[:, :r] @ _orthonormal(d_in, r, g).T
        inside = top[:, :k] @ _orthonormal(k, k, g)          # within span(top)
        outside = rest[:, : r - k]                           # orthogonal to span(top)
        U = torch.cat([inside, outside], 1)
        S = torch.cat([torch.linspace(8, 6, k), torch.linspace(3, 1, r - k)]).double()
        V = _orthonormal(d_in, r, g)
        dw = U @ torch.diag(S) @ V.T
        # factor as LoRA: B (d_out x r), A (r x d_in), scaling 0.5
        B, A = (U @ torch.diag(S)).float(), (2 * V.T).float()
        return A, B, W.float(), dw

    @pytest.mark.parametrize("k", [3, 6])
    def test_keeps_exactly_the_aligned_majority(self, k):
        A, B, W, dw = self.build(k)
        choice = sim_search(A, B, W, scaling=0.5)
        assert choice.kept == k
        assert choice.similarity[k] == pytest.approx(1.0, abs=1e-6)
        assert all(v < 1 - 1e-3 for c, v in choice.similarity.items() if c > k)
        # the kept adapter is the rank-k truncation of the update
        U, S, Vh = torch.linalg.svd(dw)
        trunc = U[:, :k] @ torch.diag(S[:k]) @ Vh[:k]
        assert torch.allclose((choice.B @ choice.A).double(), trunc, atol=1e-4)

    def test_everything_aligned_keeps_full_rank(self):
        A, B, W, _ = self.build(10)
        assert sim_search(A, B, W, scaling=0.5).kept == 10


def test_reduced_adapter_loads_and_matches_truncation(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    base = make_tiny_llama(len(tiny_tokenizer))
    base.save_pretrained(tmp_path / "base")
    tiny_tokenizer.save_pretrained(tmp_path / "base")
    names = ["model.layers.1.mlp.down_proj", "model.layers.2.self_attn.q_proj"]
    m = attach(base, names, variant="norm", rank=8, alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    reduced = reduce_model(m, step=0.25)
    save_reduced(m, reduced, tmp_path / "adapter")
    (tmp_path / "adapter" / "domlora_adapter.json").write_text('{"variant": "norm"}')
    loaded = load_for_eval(str(tmp_path / "base"), tmp_path / "adapter", device="cpu")
    mods = dict(loaded.model.named_modules())
    for n, choice in reduced.items():
        lay = mods[f"base_model.model.{n}"]
        assert lay.r["default"] == choice.kept and lay.scaling["default"] == pytest.approx(1.0)
        orig = dict(m.named_modules())[f"base_model.model.{n}"]
        dw = orig.scaling["default"] * orig.lora_B["default"].weight @ orig.lora_A["default"].weight
        U, S, Vh = torch.linalg.svd(dw.double())
        c = choice.kept
        got = lay.lora_B["default"].weight @ lay.lora_A["default"].weight
        assert torch.allclose(got.double(), U[:, :c] @ torch.diag(S[:c]) @ Vh[:c], atol=1e-4)
