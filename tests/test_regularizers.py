"""Regularizer values and gradients against hand-computed cases and independent numpy / paper-code references."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer import quant  # noqa: E402
from optimizer.errors import UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    SparsityRegularizer,
    Term,
    TrainConfig,
    Trainer,
    bitslice_l1,
    group_hoyer_square,
    group_lasso,
    hoyer,
    hoyer_square,
    l1,
    magnitude_slices,
    threshold_masks,
    zero_filters,
    zero_input_channels,
)


def value_and_grad(fn, w, *args, **kwargs):
    w = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    value = fn(w, *args, **kwargs)
    value.backward()
    return float(value.detach()), w.grad.numpy()


def test_l1_hand_case():
    value, grad = value_and_grad(l1, [[1.0, -2.0], [0.0, 3.0]])
    assert value == 6.0
    np.testing.assert_array_equal(grad, [[1, -1], [0, 1]])


def test_group_lasso_filter_and_channel_hand_cases():
    value, grad = value_and_grad(group_lasso, [[3.0, 4.0], [0.0, 0.0]], "filter")
    assert value == pytest.approx(5.0)
    np.testing.assert_allclose(grad, [[0.6, 0.8], [0.0, 0.0]])  # an all-zero group gets the zero subgradient
    value, grad = value_and_grad(group_lasso, [[3.0, 0.0], [4.0, 0.0]], "channel")
    assert value == pytest.approx(5.0)
    np.testing.assert_allclose(grad, [[0.6, 0.0], [0.8, 0.0]])


def numpy_group_lasso(w: np.ndarray, axes: tuple[int, ...]) -> float:
    """Loop over every group index explicitly (independent of the vectorised implementation)."""
    total = 0.0
    for index in np.ndindex(*[w.shape[a] for a in axes]):
        selector = [slice(None)] * w.ndim
        for axis, i in zip(axes, index, strict=True):
            selector[axis] = i
        total += np.sqrt(np.sum(w[tuple(selector)] ** 2))
    return total


@pytest.mark.parametrize(
    "shape, spec, axes",
    [
        ((4, 3, 5), "filter", (0,)),
        ((4, 3, 5), "channel", (1,)),  # Conv1d / TDNN: input neuron across all time offsets
        ((4, 3, 2, 2), "shape", (1, 2, 3)),
        ((4, 3, 2, 2), (0, 1), (0, 1)),  # one group per (filter, channel) kernel
    ],
    ids=["conv1d-filter", "conv1d-channel", "conv2d-shape", "conv2d-kernel"],
)
def test_group_lasso_matches_loop_reference(shape, spec, axes):
    w = np.random.default_rng(0).normal(size=shape)
    value = float(group_lasso(torch.tensor(w), spec))
    assert value == pytest.approx(numpy_group_lasso(w, axes), rel=1e-12)


def test_group_lasso_attached_joins_filter_groups():
    w = torch.tensor([[3.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    attached = torch.tensor([[4.0], [0.0]], dtype=torch.float64)  # e.g. the following BatchNorm's gamma
    assert float(group_lasso(w, "filter", attached)) == pytest.approx(5.0)
    with pytest.raises(UsageError):
        group_lasso(w, "channel", attached)


def test_hoyer_and_hoyer_square_hand_cases():
    # w = [3, -4]: L1 = 7, L2 = 5
    value, grad = value_and_grad(hoyer, [3.0, -4.0])
    assert value == pytest.approx(7 / 5)
    # d(L1/L2)/dw = sign(w)/L2 - L1 w / L2^3
    np.testing.assert_allclose(grad, [1 / 5 - 7 * 3 / 125, -1 / 5 + 7 * 4 / 125])
    value, grad = value_and_grad(hoyer_square, [3.0, -4.0])
    assert value == pytest.approx(49 / 25)
    # d(L1^2/L2^2)/dw = 2 L1 sign(w) / L2^2 - 2 L1^2 w / L2^4
    np.testing.assert_allclose(grad, [2 * 7 / 25 - 2 * 49 * 3 / 625, -2 * 7 / 25 + 2 * 49 * 4 / 625])


def test_hoyer_square_is_scale_invariant_and_trims_below_l2_squared_over_l1():
    w = torch.tensor([0.05, 1.0, -2.0, 0.3], dtype=torch.float64, requires_grad=True)
    assert float(hoyer_square(7 * w.detach())) == pytest.approx(float(hoyer_square(w.detach())))
    hoyer_square(w).backward()
    threshold = float((w * w).sum().detach() / w.abs().sum().detach())
    shrinks = (w.grad * w.detach()) > 0  # a gradient step moves w towards zero
    np.testing.assert_array_equal(shrinks.numpy(), (w.detach().abs() < threshold).numpy())


def test_all_zero_tensors_are_not_regularized():
    for fn in (hoyer, hoyer_square, group_hoyer_square):
        value, grad = value_and_grad(fn, [[0.0, 0.0], [0.0, 0.0]])
        assert value == 0.0 and not np.any(grad)


def test_group_hoyer_square_shared_denominator_hand_case():
    # rows: norms 5, 0 -> (5)^2 = 25; columns: norms 3, 4 -> (7)^2 = 49; shared ||W||^2 = 25
    value, grad = value_and_grad(group_hoyer_square, [[3.0, 4.0], [0.0, 0.0]])
    assert value == pytest.approx((25 + 49) / 25)
    # differs from both (A + B)^2 / D and a filter-only Group-HS
    assert value != pytest.approx((5 + 7) ** 2 / 25) and value != pytest.approx(25 / 25)
    # gradient: (2 A dA + 2 B dB) / D - (A^2 + B^2) 2 w / D^2, A = 5, B = 7, D = 25
    w = np.array([[3.0, 4.0], [0.0, 0.0]])
    d_rows = np.array([[3 / 5, 4 / 5], [0.0, 0.0]])
    d_cols = np.array([[1.0, 1.0], [0.0, 0.0]])  # w_ij / ||column j|| : 3/3, 4/4; zero entries -> 0
    expected = (2 * 5 * d_rows + 2 * 7 * d_cols) / 25 - 74 * 2 * w / 625
    np.testing.assert_allclose(grad, expected)


def test_group_hoyer_square_matches_numpy_reference_on_conv_weight():
    w = np.random.default_rng(1).normal(size=(4, 3, 3, 3))
    filters = sum(np.linalg.norm(w[f]) for f in range(4))
    channels = sum(np.linalg.norm(w[:, c]) for c in range(3))
    expected = (filters**2 + channels**2) / np.sum(w**2)
    assert float(group_hoyer_square(torch.tensor(w))) == pytest.approx(expected, rel=1e-12)


def test_bitslice_l1_hand_case():
    # bits=8: fl = floor(log2(127 / 1.0)) = 6, step 1/64 -> codes 64, -32, 19, 0
    # 2-bit slices, least significant first: 64 -> [0,0,0,1], 32 -> [0,0,2,0], 19 -> [3,0,1,0]
    value, grad = value_and_grad(bitslice_l1, [1.0, -0.5, 0.3, 0.0])
    assert value == 1 + 2 + 4
    # sign(w) * 2^fl * sum over nonzero slices of 4^-s: 64 * 4^-3, 64 * 4^-2, 64 * (1 + 4^-2), 0
    np.testing.assert_allclose(grad, [1.0, -4.0, 68.0, 0.0])


def paper_bitslice_l1(w: torch.Tensor) -> torch.Tensor:
    """The official code's decomposition (methods.md §4), 8-bit magnitude plus sign, written out literally."""

    def ste_round(x):
        return x + (torch.round(x) - x).detach()

    def ste_floor(x):
        return x + (torch.floor(x) - x).detach()

    s = torch.ceil(torch.log2(w.detach().abs().max()))
    x = ste_round(w.abs() / 2 ** (s - 8))
    b1 = ste_floor(x / 64)
    b2 = ste_floor((x - 64 * b1.detach()) / 16)
    b3 = ste_floor((x - 64 * b1.detach() - 16 * b2.detach()) / 4)
    b4 = x - 64 * b1.detach() - 16 * b2.detach() - 4 * b3.detach()
    return (b1.abs() + b2.abs() + b3.abs() + b4.abs()).sum()


