"""Tests for amstream.blocks: decomposition of nn.Sequential models into AM blocks.

Oracle: the blocks must compute exactly what the model computes (torch.equal), share its modules,
and group layers as described in the module docstring (reference ``altmin.get_mods``).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from amstream.blocks import (Block, Blocks, Sign, Step, StraightThrough, UnsupportedModelError,
                             blocks_from_sequential)


# ----------------------------------------------------------------------------------- models
def mlp(bn: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    dims = [784, 100, 100]
    for d_in, d_out in zip(dims[:-1], dims[1:]):
        layers.append(nn.Linear(d_in, d_out))
        if bn:
            layers.append(nn.BatchNorm1d(d_out))
        layers.append(nn.ReLU())
    layers.append(nn.Linear(100, 10))
    return nn.Sequential(*layers)


def lenet() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, 10),
    )


def nested() -> nn.Sequential:
    return nn.Sequential(
        nn.Sequential(nn.Flatten(), nn.Linear(20, 16)),
        nn.Sequential(nn.Tanh(), nn.Sequential(nn.Linear(16, 12), nn.BatchNorm1d(12))),
        nn.Sigmoid(),
        nn.Sequential(nn.Linear(12, 5)),
    )


def binary_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 16), Sign(),
        nn.Linear(16, 12), StraightThrough(nn.Hardtanh()),
        nn.Linear(12, 8), Step(),
        nn.Linear(8, 3),
    )


def trailing() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5), nn.Dropout(0.0),
                         nn.LogSoftmax(dim=1))


def _check_equal(model: nn.Module, x: torch.Tensor, expected_shapes: list[tuple[int, ...]]):
    blocks = blocks_from_sequential(model)
    assert isinstance(blocks, Blocks)
    with torch.no_grad():
        codes, out = blocks.forward_with_codes(x)
        ref = model(x)
    assert torch.equal(out, ref)
    assert torch.equal(blocks(x), ref)
    assert [tuple(c.shape) for c in codes] == expected_shapes
    assert len(blocks.hidden) == len(expected_shapes)
    return blocks, codes


# ------------------------------------------------------------------------ blocks equal model
def test_mlp_equals_model():
    x = torch.randn(8, 1, 28, 28)
    blocks, codes = _check_equal(mlp(), x, [(8, 100), (8, 100)])
    assert len(blocks) == 3
    # Codes are pre-activations: they have negative entries (a ReLU would have clipped them).
    assert all((c < 0).any() for c in codes)


def test_mlp_codes_are_linear_outputs():
    model = mlp()
    x = torch.randn(8, 1, 28, 28)
    codes, _ = blocks_from_sequential(model).forward_with_codes(x)
    c1 = model[1](x.flatten(1))
    c2 = model[3](torch.relu(c1))
    assert torch.equal(codes[0], c1)
    assert torch.equal(codes[1], c2)


def test_mlp_batchnorm_train_mode_equals_model():
    base = mlp(bn=True).train()
    m_blocks, m_ref = copy.deepcopy(base), copy.deepcopy(base)
    blocks = blocks_from_sequential(m_blocks)
    x = torch.randn(16, 1, 28, 28)
    codes, out = blocks.forward_with_codes(x)
    ref = m_ref(x)
    assert torch.equal(out, ref)
    assert [tuple(c.shape) for c in codes] == [(16, 100), (16, 100)]
    # Post-BN codes in train mode: every unit has (batch) mean ~0 and biased variance ~1.
    for c in codes:
        assert torch.allclose(c.mean(0), torch.zeros(100), atol=1e-5)
        assert torch.allclose(c.var(0, unbiased=False), torch.ones(100), atol=1e-3)
    # The running statistics moved identically in both copies (one forward pass each).
    for bn_b, bn_r in zip([m for m in m_blocks if isinstance(m, nn.BatchNorm1d)],
                          [m for m in m_ref if isinstance(m, nn.BatchNorm1d)]):
        assert torch.equal(bn_b.running_mean, bn_r.running_mean)
        assert torch.equal(bn_b.running_var, bn_r.running_var)
        assert int(bn_b.num_batches_tracked) == 1


def test_mlp_batchnorm_eval_mode_equals_model():
    model = mlp(bn=True)
    # Give the BN layers non-trivial running statistics first.
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    blocks, _ = _check_equal(model, x, [(8, 100), (8, 100)])
    assert blocks.has_batchnorm
    assert not blocks_from_sequential(mlp()).has_batchnorm


def test_lenet_equals_model():
    x = torch.randn(4, 1, 28, 28)
    blocks, codes = _check_equal(lenet(), x, [(4, 6, 28, 28), (4, 16, 10, 10), (4, 120), (4, 84)])
    assert [c.dim() for c in codes] == [4, 4, 2, 2]
    assert isinstance(blocks[0].weight_layer, nn.Conv2d)
    assert isinstance(blocks[1].weight_layer, nn.Conv2d)
    assert [type(m) for m in blocks[1].pre] == [nn.ReLU, nn.MaxPool2d]
    assert [type(m) for m in blocks[2].pre] == [nn.ReLU, nn.MaxPool2d, nn.Flatten]
    assert len(blocks[0].pre) == 0


def test_nested_sequential_equals_model():
    model = nested().eval()
    x = torch.randn(6, 4, 5)
    blocks, _ = _check_equal(model, x, [(6, 16), (6, 12)])
    assert [type(m) for m in blocks[1].lin] == [nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in blocks[1].pre] == [nn.Tanh]
    assert [type(m) for m in blocks[2].pre] == [nn.Sigmoid]
    # Nested train mode too (fresh copies for the running stats).
    m1, m2 = copy.deepcopy(model).train(), copy.deepcopy(model).train()
    assert torch.equal(blocks_from_sequential(m1)(x), m2(x))


def test_sign_and_straight_through_network_equals_model():
    x = torch.randn(10, 20)
    blocks, codes = _check_equal(binary_net(), x, [(10, 16), (10, 12), (10, 8)])
    assert [type(m) for m in blocks[1].pre] == [Sign]
    assert [type(m) for m in blocks[2].pre] == [StraightThrough]
    assert [type(m) for m in blocks[3].pre] == [Step]
    # With gradients enabled (straight-through path) the values are the same.
    xg = x.clone().requires_grad_(True)
    assert torch.equal(blocks(xg), binary_net_like(blocks)(xg))


def binary_net_like(blocks: Blocks):
    """The model recomposed from the blocks' modules, in order (the blocks share them)."""
    mods = [m for b in blocks for part in (b.pre, b.lin, b.post) for m in part]
    return nn.Sequential(*mods)


