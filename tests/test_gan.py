"""The conditional transferring-features GAN: network shapes, hinge and rotation losses on hand cases, the seeded
degradation and HQ/LQ protocol, the class prior, the FID/diversity metrics against closed forms and real digits, a
tiny seeded training run, and the exported generator against ONNX Runtime."""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer.errors import UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    ClassPrior,
    Degradation,
    GANConfig,
    GanSampler,
    Generator,
    Judge,
    ProjectionDiscriminator,
    TransferConfig,
    degrade,
    discriminator_hinge_loss,
    diversity_ratio,
    frechet_distance,
    generation_metrics,
    generator_hinge_loss,
    mean_pairwise_distance,
    quality_pools,
    recalibrate,
    rotate,
    rotation_loss,
    train_gan,
    train_transfer,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def digits():
    from samples.digits.digits_cnn import load_split

    return tuple(torch.from_numpy(a) for a in load_split())


@pytest.fixture(scope="module")
def judge(digits):
    """The digits CNN, 4 epochs on the real training split (enough for >90% test accuracy)."""
    from samples.digits.digits_cnn import make_model, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x_train, _, y_train, _ = digits
    model = train(make_model(), x_train.numpy(), y_train.numpy(), epochs=4, seed=0)
    torch.set_num_threads(threads)
    return Judge.from_sequential(model)


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("features", [0, 6], ids=lambda f: f"features={f}")
def test_generator_and_discriminator_shapes(size, features):
    torch.manual_seed(0)
    g = Generator(10, z_dim=8, features=features, size=size, width=16)
    labels = torch.tensor([0, 3, 9, 9, 1])
    t = torch.randn(5, features) if features else None
    with torch.no_grad():
        images = g(torch.randn(5, 8), labels, t)
    assert images.shape == (5, 1, size, size)
    assert float(images.min()) >= 0 and float(images.max()) <= 1
    scores, rotations = ProjectionDiscriminator(10, width=16)(images, labels)
    assert scores.shape == (5,) and rotations.shape == (5, 4)
    if features:
        with pytest.raises(UsageError, match="pass t"):
            g(torch.randn(5, 8), labels)


def test_projection_score_is_linear_plus_class_embedding_inner_product():
    torch.manual_seed(0)
    d = ProjectionDiscriminator(3, width=8).eval()
    h = torch.randn(4, 16)
    labels = torch.tensor([0, 1, 2, 1])
    expected = d.score(h).squeeze(1) + (d.embed.weight[labels] * h).sum(1)
    torch.testing.assert_close(d.adversarial(h, labels), expected)
    # spectral norm: after power iterations in training mode the largest singular value of each weight is ~1
    d.train()
    with torch.no_grad():
        for _ in range(30):
            d.features(torch.rand(2, 1, 8, 8))
        weight = d.body[2].weight.flatten(1)
    assert float(torch.linalg.matrix_norm(weight, ord=2)) == pytest.approx(1.0, abs=0.02)


def test_hinge_losses_on_hand_cases():
    assert float(discriminator_hinge_loss(torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.0]))) == pytest.approx(0.75)
    assert float(discriminator_hinge_loss(torch.tensor([1.0, 3.0]), torch.tensor([-1.0, -5.0]))) == 0.0
    assert float(discriminator_hinge_loss(torch.tensor([-1.0]), torch.tensor([1.0]))) == pytest.approx(4.0)
    assert float(generator_hinge_loss(torch.tensor([1.0, -3.0]))) == pytest.approx(1.0)


def test_rotation_loss_and_rotate_on_hand_cases():
    assert float(rotation_loss(torch.zeros(3, 4), torch.tensor([0, 1, 3]))) == pytest.approx(math.log(4))
    confident = torch.full((2, 4), -20.0)
    confident[0, 2] = confident[1, 1] = 20.0
    assert float(rotation_loss(confident, torch.tensor([2, 1]))) < 1e-12
    assert float(rotation_loss(confident, torch.tensor([0, 0]))) == pytest.approx(40.0, rel=1e-6)
    x = torch.arange(2 * 9, dtype=torch.float32).view(2, 1, 3, 3)
    turned = rotate(x, torch.tensor([1, 3]))
    np.testing.assert_array_equal(turned[0, 0].numpy(), np.rot90(x[0, 0].numpy(), 1))
    np.testing.assert_array_equal(turned[1, 0].numpy(), np.rot90(x[1, 0].numpy(), 3))
    assert turned[0, 0, 0].tolist() == [2.0, 5.0, 8.0]  # counter-clockwise: the right column becomes the top row
    back = rotate(rotate(x, torch.tensor([1, 2])), torch.tensor([3, 2]))
    torch.testing.assert_close(back, x)