def test_bitslice_l1_matches_the_paper_code_value_and_straight_through_gradient():
    # the paper's 8-bit magnitude + sign is bits=9 here; max|w| = 0.7 is far from a power of two, where
    # the paper's step 2^(ceil(log2 max) - 8) and frac_length agree
    w0 = np.random.default_rng(2).uniform(-0.7, 0.7, size=(6, 5))
    w0[0, 0] = 0.7
    ours = torch.tensor(w0, requires_grad=True)
    theirs = torch.tensor(w0, requires_grad=True)
    value, reference = bitslice_l1(ours, bits=9), paper_bitslice_l1(theirs)
    value.backward()
    reference.backward()
    assert float(value.detach()) == float(reference.detach())
    np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-12)


def test_magnitude_slices_agree_with_quant_split():
    w = np.random.default_rng(3).normal(size=(5, 7))
    slices, fl = magnitude_slices(w, bits=8, cell_bits=2)
    codes = quant.quantize_dfp(w, 8, fl)
    assert slices.shape == (4, 5, 7) and slices.max() <= 3 and slices[3].max() <= 1  # int8: top slice holds 1 bit
    np.testing.assert_array_equal((slices * (4 ** np.arange(4))[:, None, None]).sum(0), np.abs(codes))


def conv_bn_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )


def test_sparsity_regularizer_sums_weighted_terms_over_selected_layers():
    model = conv_bn_net()
    reg = SparsityRegularizer(model, [Term("group_lasso", 0.5, layers=(nn.Conv2d,)), Term("l1", 0.1, name=r"^6$")])
    conv1, bn, conv2, fc = model[0], model[1], model[3], model[6]
    attached1 = torch.stack([conv1.bias, bn.weight, bn.bias], 1)
    expected = 0.5 * (
        group_lasso(conv1.weight, "filter", attached1) + group_lasso(conv1.weight, "channel")
        + group_lasso(conv2.weight, "filter", conv2.bias[:, None]) + group_lasso(conv2.weight, "channel")
    ) + 0.1 * l1(fc.weight)
    assert float(reg().detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    description = reg.describe()
    assert description["layers"]["0"]["attached"] == ["0.bias", "1.weight", "1.bias"]
    assert description["layers"]["3"]["batchnorm"] is None
    assert [t["layers"] for t in description["terms"]] == [["0", "3"], ["6"]]


def test_sparsity_regularizer_per_weight_scaling_and_gradient_flow():
    model = conv_bn_net()
    reg = SparsityRegularizer(model, Term("bitslice_l1", 2.0, per_weight=True, name="^6$"))
    expected = 2.0 * float(bitslice_l1(model[6].weight).detach()) / model[6].weight.numel()
    value = reg()
    assert float(value.detach()) == pytest.approx(expected)
    value.backward()
    assert model[6].weight.grad is not None and model[0].weight.grad is None


def test_sparsity_regularizer_follows_batchnorm_through_relu_in_a_tdnn():
    class Tdnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.frame1 = nn.Conv1d(5, 8, 5)
            self.norm1 = nn.BatchNorm1d(8)
            self.frame2 = nn.Conv1d(8, 8, 3, dilation=2)
            self.segment = nn.Linear(16, 4)

        def forward(self, x):
            x = self.norm1(torch.relu(self.frame1(x)))
            x = torch.relu(self.frame2(x))
            return self.segment(torch.cat([x.mean(-1), x.std(-1)], 1))

    reg = SparsityRegularizer(Tdnn(), Term("group_hoyer_square", 1e-3, name="frame"))
    assert reg.layers["frame1"].norm_name == "norm1" and reg.layers["frame2"].norm_name is None
    assert float(reg().detach()) > 0


def test_sparsity_regularizer_usage_errors():
    model = conv_bn_net()
    with pytest.raises(UsageError, match="no layer"):
        SparsityRegularizer(model, Term("l1", 1.0, name="nothing-matches"))
    with pytest.raises(UsageError, match="unknown regularizer"):
        SparsityRegularizer(model, Term("l3", 1.0))
    with pytest.raises(UsageError, match="regex"):
        SparsityRegularizer(model, Term("l1", 1.0, name="("))
    with pytest.raises(UsageError, match="group spec"):
        SparsityRegularizer(model, Term("group_lasso", 1.0, groups=("rows",)))
    with pytest.raises(UsageError, match="does not fit"):
        SparsityRegularizer(model, Term("group_lasso", 1.0, groups=(5,)))
    with pytest.raises(UsageError, match="cell_bits"):
        SparsityRegularizer(model, Term("bitslice_l1", 1.0, cell_bits=0))


def test_threshold_masks_zero_dead_channels_and_hold_during_training():
    model = conv_bn_net()
    reg = SparsityRegularizer(model, Term("group_lasso", 1.0))
    with torch.no_grad():
        model[0].weight[1].mul_(1e-4)  # filter 1 of conv1 and its bias and BatchNorm gamma are tiny
        model[0].bias[1].mul_(1e-4)
        model[1].weight[1].fill_(1e-4)
        model[1].bias[1].fill_(0.5)  # a filter group's RMS covers beta too: 0.5 / sqrt(12) is above 1e-3
        model[0].weight[2].mul_(1e-4)  # filter 2's weights alone are tiny: zeroed elementwise, then as a dead channel
        model[3].weight[:, 2].mul_(1e-4)  # input channel 2 of conv2 is tiny
    masks = threshold_masks(reg.layers.values(), threshold=1e-3, groups=("element", "channel"))
    assert zero_filters(model[0].weight) == 2 and model[0].bias[1].item() == 0 and model[0].bias[2].item() == 0
    assert model[1].weight[2].item() == 0 and model[1].bias[1].item() == 0
    assert zero_input_channels(model[3].weight) >= 1
    masks.attach()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 1, 4, 4)).square().mean().backward()
        optimizer.step()
        masks.apply()
    assert zero_filters(model[0].weight) == 2 and model[1].weight[1].item() == 0
    model.eval()
    assert model[2](model[1](model[0](torch.randn(2, 1, 4, 4))))[:, 1:3].abs().max().item() == 0.0