def test_trailing_modules_equal_model_and_land_in_post():
    model = trailing().eval()
    x = torch.randn(7, 20)
    blocks, _ = _check_equal(model, x, [(7, 16)])
    out = blocks.output
    assert [type(m) for m in out.post] == [nn.Dropout, nn.LogSoftmax]
    assert [type(m) for m in out.lin] == [nn.Linear]
    assert all(len(b.post) == 0 for b in blocks.hidden)
    # The output is a log-probability: rows exp-sum to 1.
    assert torch.allclose(blocks(x).exp().sum(1), torch.ones(7), atol=1e-6)


def test_prelu_is_accepted_and_equals_model():
    model = nn.Sequential(nn.Linear(10, 8), nn.PReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[1].weight.fill_(0.3)
    x = torch.randn(5, 10)
    blocks, _ = _check_equal(model, x, [(5, 8)])
    assert [type(m) for m in blocks.output.pre] == [nn.PReLU]
    # The PReLU's parameter belongs to the output block.
    assert any(p is model[1].weight for p in blocks.output.parameters())


# --------------------------------------------------------------------------------- grouping
def test_grouping_linear_batchnorm_is_one_code_layer():
    model = mlp(bn=True)
    blocks = blocks_from_sequential(model)
    assert len(blocks) == 3
    b0, b1, out = blocks
    assert [type(m) for m in b0.pre] == [nn.Flatten]
    assert [type(m) for m in b0.lin] == [nn.Linear, nn.BatchNorm1d]
    assert len(b0.lin) == 2
    assert [type(m) for m in b1.pre] == [nn.ReLU]
    assert [type(m) for m in b1.lin] == [nn.Linear, nn.BatchNorm1d]
    assert [type(m) for m in out.pre] == [nn.ReLU]
    assert [type(m) for m in out.lin] == [nn.Linear]
    assert len(out.post) == 0
    assert b0.weight_layer is model[1]
    assert b1.weight_layer is model[4]
    assert out.weight_layer is model[7]
    assert b0.batchnorms == [model[2]]
    assert out.batchnorms == []
    assert [b.index for b in blocks] == [0, 1, 2]
    assert blocks.output is out
    assert blocks.hidden == [b0, b1]
    assert b0.describe() == "Flatten -> Linear -> BatchNorm1d"


def test_block_parameters_cover_model_parameters_once():
    model = mlp(bn=True)
    blocks = blocks_from_sequential(model)
    block_params = [p for b in blocks for p in b.parameters()]
    model_params = list(model.parameters())
    assert len(block_params) == len(model_params)
    assert {id(p) for p in block_params} == {id(p) for p in model_params}
    # Frozen parameters are not returned.
    model[1].bias.requires_grad_(False)
    assert all(p is not model[1].bias for p in blocks[0].parameters())
    assert len(blocks[0].parameters()) == 3  # W1, BN weight, BN bias


def test_block_call_is_lin_of_pre():
    model = mlp()
    blocks = blocks_from_sequential(model)
    c = torch.randn(3, 100)
    b = blocks[1]
    assert isinstance(b, Block)
    assert torch.equal(b(c), model[3](torch.relu(c)))


def test_batchnorm_only_code_layer_has_no_weight_layer():
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    blocks = blocks_from_sequential(model)
    assert len(blocks) == 3
    assert blocks[1].weight_layer is None
    assert blocks[1].batchnorms == [model[2]]


# ----------------------------------------------------------------------------------- sharing
def test_blocks_share_model_modules():
    model = mlp()
    blocks = blocks_from_sequential(model)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        before = model(x).clone()
        blocks[0].weight_layer.weight.mul_(2.0)
        after = model(x)
    assert not torch.allclose(before, after)
    assert blocks[0].weight_layer.weight is model[1].weight
    with torch.no_grad():
        assert torch.equal(blocks(x), after)


def test_training_blocks_trains_model():
    model = mlp()
    blocks = blocks_from_sequential(model)
    x = torch.randn(4, 1, 28, 28)
    opt = torch.optim.SGD(blocks.output.parameters(), lr=0.1)
    w_before = model[-1].weight.detach().clone()
    blocks(x).square().sum().backward()
    opt.step()
    assert not torch.equal(model[-1].weight, w_before)


# ------------------------------------------------------------------------------------ errors
class NotSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(x)


@pytest.mark.parametrize("model", [NotSequential(), nn.Linear(3, 2), nn.ModuleList([nn.Linear(3, 2)])],
                         ids=["custom", "linear", "modulelist"])
def test_non_sequential_is_refused(model):
    with pytest.raises(UnsupportedModelError) as info:
        blocks_from_sequential(model)
    assert type(model).__name__ in str(info.value)
    assert "Sequential" in str(info.value)


class _LastOutput(nn.Module):
    def forward(self, x):
        return x[0] if isinstance(x, tuple) else x


@pytest.mark.parametrize(
    "layer, name",
    [
        (nn.LSTM(8, 8, batch_first=True), "LSTM"),
        (nn.Embedding(10, 8), "Embedding"),
        (nn.LayerNorm(8), "LayerNorm"),
        (nn.GRU(8, 8), "GRU"),
    ],
    ids=["lstm", "embedding", "layernorm", "gru"],
)
def test_parameterized_non_code_layer_is_refused(layer, name):
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), layer, _LastOutput(), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError) as info:
        blocks_from_sequential(model)
    assert name in str(info.value)


