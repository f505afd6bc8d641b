"""Feedback learning: the boundary-distance estimator against the analytic distance of linear classifiers, the
per-class allocation rule on hand-computed cases, the generated examples, FGSM/PGD, and a small seeded run on digits."""

import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer.errors import UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    BoundarySearch,
    FeedbackConfig,
    TrainConfig,
    allocate,
    boundary_search,
    class_criteria,
    feedback_learning,
    fgsm,
    generate_examples,
    pgd,
    robustness_report,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def linear_classifier(weight, bias) -> nn.Linear:
    weight = torch.as_tensor(weight, dtype=torch.float64)
    layer = nn.Linear(weight.shape[1], weight.shape[0]).double()
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(torch.as_tensor(bias, dtype=torch.float64))
    return layer


def analytic_distance(layer: nn.Linear, x: torch.Tensor, norm: str) -> torch.Tensor:
    """min over k != y of (f_y - f_k) / ||w_y - w_k||_q (q = 2 for L2, 1 for Linf): the distance to the nearest
    face of the polyhedron where y wins, which for a linear classifier is the minimal perturbation."""
    with torch.no_grad():
        logits = layer(x)
    labels = logits.argmax(1)
    gaps = logits.gather(1, labels[:, None]) - logits
    differences = layer.weight.detach()[None] - layer.weight.detach()[labels][:, None]
    dual = differences.norm(dim=2) if norm == "l2" else differences.abs().sum(dim=2)
    return (gaps / dual).scatter(1, labels[:, None], math.inf).min(dim=1).values