def test_threshold_masks_filter_groups_include_batchnorm():
    model = conv_bn_net()
    reg = SparsityRegularizer(model, Term("group_lasso", 1.0))
    with torch.no_grad():
        model[0].weight[1].mul_(1e-4)
        model[0].bias[1].mul_(1e-4)
        model[1].weight[1].fill_(1e-4)
        model[0].weight[3].mul_(1e-4)  # filter 3: gamma is still 1, so its group (RMS 1/sqrt(12)) is kept
    threshold_masks(reg.layers.values(), threshold=1e-3, groups=("filter",))
    assert model[0].weight[1].abs().max().item() == 0 and model[1].bias[1].item() == 0
    assert model[0].weight[3].abs().max().item() > 0 and zero_filters(model[0].weight) == 1


def test_threshold_masks_std_ratio_and_argument_checks():
    model = conv_bn_net()
    layers = SparsityRegularizer(model, Term("l1", 1.0)).layers.values()
    with pytest.raises(UsageError, match="exactly one"):
        threshold_masks(layers)
    weight = model[6].weight.detach().clone()
    threshold_masks(layers, std_ratio=0.5)
    expected_zero = weight.abs() < 0.5 * weight.std()
    np.testing.assert_array_equal((model[6].weight == 0).numpy(), expected_zero.numpy())


def test_zero_input_channels_with_flatten_blocks():
    w = torch.ones(3, 8)
    w[:, 4:] = 0  # the second of two channels, each flattened to 4 features
    assert zero_input_channels(w, block=4) == 1
    assert zero_input_channels(w) == 4


def test_regularizer_threshold_masks_follow_each_terms_groups():
    """Conv1 regularized over filters, conv2 over input channels only, the Linear elementwise: each layer is
    thresholded over exactly those groups, so conv2's tiny filter and the Linear's tiny column stay."""
    model = conv_bn_net()
    reg = SparsityRegularizer(model, [
        Term("group_lasso", 1.0, name=r"^0$", groups=("filter",)),
        Term("group_lasso", 1.0, name=r"^3$", groups=("channel",)),
        Term("l1", 1.0, name=r"^6$"),
    ])  # fmt: skip
    with torch.no_grad():
        model[0].weight[1].mul_(1e-4)
        model[0].bias[1].mul_(1e-4)
        model[1].weight[1].fill_(1e-4)
        model[1].bias[1].fill_(1e-4)
        model[3].weight[:, 2].mul_(1e-4)  # input channel 2 of conv2: tiny
        model[3].weight[4].mul_(1e-4)  # filter 4 of conv2: tiny, but conv2 has no filter term
        model[6].weight[:, 5].fill_(1e-4)  # a column of the Linear: zeroed weight by weight, not as a group
        model[6].weight[0, 0] = 1e-4
    masks = reg.threshold_masks(threshold=1e-3)
    assert zero_filters(model[0].weight) == 1 and model[1].weight[1].item() == 0
    assert zero_input_channels(model[3].weight) == 1 and zero_filters(model[3].weight) == 0
    assert model[3].weight[4].abs().max().item() > 0
    assert (model[6].weight[:, 5] == 0).all() and model[6].weight[0, 0].item() == 0
    assert {name for name, _, _ in masks.entries} >= {"0.weight", "3.weight", "6.weight"}


def test_threshold_then_finetune_regularized_needs_a_regularizer():
    trainer = Trainer(conv_bn_net(), TrainConfig(epochs=1, progress=False))
    with pytest.raises(UsageError, match="needs a trainer with a regularizer"):
        trainer.threshold_then_finetune((torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)),
                                        threshold=1e-3, groups="regularized")
