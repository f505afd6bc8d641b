"""MoLe's Aug-Conv layer in torch: equal to the convolution on plain data, fixed, and equal to the `mole` pass."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer.errors import UsageError  # noqa: E402
from optimizer.morph import morph, save_key  # noqa: E402
from optimizer.training import AugConv, export, key_for_conv  # noqa: E402
from optimizer.verify import run_ort  # noqa: E402
from passes import PassContext, get_pass  # noqa: E402


@pytest.mark.parametrize(("conv", "sample_shape"), [
    (nn.Conv2d(3, 8, 3, padding=1), (3, 7, 6)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2), (4, 9, 8)),
    (nn.Conv1d(5, 7, 5, padding=2, stride=3, bias=False), (5, 20)),
])  # fmt: skip
@pytest.mark.parametrize("kind", ["orthogonal", "uniform"])
def test_aug_conv_on_morphed_data_is_the_conv_on_plain_data(conv, sample_shape, kind):
    torch.manual_seed(0)
    conv = conv.eval()
    key = key_for_conv(conv, "x", sample_shape, kind=kind, seed=1)
    x = torch.randn(4, *sample_shape)
    with torch.no_grad():
        expected = conv(x)
        plain = AugConv.from_conv(conv, key)(torch.as_tensor(morph(x.numpy(), key)))
        shuffled = AugConv.from_conv(conv, key, permute=True, seed=2)(torch.as_tensor(morph(x.numpy(), key)))
    torch.testing.assert_close(plain, expected, rtol=1e-4, atol=1e-4)
    order = np.random.default_rng(2).permutation(expected.shape[1])
    torch.testing.assert_close(shuffled, expected[:, order], rtol=1e-4, atol=1e-4)
    assert not torch.allclose(shuffled, expected)


def test_aug_conv_is_fixed_and_exports_like_the_mole_pass(tmp_path):
    """The torch layer exported to ONNX and the `mole` pass applied to the exported conv give the same outputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, padding=1)
    key = key_for_conv(conv, "input", (1, 6, 6), seed=3)
    save_key(key, tmp_path / "k.npz")
    morphed_model = nn.Sequential(AugConv.from_conv(conv, key), nn.ReLU()).eval()
    assert list(morphed_model.parameters()) == []  # buffers: an optimizer trains only the layers after it
    exported = export(morphed_model, torch.zeros(1, key.size), tmp_path / "aug.onnx", input_names=["input_morphed"],
                      output_names=["y"])
    plain = export(nn.Sequential(conv, nn.ReLU()).eval(), torch.zeros(1, 1, 6, 6), tmp_path / "plain.onnx",
                   input_names=["input"], output_names=["y"])
    by_pass, _ = get_pass("mole").from_spec({"key": str(tmp_path / "k.npz")}).run(plain, PassContext())
    x = np.random.default_rng(4).standard_normal((3, 1, 6, 6)).astype(np.float32)
    feeds = {"input_morphed": morph(x, key)}
    np.testing.assert_allclose(run_ort(exported, feeds)["y"], run_ort(by_pass, feeds)["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run_ort(exported, feeds)["y"], run_ort(plain, {"input": x})["y"], rtol=1e-4,
                               atol=1e-4)


def test_aug_conv_rejects_what_it_cannot_fold():
    with pytest.raises(UsageError, match="explicit zero padding"):
        key_for_conv(nn.Conv2d(1, 2, 3, padding="same"), "x", (1, 5, 5))
    with pytest.raises(UsageError, match="explicit zero padding"):
        key_for_conv(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "x", (1, 5, 5))
    with pytest.raises(UsageError, match="do not fit"):
        key_for_conv(nn.Conv2d(3, 2, 3), "x", (1, 5, 5))
    key = key_for_conv(nn.Conv2d(1, 2, 3, padding=1), "x", (1, 5, 5), seed=0)
    with pytest.raises(UsageError, match="padded"):
        AugConv.from_conv(nn.Conv2d(1, 2, 3, padding=0), key)
