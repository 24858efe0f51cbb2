"""SBE and SBPCA's oracles: per-sample rows, estimates against torch.linalg.svd, guarded divisions.

The contract every learner shares is checked for SBE and SBPCA by the generated conformance suite.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amstream import SBE, SBPCA, Backprop
from amstream.data import load_digits
from amstream.learners.lowrank import _orthonormal, _rows, _safe
from learner_cases import batches


@pytest.fixture(scope="module")
def digits():
    return load_digits("train")


def low_rank_rows(n: int, n_in: int, n_out: int, strengths: list[float], seed: int = 0, noise: float = 0.0):
    """Rows whose sum of outer products ``D^T X`` has the given singular structure (plus noise): the
    singular vectors are fixed, ``seed`` draws the rows."""
    basis = torch.Generator().manual_seed(1234)
    k = len(strengths)
    p = _orthonormal(torch.randn(n_in, k, generator=basis, dtype=torch.float64))
    q = _orthonormal(torch.randn(n_out, k, generator=basis, dtype=torch.float64))
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, k, generator=g, dtype=torch.float64)
    x = a @ p.T + noise * torch.randn(n, n_in, generator=g, dtype=torch.float64)
    d = (a * torch.tensor(strengths, dtype=torch.float64)) @ q.T
    return x, d


def fresh_estimate(n_out: int, n_in: int, k: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [_orthonormal(torch.randn(n_out, k, generator=g, dtype=torch.float64)), torch.zeros(k, dtype=torch.float64),
            _orthonormal(torch.randn(n_in, k, generator=g, dtype=torch.float64))]


def learner(cls, **kw):
    torch.manual_seed(0)
    return cls(nn.Sequential(nn.Linear(20, 10)), device="cpu", **kw)


def subspace_alignment(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the column spaces (1: the same subspace)."""
    return float(torch.linalg.svdvals(_orthonormal(a).T @ _orthonormal(b)).min())


# ---------------------------------------------------------------------------------- rows
@pytest.mark.parametrize("layer, shape", [
    (nn.Linear(7, 5), (6, 7)),
    (nn.Linear(7, 5, bias=False), (6, 3, 7)),  # extra leading dimensions are more rows
    (nn.Conv2d(3, 4, 3, padding=1, stride=2, dilation=1), (2, 3, 9, 9)),
    (nn.Conv2d(3, 4, (2, 3), padding=(1, 0), dilation=2), (2, 3, 8, 10)),
    (nn.Conv1d(3, 4, 3, padding=2, stride=2), (2, 3, 11)),
])
def test_rows_sum_to_the_batch_gradient(layer, shape):
    """``delta^T x`` over the rows (a Conv layer: samples x positions, by unfold) is exactly the
    weight and bias gradient autograd computes."""
    layer = layer.double()
    inp = torch.randn(*shape, dtype=torch.float64)
    out = layer(inp)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    x, d = _rows(layer, inp, upstream)
    full = d.T @ x
    n_w = layer.weight[0].numel()
    torch.testing.assert_close(full[:, :n_w].reshape(layer.weight.shape), layer.weight.grad)
    if layer.bias is not None:
        torch.testing.assert_close(full[:, n_w], layer.bias.grad)


# ----------------------------------------------------------------------------- estimates
def test_sbe_finds_the_top_singular_triple_of_a_low_rank_sum():
    """SBE's streaming recursion over the rows converges to the top singular pair of the mean
    outer product (2,000 rows of a rank-2 sum, singular values 3 and 1)."""
    x, d = low_rank_rows(2000, 20, 10, [3.0, 1.0])
    u, s, vh = torch.linalg.svd(d.T @ x / len(x))
    sbe = learner(SBE)
    estimate = fresh_estimate(10, 20, 1)
    d_hat, s2, x_hat = sbe._stream(estimate, x, d)
    assert abs(float(d_hat[:, 0] @ u[:, 0])) > 0.999 and abs(float(x_hat[:, 0] @ vh[0])) > 0.999
    assert float(s2) == pytest.approx(float(s[0]), rel=0.01)