def test_degradation_is_deterministic_with_a_seed(digits):
    x = digits[0][:50]
    first, again, other = degrade(x, seed=7), degrade(x, seed=7), degrade(x, seed=8)
    torch.testing.assert_close(first, again, rtol=0, atol=0)
    assert float((first - other).abs().max()) > 0.05
    assert float(first.min()) >= 0 and float(first.max()) <= 1
    assert float(((first - x) ** 2).mean()) > 0.01  # it does lower the quality


def test_degradation_hand_cases():
    block = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])
    clean = Degradation(factor=2, blur_sigma=0.0, noise_std=0.0)
    torch.testing.assert_close(degrade(block, clean), torch.full((1, 1, 2, 2), 0.75))
    constant = torch.full((3, 1, 8, 8), 0.4)
    torch.testing.assert_close(degrade(constant, Degradation(factor=2, blur_sigma=0.8, noise_std=0.0)), constant)
    from optimizer.training import gaussian_kernel

    kernel = gaussian_kernel(0.6)
    assert len(kernel) == 5 and float(kernel.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(kernel, kernel.flip(0))
    with pytest.raises(UsageError, match="divisible by 2"):
        degrade(torch.zeros(1, 1, 7, 7))


def test_quality_pools_split_each_class_70_30_into_disjoint_hq_and_lq(digits):
    x, _, y, _ = digits
    pools = quality_pools(x, y, hq_fraction=0.7, seed=3)
    assert len(pools.hq_x) + len(pools.lq_x) == len(x)
    assert set(pools.hq_index.tolist()).isdisjoint(pools.lq_index.tolist())
    for label in range(10):
        n = int((y == label).sum())
        assert int((pools.hq_y == label).sum()) == round(0.7 * n)
    torch.testing.assert_close(pools.lq_sources, x[pools.lq_index])
    torch.testing.assert_close(pools.lq_y, y[pools.lq_index])
    assert float((pools.lq_x - pools.lq_sources).abs().mean()) > 0.05
    again = quality_pools(x, y, hq_fraction=0.7, seed=3)
    assert torch.equal(again.hq_index, pools.hq_index) and torch.equal(again.lq_x, pools.lq_x)
    assert not torch.equal(quality_pools(x, y, seed=4).hq_index, pools.hq_index)


def test_class_prior_fit_is_the_maximum_likelihood_gaussian():
    features = torch.tensor([[0.0, 1.0], [2.0, 1.0], [5.0, -1.0], [5.0, 3.0]])
    prior = ClassPrior.fit(features, torch.tensor([0, 0, 1, 1]), 2)
    torch.testing.assert_close(prior.mean, torch.tensor([[1.0, 1.0], [5.0, 1.0]]))
    torch.testing.assert_close(prior.log_std.exp(), torch.tensor([[1.0, 1e-3], [1e-3, 2.0]]))
    eps = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(prior(torch.tensor([0, 1]), eps), torch.tensor([[2.0, 1.001], [5.0, -1.0]]))
    with pytest.raises(UsageError, match="class 2 has no features"):
        ClassPrior.fit(features, torch.tensor([0, 0, 1, 1]), 3)


def test_frechet_distance_closed_form_and_diversity_hand_cases():
    a = np.array([[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]])  # mean 0, covariance (2/3) I
    b = 2 * a + 3  # mean (3, 3), covariance (8/3) I
    assert frechet_distance(a, b) == pytest.approx(18 + 2 * (math.sqrt(2 / 3) - math.sqrt(8 / 3)) ** 2)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-12)
    rng = np.random.default_rng(0)
    one_d = frechet_distance(rng.normal(0, 1, (20000, 1)), rng.normal(3, 2, (20000, 1)))
    assert one_d == pytest.approx(10.0, rel=0.03)
    assert mean_pairwise_distance(np.array([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5.0)
    assert mean_pairwise_distance(np.array([[0.0], [1.0], [3.0]])) == pytest.approx((1 + 3 + 2) / 3)
    labels = np.array([0, 0, 1, 1])
    points = np.array([[0.0], [2.0], [5.0], [9.0]])
    assert diversity_ratio(points, labels, points, labels) == pytest.approx(1.0)
    assert diversity_ratio(points * 0.5, labels, points, labels) == pytest.approx(0.5)
    assert diversity_ratio(np.zeros((4, 1)), labels, points, labels) == 0.0


def test_fid_of_the_real_test_split_is_zero_against_itself_and_large_against_noise(digits, judge):
    _, x_test, _, y_test = digits
    real = generation_metrics(judge, x_test, y_test, x_test, y_test)
    assert real.fid == pytest.approx(0.0, abs=1e-4)
    assert real.diversity == pytest.approx(1.0)
    assert real.accuracy > 0.9
    noise = torch.rand(len(x_test), 1, 8, 8, generator=torch.Generator().manual_seed(0))
    against_noise = generation_metrics(judge, noise, y_test, x_test, y_test)
    half = len(x_test) // 2
    other_half = generation_metrics(judge, x_test[:half], y_test[:half], x_test[half:], y_test[half:])
    assert against_noise.fid > 10 * other_half.fid and against_noise.fid > 100  # halves: small-sample bias only
    assert against_noise.accuracy < 0.3


def test_train_gan_is_seeded_and_conditions_on_the_hq_and_transferred_lq_pool(digits):
    x, _, y, _ = digits
    pools = quality_pools(x[:200], y[:200], seed=0)
    config = GANConfig(steps=4, batch_size=16, width=8, z_dim=4, recalibration_batches=2, log_every=2)
    branch = train_transfer(pools.hq_x, pools.hq_y, TransferConfig(features=3, steps=3, batch_size=16))
    runs = [train_gan(pools.hq_x, pools.hq_y, config, transfer=branch, lq=(pools.lq_x, pools.lq_y))
            for _ in range(2)]
    labels = torch.arange(10)
    torch.testing.assert_close(runs[0].sampler.sample(labels), runs[1].sampler.sample(labels), rtol=0, atol=0)
    features, pool_labels = runs[0].pool
    assert features.shape == (200, 3) and torch.equal(pool_labels, torch.cat([pools.hq_y, pools.lq_y]))
    assert runs[0].sampler.noise_dim == 4 + 3 and [r["step"] for r in runs[0].history] == [2, 4]
    plain = train_gan(pools.hq_x, pools.hq_y, config)
    assert plain.pool is None and plain.sampler.noise_dim == 4
    assert math.isnan(train_gan(pools.hq_x, pools.hq_y, GANConfig(steps=1, rotation_weight=0.0,
                                                                  width=8)).history[0]["rotation_accuracy"])
    with pytest.raises(UsageError, match="need the transfer branch"):
        train_gan(pools.hq_x, pools.hq_y, config, lq=(pools.lq_x, pools.lq_y))


@pytest.mark.parametrize("features", [0, 5], ids=["cgan", "transfer"])
def test_exported_generator_equals_torch(tmp_path, features):
    import onnxruntime as ort

    from optimizer.training import export

    torch.manual_seed(features)
    generator = Generator(10, z_dim=6, features=features, width=16)
    prior = None
    if features:
        prior = ClassPrior(10, features)
        with torch.no_grad():
            prior.mean.normal_()
            prior.log_std.uniform_(-1, 0.5)
    sampler = GanSampler(generator, prior)
    recalibrate(sampler, 10, batches=3, batch_size=32, seed=0)
    noise, labels = sampler.noise(40, seed=1), torch.arange(40) % 10
    export(sampler, (noise, labels), tmp_path / "g.onnx", input_names=["noise", "labels"], output_names=["images"])
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    onnx_images = session.run(None, {"noise": noise.numpy(), "labels": labels.numpy()})[0]
    with torch.no_grad():
        torch_images = sampler(noise, labels).numpy()
    assert onnx_images.shape == (40, 1, 8, 8)
    assert np.abs(onnx_images - torch_images).max() <= 1e-5
    assert float(torch_images.std()) > 1e-3  # the BatchNorm statistics are real ones, not a constant output


def test_generator_rejects_a_size_not_divisible_by_four():
    with pytest.raises(UsageError, match="divisible by 4"):
        Generator(10, size=10)
    assert isinstance(Generator(10).embed, nn.Embedding)
