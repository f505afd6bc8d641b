"""MESA: the MINE estimator against the analytic mutual information of Gaussians, trigger stamping and ASR on a
hand-built detector, the trigger generator, and a small deterministic attack -> search -> retraining run on digits."""

import copy
import math

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from optimizer.errors import UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    Mine,
    SearchConfig,
    TrainConfig,
    TriggerGenerator,
    attack_success_rate,
    backdoor_attack,
    ensemble_sampler,
    fixed_trigger,
    poison_batch,
    retrain_with_triggers,
    search_triggers,
    stamp_trigger,
)

PATTERN = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def gaussian_pairs(rho: float, count: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(count, 1, generator=generator)
    return a, rho * a + math.sqrt(1 - rho ** 2) * torch.randn(count, 1, generator=generator), generator


def mine_estimate(rho: float, seed: int = 0) -> float:
    torch.manual_seed(seed)
    a, b, generator = gaussian_pairs(rho, 4000, seed)
    mine = Mine(1, 1, hidden=64, lr=1e-3)
    mine.fit(a, b, steps=1500, batch_size=256, generator=generator)
    return mine.estimate(a, b, a[torch.randperm(len(a), generator=generator)])


def test_mine_estimates_the_mutual_information_of_correlated_gaussians():
    exact = -0.5 * math.log(1 - 0.8 ** 2)  # 0.511 nats
    estimate = mine_estimate(0.8)
    # 0.488 when written (seeds 0-3 gave 0.46-0.50 after 1000 steps); the Donsker-Varadhan bound approaches from below.
    assert estimate == pytest.approx(exact, rel=0.15)


def test_mine_estimates_near_zero_for_independent_gaussians():
    assert abs(mine_estimate(0.0)) < 0.02


def test_stamp_pastes_exactly_the_trigger_and_nothing_else():
    images = torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    trigger = torch.stack([PATTERN, 1 - PATTERN])
    out = stamp_trigger(images, trigger, (2, 5))
    assert torch.equal(out[:, :, 2:5, 5:8], trigger.expand(5, 2, 3, 3))
    window = torch.zeros(8, 8, dtype=torch.bool)
    window[2:5, 5:8] = True
    assert torch.equal(out[:, :, ~window], images[:, :, ~window])
    assert torch.equal(images, torch.rand(5, 2, 8, 8, generator=torch.Generator().manual_seed(0)))  # input untouched

    corners = torch.tensor([[0, 0], [5, 5], [3, 1], [0, 5], [5, 0]])
    per_image = stamp_trigger(images, trigger, corners)
    for n, (row, col) in enumerate(corners.tolist()):
        expected = images[n].clone()
        expected[:, row:row + 3, col:col + 3] = trigger
        assert torch.equal(per_image[n], expected)

    with pytest.raises(UsageError, match="leaves"):
        stamp_trigger(images, trigger, (6, 0))
    with pytest.raises(UsageError, match="does not fit"):
        stamp_trigger(images, PATTERN[None], (0, 0))


def test_poison_batch_relabels_only_the_stamped_images():
    images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.8
    labels = torch.arange(64) % 10
    poisoned, new_labels = poison_batch(images, labels, fixed_trigger(PATTERN[None]), 0.5, target=7,
                                        generator=torch.Generator().manual_seed(0))
    stamped = (poisoned != images).flatten(1).any(1)
    assert 10 < int(stamped.sum()) < 54
    assert torch.equal(new_labels[stamped], torch.full((int(stamped.sum()),), 7))
    assert torch.equal(new_labels[~stamped], labels[~stamped])
    _, kept = poison_batch(images, labels, fixed_trigger(PATTERN[None]), 0.5,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, labels)


class PatternDetector(nn.Module):
    """Calls `target` iff channel 0 holds PATTERN somewhere exactly (pixels in [0, 0.8] cannot fake it: its five
    ones sum to 5, a fake to at most 4) and channel 1 is mostly dark; every other input is class 0."""

    def __init__(self, target: int):
        super().__init__()
        self.target = target
        self.conv = nn.Conv2d(2, 1, 3, bias=True)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0] = 2 * PATTERN - 1
            self.conv.bias.fill_(-(PATTERN.sum() - 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        present = self.conv(x).amax(dim=(1, 2, 3))
        dark = 0.5 - x[:, 1].mean(dim=(1, 2))
        logits = torch.zeros(len(x), 10)
        logits[:, self.target] = torch.minimum(present, dark)
        return logits


def test_attack_success_rate_on_a_hand_built_detector():
    target = 3
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 2, 8, 8, generator=generator) * 0.8
    labels = torch.arange(40) % 10
    # Images of the target class have a bright channel 1: stamped, the detector still does not call them target,
    # so counting them would pull the rate down to 36/40.
    images[labels == target, 1] = 1.0
    images[labels != target, 1] = 0.0
    trigger = torch.stack([PATTERN, torch.zeros(3, 3)])
    detector = PatternDetector(target)
    assert int((detector(images).argmax(1) == target).sum()) == 0  # unstamped: never the target
    assert attack_success_rate(detector, images, labels, trigger, target) == 1.0
    assert attack_success_rate(detector, images, labels, torch.stack([1 - PATTERN, torch.zeros(3, 3)]), target) == 0.0
    assert attack_success_rate(detector, images, labels, trigger, target, seed=5) == 1.0


def test_generator_outputs_triggers_in_range_that_depend_on_z():
    torch.manual_seed(0)
    generator = TriggerGenerator(3, 2, noise_dim=64, chunks=4, hidden=32)
    z = generator.noise(16, torch.Generator().manual_seed(0))
    assert z.shape == (16, 64) and float(z.min()) >= 0 and float(z.max()) < 1
    triggers = generator(z).detach()
    assert triggers.shape == (16, 2, 3, 3)
    assert float(triggers.min()) >= 0 and float(triggers.max()) <= 1
    distinct = torch.cdist(triggers.flatten(1), triggers.flatten(1))
    assert float(distinct[~torch.eye(16, dtype=torch.bool)].min()) > 1e-3
    sampled = generator.sample(4, torch.Generator().manual_seed(1))
    assert sampled.shape == (4, 2, 3, 3) and generator.training
    for dim in (0, 63):  # the first and the last chunk both reach the output
        moved = z.clone()
        moved[:, dim] = 1 - moved[:, dim]
        generator.eval()
        assert not torch.allclose(generator(moved), generator(z))
        generator.train()


def accuracy(model, images, labels) -> float:
    with torch.no_grad():
        return float((model.eval()(images).argmax(1) == labels).float().mean())


def test_mesa_removes_a_backdoor_on_digits():
    from samples.digits.digits_cnn import load_split, make_model, train
    from samples.digits.mesa import defender_split

    x_train, x_test, y_train, y_test = load_split()
    defender, evaluation = defender_split(torch.from_numpy(x_test), torch.from_numpy(y_test))
    trigger, target = PATTERN[None], 0
    torch.manual_seed(0)
    clean = train(make_model(), x_train, y_train, epochs=6)
    backdoored = backdoor_attack(copy.deepcopy(clean), (torch.from_numpy(x_train), torch.from_numpy(y_train)),
                                 trigger, target, 0.1, TrainConfig(epochs=5, batch_size=64, lr=1e-3, progress=False))
    backdoored_accuracy = accuracy(backdoored, *evaluation)
    attacked = attack_success_rate(backdoored, *evaluation, trigger, target)
    assert attacked > 0.9  # 1.0 when written

    generators = search_triggers(backdoored, defender[0], target, (0.9, 0.8, 0.5),
                                 SearchConfig(trigger_size=3, channels=1, epochs=60, hidden=128))
    assert all(g.target_probability > 0.5 for g in generators)
    retraining = TrainConfig(epochs=30, batch_size=32, optimizer="sgd", lr=1e-3, progress=False)
    repaired = retrain_with_triggers(copy.deepcopy(backdoored), defender, ensemble_sampler(generators), 0.2,
                                     retraining)
    repaired_asr = attack_success_rate(repaired, *evaluation, trigger, target)
    assert repaired_asr < 0.15  # 0.034 when written
    assert accuracy(repaired, *evaluation) >= backdoored_accuracy - 0.03  # 99.6% against 100%

    fine_tuned = retrain_with_triggers(copy.deepcopy(backdoored), defender, fixed_trigger(trigger), 0.0, retraining)
    assert attack_success_rate(fine_tuned, *evaluation, trigger, target) > repaired_asr + 0.3  # 0.80 when written