@pytest.mark.parametrize("norm", ["l2", "linf"])
@pytest.mark.parametrize("classes", [2, 4], ids=lambda k: f"{k}-class")
def test_boundary_distance_of_a_linear_classifier_is_the_analytic_distance(norm, classes):
    generator = torch.Generator().manual_seed(classes)
    layer = linear_classifier(torch.randn(classes, 5, generator=generator, dtype=torch.float64),
                              torch.randn(classes, generator=generator, dtype=torch.float64))
    x = torch.rand(300, 5, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        labels = layer(x).argmax(1)
    found = boundary_search(layer, x, labels, BoundarySearch(norm=norm, candidates=classes - 1, box=None))
    exact = analytic_distance(layer, x, norm)
    assert torch.allclose(found.distances, exact, rtol=0, atol=1e-5)  # max error ~1e-12 with these settings
    with torch.no_grad():
        assert bool((layer(found.points).argmax(1) != labels).all())  # each point is on the wrong side


def test_boundary_search_stays_in_the_input_box_when_asked():
    # f0 - f1 = x0 + x1 - 0.2; from (0.1, 0.5) the free L2 step reaches (-0.1, 0.3), outside [0, 1]. Inside the box
    # the nearest boundary point is (0, 0.2): L2 distance sqrt(0.1^2 + 0.3^2) = sqrt(0.1), Linf 0.3.
    layer = linear_classifier([[0.5, 0.5], [-0.5, -0.5]], [-0.1, 0.1])
    x, labels = torch.tensor([[0.1, 0.5]], dtype=torch.float64), torch.tensor([0])
    free = {norm: boundary_search(layer, x, labels, BoundarySearch(norm=norm, box=None)) for norm in ("l2", "linf")}
    boxed = {norm: boundary_search(layer, x, labels, BoundarySearch(norm=norm)) for norm in ("l2", "linf")}
    assert free["l2"].distances.item() == pytest.approx(math.sqrt(0.08), abs=1e-6)
    assert free["linf"].distances.item() == pytest.approx(0.2, abs=1e-6)
    assert float(free["l2"].points.min()) < 0
    assert boxed["l2"].distances.item() == pytest.approx(math.sqrt(0.1), abs=1e-3)  # 0.31653 vs 0.31623
    assert boxed["linf"].distances.item() == pytest.approx(0.3, abs=1e-3)  # 0.30048
    for found in boxed.values():
        assert 0 <= float(found.points.min()) and float(found.points.max()) <= 1


def test_misclassified_samples_have_distance_zero_and_criteria_count_them():
    layer = linear_classifier([[1.0, 0.0], [-1.0, 0.0]], [0.0, 0.0])  # class 0 iff x0 > 0; distance |x0|
    x = torch.tensor([[0.3, 0.5], [0.1, 0.5], [-0.2, 0.5], [0.4, 0.5]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 0, 1])  # the last two are misclassified
    found = boundary_search(layer, x, labels, BoundarySearch(box=None))
    assert torch.allclose(found.distances, torch.tensor([0.3, 0.1, 0.0, 0.0], dtype=torch.float64), atol=1e-6)
    zero, one = class_criteria(found, radii=(0.05, 0.2), classes=2)
    assert zero.count == 3 and zero.mean_distance == pytest.approx(0.4 / 3, abs=1e-6)
    assert zero.robust == {0.05: pytest.approx(2 / 3), 0.2: pytest.approx(1 / 3)}
    assert one.count == 1 and one.mean_distance == 0.0 and one.robust[0.05] == 0.0


def test_allocation_follows_inverse_mean_distance_with_largest_remainder():
    # w = (1, 0.5, 0.25), quotas 10 * w / 1.75 = (5.71, 2.86, 1.43): floors (5, 2, 1), remainders give +1 to 1 then 0
    assert allocate([1.0, 2.0, 4.0], 10) == [6, 3, 1]
    assert allocate([0.1, 0.2, 0.4], 70) == [40, 20, 10]  # exact quotas
    assert allocate([1.0, 2.0, 4.0], 10, compensation=0.0) == [4, 3, 3]  # uniform; the tie goes to class 0
    assert allocate([1.0, 2.0, 4.0], 21, compensation=2.0) == [16, 4, 1]  # w = (1, 1/4, 1/16): quotas (16, 4, 1)
    assert allocate([0.0, 1.0, math.nan], 11) == [11, 0, 0]  # distance 0 floored at 1e-3 (w 1000 vs 1), nan -> 0
    distances = [0.87, 0.55, 0.71, 0.57, 0.70, 0.62, 0.73, 0.58, 0.44, 0.53]  # digits CNN per-class means
    counts = allocate(distances, 400)
    assert sum(counts) == 400
    order = sorted(range(10), key=lambda c: distances[c])
    assert [counts[c] for c in order] == sorted(counts, reverse=True)  # weaker classes get at least as many
    with pytest.raises(UsageError, match="no class"):
        allocate([math.nan, math.nan], 5)


def test_generated_examples_keep_true_labels_stay_in_the_box_and_lie_nearer_the_boundary():
    generator = torch.Generator().manual_seed(4)  # 23, 22 and 155 samples of classes 0, 1, 2
    layer = linear_classifier(torch.randn(3, 6, generator=generator, dtype=torch.float64), [0.3, -0.1, 0.0])
    x = torch.rand(200, 6, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        labels = layer(x).argmax(1)
    search = BoundarySearch(candidates=2)
    found = boundary_search(layer, x, labels, search)
    counts = [int((labels == c).sum()) for c in range(3)]
    allocation = [counts[0] + 5, 7, 0]  # more than class 0 holds: its samples are reused
    generated = generate_examples(found, allocation, fraction=(0.5, 1.0), seed=0)
    assert [int((generated.labels == c).sum()) for c in range(3)] == allocation
    assert torch.equal(generated.labels, labels[generated.sources])
    assert 0 <= float(generated.inputs.min()) and float(generated.inputs.max()) <= 1
    assert float(generated.fractions.min()) >= 0.5 and float(generated.fractions.max()) <= 1
    class_one = generated.sources[generated.labels == 1]
    nearest = found.distances[labels == 1].sort().values[:7]
    assert torch.equal(found.distances[class_one], nearest)  # the weakest of the class are used first

    again = boundary_search(layer, generated.inputs, generated.labels, search)
    source_distance = found.distances[generated.sources]
    assert bool((again.distances < source_distance).all())
    # moved along the straight line to the boundary point: (1 - f) of the way is left (clipping makes it <=)
    assert bool((again.distances <= (1 - generated.fractions) * source_distance + 1e-4).all())


def test_fgsm_on_a_linear_classifier_flips_exactly_the_samples_closer_than_eps():
    # two classes, f0 - f1 = 2 (w . x + b) with w = (1, -2, 0.5), b = -0.1: Linf distance |w.x + b| / ||w||_1
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    layer = linear_classifier(torch.stack([w, -w]), [-0.1, 0.1])
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(400, 3, generator=generator, dtype=torch.float64) * 2 - 1
    with torch.no_grad():
        labels = layer(x).argmax(1)
    distance = analytic_distance(layer, x, "linf")
    for eps in (0.05, 0.1, 0.2):
        assert bool((distance - eps).abs().min() > 1e-9)  # no sample sits on the fence
        with torch.no_grad():
            flipped = layer(fgsm(layer, x, labels, eps, box=None)).argmax(1) != labels
        assert torch.equal(flipped, distance < eps)
        assert 0 < int(flipped.sum()) < len(x)


@pytest.fixture(scope="module")
def digits():
    from samples.digits.digits_cnn import load_split, make_model, train

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_train, x_test, y_train, y_test = load_split()
        torch.manual_seed(0)
        model = train(make_model(), x_train, y_train, epochs=6)
    finally:
        torch.set_num_threads(threads)
    return model, *(torch.from_numpy(a) for a in (x_train, x_test, y_train, y_test))


def test_pgd_is_at_least_as_strong_as_fgsm_on_the_digits_cnn(digits):
    model, _, x_test, _, y_test = digits
    for eps in (0.05, 0.1):
        with torch.no_grad():
            fgsm_accuracy = float((model(fgsm(model, x_test, y_test, eps)).argmax(1) == y_test).float().mean())
            pgd_accuracy = float((model(pgd(model, x_test, y_test, eps)).argmax(1) == y_test).float().mean())
        assert pgd_accuracy <= fgsm_accuracy
    # when written: FGSM 0.902 / 0.682, PGD 0.889 / 0.602 at eps 0.05 / 0.1


def test_generated_digits_examples_are_nearer_the_boundary(digits):
    model, x_train, _, y_train, _ = digits
    found = boundary_search(model, x_train[:300], y_train[:300])
    generated = generate_examples(found, allocate([c.mean_distance for c in class_criteria(found)], 150), seed=0)
    again = boundary_search(model, generated.inputs, generated.labels)
    assert torch.equal(generated.labels, y_train[:300][generated.sources])
    assert 0 <= float(generated.inputs.min()) and float(generated.inputs.max()) <= 1
    source_distance = found.distances[generated.sources]
    assert float(again.distances.mean()) < 0.6 * float(source_distance.mean())
    assert float((again.distances < source_distance).float().mean()) > 0.95


def small_run(rounds: int):
    """2 warmup epochs + `rounds` rounds of 1 epoch (200 probe samples, 200 examples a round); rounds=0 is plain
    training for the same 3 epochs."""
    from samples.digits.digits_cnn import load_split, make_model

    x_train, _, y_train, _ = load_split()
    torch.manual_seed(0)
    config = FeedbackConfig(rounds=rounds, warmup_epochs=2 if rounds else 3, round_epochs=1, budget=200, probe=200,
                            seed=0, train=TrainConfig(batch_size=64, lr=3e-3, progress=False))
    return feedback_learning(make_model(), (torch.from_numpy(x_train), torch.from_numpy(y_train)), config)


def test_a_small_feedback_run_on_digits_is_deterministic(digits):
    first, second = small_run(1), small_run(1)
    assert [r.allocation for r in first.rounds] == [r.allocation for r in second.rounds]
    assert sum(first.rounds[0].allocation) == 200
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    _, _, x_test, _, y_test = digits
    plain = robustness_report(small_run(0).model, x_test, y_test, eps=(0.1,), sigmas=(0.3,)).summary()
    feedback = robustness_report(first.model, x_test, y_test, eps=(0.1,), sigmas=(0.3,)).summary()
    print(f"\nallocation {first.rounds[0].allocation}")
    for name, summary in (("plain 3 epochs", plain), ("feedback 2 + 1x1", feedback)):
        print(f"{name:<18}" + "  ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    assert feedback["clean"] > 0.9
