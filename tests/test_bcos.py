"""B-cos layers and the ``bcos`` family: the mathematics pinned on hand-computed cases, exact contributions in 2D/3D."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from explain_toys import single_threaded  # noqa: F401 - a fixture, used through pytestmark
from synthetic import make_batch

from pellucid.models import ModelOptionError, create_model, validate_output
from pellucid.models.bcos import CONTRIBUTIONS, BcosNetwork, box_smooth, positive_share_of_peak
from pellucid.models.bcos_layers import (
    BcosConv,
    BcosLinear,
    PositionNorm,
    UncenteredBatchNorm,
    create_norm,
    encode_inverse,
)
from pellucid.training.elements.evaluator import ExplanationEvaluator
from pellucid.training.elements.transparency import contribution_reconstruction_error, logit_contributions

SIZES = {2: (20, 16), 3: (10, 8, 12)}
pytestmark = pytest.mark.usefixtures("single_threaded")


def unit(x: list[float], w: list[float], b: float) -> float:
    """A B-cos unit through BcosLinear with one output (its weight set to ``w``)."""
    layer = BcosLinear(len(x), 1, b=b)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([w]))
    with torch.no_grad():
        return float(layer(torch.tensor([x]))[0, 0])


# ------------------------------------------------------------------------------------------------ the unit
def test_a_bcos_unit_is_cos_to_the_b_minus_1_times_the_unit_weight_product_by_hand() -> None:
    # x = (3, 4), ||x|| = 5; w = (2, 0) -> ŵ = (1, 0), ŵᵀx = 3, cos = 3/5 = 0.6
    assert unit([3.0, 4.0], [2.0, 0.0], b=1) == pytest.approx(3.0, rel=1e-6)  # B = 1: linear, unit-norm weight
    assert unit([3.0, 4.0], [2.0, 0.0], b=2) == pytest.approx(0.6 * 3.0, rel=1e-6)  # 1.8
    assert unit([3.0, 4.0], [2.0, 0.0], b=3) == pytest.approx(0.36 * 3.0, rel=1e-6)  # 1.08
    # w = (1, 1) -> ŵᵀx = 7/√2, cos = 7/(5√2); B = 2: (7/√2)² / 5 = 49/10
    assert unit([3.0, 4.0], [1.0, 1.0], b=2) == pytest.approx(4.9, rel=1e-6)
    # w = (0, -1) -> ŵᵀx = -4, cos = -0.8: the sign stays, |cos| scales: 0.8 · (-4) = -3.2
    assert unit([3.0, 4.0], [0.0, -1.0], b=2) == pytest.approx(-3.2, rel=1e-6)
    # three elements: x = (1, 2, 2), ||x|| = 3; w = (0, 3, 4) -> ŵ = (0, 0.6, 0.8), ŵᵀx = 2.8, cos = 2.8/3
    assert unit([1.0, 2.0, 2.0], [0.0, 3.0, 4.0], b=2) == pytest.approx(2.8 * 2.8 / 3.0, rel=1e-6)  # 2.61333
    assert unit([1.0, 2.0, 2.0], [0.0, 3.0, 4.0], b=2.5) == pytest.approx((2.8 / 3.0) ** 1.5 * 2.8, rel=1e-6)


def test_the_weight_scale_does_not_matter_and_aligned_inputs_pass_unchanged() -> None:
    assert unit([1.0, 2.0, 2.0], [0.0, 30.0, 40.0], b=2) == pytest.approx(unit([1.0, 2.0, 2.0], [0.0, 3.0, 4.0], b=2))
    assert unit([1.0, 2.0, 2.0], [1.0, 2.0, 2.0], b=2) == pytest.approx(3.0, rel=1e-6)  # cos = 1: ŵᵀx = ||x|| = 3


def test_explanation_mode_keeps_the_value_and_makes_the_gradient_the_dynamic_weight() -> None:
    layer = BcosLinear(3, 2, b=2)
    x = torch.tensor([[1.0, 2.0, 2.0]], requires_grad=True)
    plain, detached = layer(x), layer(x, detach=True)
    torch.testing.assert_close(plain, detached, rtol=0, atol=0)
    (gradient,) = torch.autograd.grad(detached[0, 0], x)
    w_hat = layer.weight[0] / layer.weight[0].norm()
    cosine = (w_hat @ x[0]) / x[0].norm()
    torch.testing.assert_close(gradient[0], cosine.abs() * w_hat)  # W(x) = |cos|^(B-1) ŵ
    torch.testing.assert_close((gradient * x).sum(), detached[0, 0])  # the contributions sum to the output
    (plain_gradient,) = torch.autograd.grad(plain[0, 0], x)
    assert not torch.allclose(plain_gradient, gradient)  # training differentiates through the scale


def test_max_out_takes_the_larger_of_its_units() -> None:
    layer = BcosLinear(2, 1, b=2, max_out=2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    with torch.no_grad():
        assert float(layer(torch.tensor([[3.0, 4.0]]))[0, 0]) == pytest.approx(4.9, rel=1e-6)  # max(1.8, 4.9)


def test_bad_b_and_max_out_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"b must be a finite number >= 1.*got 0.5"):
        BcosConv(2, 1, 1, b=0.5)
    with pytest.raises(ValueError, match=r"max_out must be an integer >= 1, got 0"):
        BcosLinear(2, 1, max_out=0)
    with pytest.raises(ValueError, match=r"spatial_dims must be 1, 2 or 3, got 4"):
        BcosConv(4, 1, 1)


# ------------------------------------------------------------------------------------------------ the conv
@pytest.mark.parametrize(("kernel", "stride", "b"), [(3, 1, 2.0), (3, 2, 2.0), (1, 1, 2.0), (3, 2, 3.0)])
def test_a_bcos_conv_is_the_unit_applied_to_every_zero_padded_patch(kernel: int, stride: int, b: float) -> None:
    torch.manual_seed(0)
    conv = BcosConv(2, 3, 4, kernel, stride, b=b)
    x = torch.randn(2, 3, 7, 6)
    patches = F.unfold(x, kernel, padding=kernel // 2, stride=stride).transpose(1, 2)  # (B, L, C·k·k)
    w_hat = conv.weight.flatten(1) / conv.weight.flatten(1).norm(dim=1, keepdim=True)  # (O, C·k·k)
    linear = patches @ w_hat.T
    cosine = linear / (patches.square().sum(dim=2, keepdim=True) + 1e-6).sqrt()
    expected = (cosine.abs() ** (b - 1) * linear).transpose(1, 2)
    out = conv(x)
    assert out.shape == (2, 4, *[(s + 2 * (kernel // 2) - kernel) // stride + 1 for s in (7, 6)])
    torch.testing.assert_close(out.flatten(2), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [1, 3])
def test_1d_and_3d_convs_match_the_unit_at_a_patch(spatial_dims: int) -> None:
    torch.manual_seed(0)
    conv = BcosConv(spatial_dims, 2, 3, 3, 1)
    x = torch.randn(1, 2, *[5] * spatial_dims)
    centre = (2,) * spatial_dims
    patch = x[(0, slice(None), *[slice(c - 1, c + 2) for c in centre])].reshape(-1)
    w_hat = conv.weight.flatten(1) / conv.weight.flatten(1).norm(dim=1, keepdim=True)
    linear = w_hat @ patch
    expected = (linear / patch.norm()).abs() * linear
    torch.testing.assert_close(conv(x)[(0, slice(None), *centre)], expected, rtol=1e-5, atol=1e-6)


def test_a_conv_patch_at_the_border_counts_only_its_real_pixels() -> None:
    conv = BcosConv(2, 1, 1, 3, 1)
    with torch.no_grad():
        conv.weight.fill_(1.0)  # ŵ = 1/3 everywhere (9 taps)
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 0, 0] = 2.0  # the corner patch holds one non-zero pixel: ŵᵀx = 2/3, ||x|| = 2, cos = 1/3
    with torch.no_grad():
        assert float(conv(x)[0, 0, 0, 0]) == pytest.approx((1 / 3) * (2 / 3), rel=1e-5)


# ------------------------------------------------------------------------------------------ norms, encoding
def test_the_inverse_encoding_is_x_then_one_minus_x() -> None:
    image = torch.tensor([[[[0.0, 0.25], [1.0, 0.6]]]])
    encoded = encode_inverse(image)
    assert encoded.shape == (1, 2, 2, 2)
    torch.testing.assert_close(encoded[0, 0], image[0, 0])
    torch.testing.assert_close(encoded[0, 1], torch.tensor([[1.0, 0.75], [0.0, 0.4]]))
    assert bool((encoded.square().sum(dim=1) > 0).all())  # no pixel of an image in [0, 1] has a zero norm
    model = create_model("bcos", 2, in_channels=3, num_classes=2)
    assert model.encoder.stem.in_channels == 6  # [r, g, b, 1-r, 1-g, 1-b]


def test_uncentered_batch_norm_divides_by_the_standard_deviation_and_never_shifts() -> None:
    norm = UncenteredBatchNorm(2).train()
    x = torch.tensor([[[1.0, 3.0]], [[5.0, 7.0]]]).view(2, 2, 1, 1).repeat(1, 1, 1, 2)  # channel values 1,3 / 5,7
    out = norm(x)
    variance = torch.tensor([4.0, 4.0])  # (1, 5) and (3, 7): mean 3 / 5, variance 4 each
    torch.testing.assert_close(out, x / (variance + norm.eps).sqrt().view(1, 2, 1, 1))
    torch.testing.assert_close(norm.running_var, 0.9 * torch.ones(2) + 0.1 * variance)
    before = norm.running_var.clone()
    norm(x, detach=True)  # explanation mode leaves the running statistics alone
    torch.testing.assert_close(norm.running_var, before)
    norm.eval()
    torch.testing.assert_close(norm(x), x / (before + norm.eps).sqrt().view(1, 2, 1, 1))
    assert norm(torch.zeros(1, 2, 3, 3)).abs().max() == 0  # no shift: zero in, zero out


def test_position_norm_centres_over_channels_and_scales_only() -> None:
    norm = PositionNorm(3)
    x = torch.tensor([1.0, 2.0, 6.0]).view(1, 3, 1, 1)  # mean 3, variance 14/3
    torch.testing.assert_close(norm(x).view(-1), (torch.tensor([-2.0, -1.0, 3.0]) / math.sqrt(14 / 3 + 1e-5)))
    with pytest.raises(ValueError, match=r"norm must be one of \['batch', 'position', 'none'\], got 'group'"):
        create_norm("group", 3)


# -------------------------------------------------------------------------------------------------- model
def build(spatial_dims: int, **kwargs) -> BcosNetwork:
    torch.manual_seed(0)
    return create_model("bcos", spatial_dims, in_channels=1, num_classes=3, **kwargs)


def relative_errors(output) -> torch.Tensor:
    return contribution_reconstruction_error(output.aux[CONTRIBUTIONS], output.logits)


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("norm", ["batch", "position", "none"])
def test_contributions_sum_to_the_logits_on_every_image(spatial_dims: int, norm: str) -> None:
    model = build(spatial_dims, backbone_kwargs={"norm": norm})
    image = torch.rand(3, 1, *SIZES[spatial_dims])
    model.train()
    for _ in range(3):  # move the running statistics away from their start
        model(image, explain=False)
    for mode in ("eval", "train"):
        getattr(model, mode)()
        with torch.no_grad():
            output = model(image)
        contributions = output.aux[CONTRIBUTIONS]
        assert contributions.shape == (3, 3, *SIZES[spatial_dims]) and contributions.dtype == torch.float32
        assert float(relative_errors(output).max()) <= 1e-4, (mode, relative_errors(output))
        assert float(output.logits.abs().min()) > 0  # a relative error over non-trivial logits
        torch.testing.assert_close(model(image, explain=False).logits.detach(), output.logits)


def test_contributions_stay_exact_after_training_steps() -> None:
    model = build(2)
    batch = make_batch(2, batch_size=4)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(5):  # large steps: the logits grow well past their initial scale
        loss = sum(model.loss_terms(model(batch["image"], explain=False), batch).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        output = model(batch["image"])
    assert float(relative_errors(output).max()) <= 1e-4
    assert float(output.logits.abs().max()) > 0.1


def test_the_protocol_and_the_evaluator_report_the_reconstruction() -> None:
    model = build(2).eval()
    batch = make_batch(2, batch_size=4)
    with torch.no_grad():
        output = model(batch["image"])
    assert logit_contributions(model, output) is output.aux[CONTRIBUTIONS]
    assert model.logit_contributions(model(batch["image"], explain=False)) is None  # not explained: nothing
    evaluator = ExplanationEvaluator(deletion_samples=0)
    evaluator.update(model, output, batch)
    error = evaluator.compute().value("contribution_reconstruction_error")
    assert error is not None and error <= 1e-4
    broken = output.detach()
    broken.aux = {CONTRIBUTIONS: output.aux[CONTRIBUTIONS] * 1.01}  # 1 % off: the measure must see it
    assert float(relative_errors(broken).max()) == pytest.approx(0.01, rel=1e-3)
    blackbox = create_model("blackbox", 2, in_channels=1, num_classes=3).eval()
    evaluator = ExplanationEvaluator(deletion_samples=0)
    with torch.no_grad():
        evaluator.update(blackbox, blackbox(batch["image"]), batch)
    assert evaluator.compute().value("contribution_reconstruction_error") is None


def test_contributions_of_a_wrong_shape_are_refused() -> None:
    with pytest.raises(ValueError, match=r"expected \(B, K, \*S\) with \(B, K\) = \(2, 3\), got shape \(2, 4, 5\)"):
        contribution_reconstruction_error(torch.zeros(2, 4, 5), torch.zeros(2, 3))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_localization_is_the_positive_contribution_scaled_to_its_peak(spatial_dims: int) -> None:
    model = build(spatial_dims).eval()
    image = torch.rand(2, 1, *SIZES[spatial_dims])
    with torch.no_grad():
        output = model(image)
    validate_output(output, image, num_classes=3)
    contributions = output.aux[CONTRIBUTIONS]
    positive = contributions.clamp_min(0)
    expected = positive / positive.flatten(2).amax(2).view(2, 3, *[1] * spatial_dims)
    torch.testing.assert_close(output.localization, expected)
    smoothed = build(spatial_dims, localization_smoothing=3).eval()
    with torch.no_grad():
        maps = smoothed(image).localization
    assert float(maps.flatten(2).amax(2).min()) == pytest.approx(1.0)
    assert positive_share_of_peak(-torch.ones(1, 1, 3, 3)).abs().max() == 0  # no positive evidence: all zeros
    torch.testing.assert_close(box_smooth(torch.ones(1, 1, 5, 5), 3)[0, 0, 2, 2], torch.tensor(1.0))


def test_training_forward_skips_the_explanation() -> None:
    model = build(2).train()
    output = model(torch.rand(2, 1, 16, 16), explain=False)
    assert output.localization is None and CONTRIBUTIONS not in output.aux


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("explain", [False, True])
def test_gradients_reach_every_parameter(spatial_dims: int, explain: bool) -> None:
    model = build(spatial_dims, backbone_kwargs={"blocks": [1, 2, 1], "max_out": 2}).train()
    batch = make_batch(spatial_dims, batch_size=2)
    output = model(batch["image"], explain=explain)
    sum(model.loss_terms(output, batch).values()).backward()
    unreached = [name for name, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert unreached == []


def test_the_loss_is_binary_cross_entropy_on_one_hot_targets_by_default() -> None:
    model = build(2)
    logits = torch.tensor([[2.0, -1.0, 0.5]])
    label = torch.tensor([1])
    expected = -(math.log(1 - torch.sigmoid(torch.tensor(2.0))) + math.log(torch.sigmoid(torch.tensor(-1.0)))
                 + math.log(1 - torch.sigmoid(torch.tensor(0.5)))) / 3
    from pellucid.models import ModelOutput

    terms = model.loss_terms(ModelOutput(logits=logits), {"label": label})
    assert float(terms["classification"]) == pytest.approx(expected, rel=1e-6)
    cross_entropy = build(2, loss="cross_entropy").loss_terms(ModelOutput(logits=logits), {"label": label})
    assert float(cross_entropy["classification"]) == pytest.approx(float(F.cross_entropy(logits, label)))


def test_misspelled_encoder_options_name_the_key_and_the_valid_ones() -> None:
    with pytest.raises(ModelOptionError, match=r"model 'bcos': unknown option 'backbone_kwargs.chanels'.*channels"):
        create_model("bcos", 2, backbone_kwargs={"chanels": [8]})
    with pytest.raises(ValueError, match=r"pooling must be 'avg' or 'max', got 'sum'"):
        create_model("bcos", 2, pooling="sum")