def test_nested_parameterized_layer_is_refused():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), nn.LayerNorm(8)), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="LayerNorm"):
        blocks_from_sequential(model)


def test_attention_is_refused():
    """The module docstring promises attention is refused. nn.MultiheadAttention lives in
    torch.nn.modules.activation, so the "is an activation" shortcut in ``_check_layer`` lets it
    through (bug: see report)."""
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2), nn.Linear(8, 2))
    with pytest.raises(UnsupportedModelError, match="MultiheadAttention"):
        blocks_from_sequential(model)


def test_unsupported_error_is_value_error():
    assert issubclass(UnsupportedModelError, ValueError)
    with pytest.raises(ValueError):
        blocks_from_sequential(nn.Sequential(nn.Linear(3, 3), nn.Embedding(3, 3)))


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.Flatten(), nn.ReLU()), nn.Sequential(), nn.Sequential(nn.BatchNorm1d(4), nn.ReLU())],
    ids=["activations", "empty", "batchnorm-only"],
)
def test_model_without_linear_or_conv_is_refused(model):
    with pytest.raises(UnsupportedModelError, match="Linear or Conv"):
        blocks_from_sequential(model)


def test_parameter_free_container_is_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ModuleList([nn.ReLU()]), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="ModuleList"):
        blocks_from_sequential(model)