def test_sbe_recursion_is_the_papers_formulas():
    """``SBE._stream`` (running means as lerps, each norm taken once) is the recursion of its
    docstring written out term by term, to float64 rounding, from a warm start."""
    x, d = low_rank_rows(300, 20, 10, [3.0, 1.0])
    estimate = fresh_estimate(10, 20, 1, seed=4)
    D, s, X = estimate[0][:, 0] * 2.0, torch.tensor(0.7, dtype=torch.float64), estimate[2][:, 0] * 0.5
    estimate = [D[:, None].clone(), s.reshape(1).clone(), X[:, None].clone()]
    for j, (xj, dj) in enumerate(zip(x, d), start=1):
        X = (j * X + xj * (dj @ D) / D.norm()) / (j + 1)
        D = (j * D + dj * (xj @ X) / X.norm()) / (j + 1)
        s = (j * s + (xj @ (X / X.norm())) * (dj @ (D / D.norm()))) / (j + 1)
    d_hat, s2, x_hat = learner(SBE)._stream(estimate, x, d)
    torch.testing.assert_close(d_hat[:, 0], D / D.norm(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x_hat[:, 0], X / X.norm(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s2[0], s, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sub_batch", [32, 50])
def test_sbpca_finds_the_top_k_singular_triples_of_a_low_rank_sum(sub_batch):
    """SBPCA's sub-batch recursion (QR after each update) recovers a rank-3 sum's singular vectors
    and values, over batches whose estimate is warm-started (the last sub-batch smaller when 50
    does not divide 1,000)."""
    sbpca = learner(SBPCA, rank=3, sub_batch=sub_batch)
    estimate = fresh_estimate(10, 20, 3)
    for seed in range(3):  # three batches of the same distribution
        x, d = low_rank_rows(1000, 20, 10, [4.0, 2.0, 1.0], seed=seed)
        delta, sigma, v = sbpca._stream(estimate, x, d)
    u, s, vh = torch.linalg.svd(d.T @ x / len(x))
    assert subspace_alignment(delta, u[:, :3]) > 0.99 and subspace_alignment(v, vh[:3].T) > 0.99
    torch.testing.assert_close(sigma, s[:3], rtol=0.1, atol=0.0)
    assert [t.data_ptr() for t in estimate] != []  # the state was updated in place
    torch.testing.assert_close(estimate[1], sigma)


def test_power_and_svd_modes_estimate_the_batch_gradient():
    """svd: the exact top-k triples; power: one warm-started block power iteration per batch, which
    converges to them over repeated batches."""
    x, d = low_rank_rows(500, 20, 10, [4.0, 2.0, 1.0], noise=0.05)
    full = d.T @ x
    u, s, vh = torch.linalg.svd(full)
    exact = learner(SBPCA, rank=3, mode="svd")
    eu, es, ev = exact._estimate(fresh_estimate(10, 20, 3), x, d, full)
    torch.testing.assert_close(es, s[:3])
    power = learner(SBPCA, rank=3, mode="power")
    estimate = fresh_estimate(10, 20, 3)
    for _ in range(30):
        pu, ps, pv = power._estimate(estimate, x, d, full)
    assert subspace_alignment(pu, u[:, :3]) > 0.999
    torch.testing.assert_close(ps, s[:3], rtol=1e-3, atol=0.0)


def test_no_division_by_a_vanishing_or_negative_singular_value():
    """Zero gradients, a zero initial sigma and negative sigmas leave every estimate finite."""
    x, d = low_rank_rows(64, 20, 10, [1.0])
    for cls, kw in ((SBE, {}), (SBPCA, {"rank": 3, "sub_batch": 16})):
        model = learner(cls, **kw)
        k = kw.get("rank", 1)
        estimate = fresh_estimate(10, 20, k)
        for rows_d in (torch.zeros_like(d), d, -d):
            out = model._stream(estimate, x, rows_d)
            assert all(torch.isfinite(t).all() for t in (*out, *estimate))
        estimate[1].fill_(-1.0)
        assert all(torch.isfinite(t).all() for t in model._stream(estimate, x, d))
    guarded = _safe(torch.tensor([2.0, 1e-30, -0.5]), torch.tensor([1.0, 3.0, 4.0]))
    torch.testing.assert_close(guarded, torch.tensor([2.0, 3.0, 4.0]))


def test_the_last_smaller_sub_batch_is_used_not_dropped():
    x, d = low_rank_rows(40, 20, 10, [3.0, 1.0])
    sbpca = learner(SBPCA, rank=2, sub_batch=32)
    results = []
    for tail in (d[32:], 5 * d[32:]):  # change only the 8 rows after the last full sub-batch
        out = sbpca._stream(fresh_estimate(10, 20, 2), x, torch.cat([d[:32], tail]))
        results.append(out[1])
    assert not torch.allclose(results[0], results[1])


# ---------------------------------------------------------------------------------- writes
def test_a_full_rank_exact_write_is_a_plain_sgd_step(digits):
    """With the exact SVD and a rank at least the layers' smallest side, the write is the batch
    gradient itself: SBPCA then steps exactly as backprop SGD (explained variance 1)."""
    x, y = batches(digits, n=1)[0]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.Tanh(), nn.Linear(12, 10)).double()
    sbpca = SBPCA(copy.deepcopy(model), rank=12, mode="svd", lr=0.1, device="cpu")
    sgd = Backprop(copy.deepcopy(model), optimizer="sgd", lr=0.1, device="cpu")
    info = sbpca.learn(x.double(), y)
    sgd.learn(x.double(), y)
    for p, q in zip(sbpca.model.parameters(), sgd.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    assert [float(e) for e in info.diagnostics["lowrank/explained_variance"]] == pytest.approx([1.0, 1.0])


def test_a_rank_one_write_changes_each_layer_by_a_rank_one_matrix(digits):
    x, y = batches(digits, n=1)[0]
    torch.manual_seed(0)
    learner_ = SBE(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)).double(), device="cpu")
    before = [m.weight.detach().clone() for m in learner_.model if isinstance(m, nn.Linear)]
    info = learner_.learn(x.double(), y)
    after = [m.weight.detach() for m in learner_.model if isinstance(m, nn.Linear)]
    for b, a in zip(before, after):
        s = torch.linalg.svdvals(a - b)
        assert float(s[1] / s[0]) < 1e-8  # one write, one outer product
    assert all(0.0 <= float(e) <= 1.0 + 1e-6 for e in info.diagnostics["lowrank/explained_variance"])


def test_other_parameters_take_plain_steps_and_a_layer_called_twice_sums_its_rows(digits):
    """A BatchNorm's affine parameters are not outer-product layers: plain SGD on their gradient. A
    Linear layer applied twice (weights shared) gets the rows of both calls."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared, self.norm, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 10)

        def forward(self, x):
            h = x.flatten(1)[:, :8]
            return self.head(self.norm(torch.tanh(self.shared(torch.tanh(self.shared(h))))))

    torch.manual_seed(0)
    model = Twice().double()
    reference = copy.deepcopy(model)
    learner_ = SBPCA(model, rank=10, mode="svd", lr=0.1, device="cpu")
    sgd = Backprop(reference, optimizer="sgd", lr=0.1, device="cpu")
    x, y = batches(digits, n=1)[0]
    learner_.learn(x.double(), y)
    sgd.learn(x.double(), y)
    for p, q in zip(learner_.model.parameters(), sgd.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_a_model_without_outer_product_layers_is_refused():
    with pytest.raises(ValueError, match="needs at least one trainable nn.Linear"):
        SBE(nn.Sequential(nn.GRU(4, 4)), device="cpu")