# ----------------------------------------------------------------------- straight-through
def test_sign_forward_and_straight_through_gradient():
    x = torch.tensor([-2.0, -0.5, 0.0, 0.3, 4.0], requires_grad=True)
    y = Sign()(x)
    assert torch.equal(y.detach(), torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    (g,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(g, torch.ones(5))


def test_sign_gradient_on_random_batch_is_ones():
    x = torch.randn(7, 9, requires_grad=True)
    Sign()(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(7, 9))


def test_step_outputs_zero_one_and_identity_gradient():
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = Step()(x)
    assert y.dtype == torch.float64
    assert set(y.detach().unique().tolist()) == {0.0, 1.0}
    assert torch.equal(y.detach(), (x.detach() >= 0).double())
    v = torch.randn(6, 5, dtype=torch.float64)
    (g,) = torch.autograd.grad((y * v).sum(), x)
    assert torch.equal(g, v)


@pytest.mark.parametrize("act", [nn.Hardtanh(), nn.ReLU(), nn.Tanh()], ids=["hardtanh", "relu", "tanh"])
def test_straight_through_forward_equals_activation_and_backward_is_identity(act):
    x = (3 * torch.randn(5, 8)).requires_grad_(True)
    y = StraightThrough(act)(x)
    assert torch.equal(y.detach(), act(x.detach()))
    v = torch.randn(5, 8)
    (g,) = torch.autograd.grad((y * v).sum(), x)
    assert torch.equal(g, v)
    # The true gradient of the activation differs (saturation or the tanh slope), so the
    # identity above is not an accident.
    (g_true,) = torch.autograd.grad((act(x) * v).sum(), x)
    assert not torch.equal(g_true, v)


@pytest.mark.parametrize("module", [Sign(), Step(), StraightThrough(nn.Hardtanh())],
                         ids=["sign", "step", "straight-through"])
def test_straight_through_modules_under_no_grad(module):
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        y = module(x)
    assert y.grad_fn is None
    assert not y.requires_grad
    with torch.enable_grad():
        y_grad = module(x)
    assert torch.equal(y, y_grad.detach())
    # A tensor that does not require grad also works with grad enabled.
    assert torch.equal(module(x.detach()), y)


def test_straight_through_crosses_sign_in_a_network():
    """A code update differentiates through Sign: the gradient w.r.t. the input is W2^T v (W1
    is crossed by identity), not zero."""
    model = nn.Sequential(nn.Linear(4, 3), Sign(), nn.Linear(3, 2))
    x = torch.randn(5, 4, requires_grad=True)
    v = torch.randn(5, 2)
    (g,) = torch.autograd.grad((model(x) * v).sum(), x)
    expected = v @ model[2].weight @ model[0].weight
    assert torch.allclose(g, expected, atol=1e-6)
    assert g.abs().sum() > 0
