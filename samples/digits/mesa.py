"""MESA on scikit-learn digits: backdoor a clean CNN, model the trigger distribution, retrain the backdoor away.

    python -m samples.digits.mesa [--seeds 0 1 2] [--search-epochs 100] [--hidden 128] [--detect]

The attack: a 3x3 checkerboard (1 0 1 / 0 1 0 / 1 0 1 in [0, 1] pixels) pasted at a random location of the 8x8
image, target class 0, 10% of each training batch poisoned, 5 epochs of Adam (lr 1e-3) from the clean digits CNN
(the official 1% poisoning of CIFAR is too little for digits' 1347 training images). The defender holds half of the
450-image test split (225 images, a fixed permutation); the other 225 evaluate clean accuracy and the attack success
rate (ASR: non-target images stamped with the original trigger, each at its own random location).

Defenses, each from the same backdoored model with the same retraining (SGD lr 1e-3, momentum 0.9, batch 32,
30 epochs over the defender's 225 images, 20% of each batch stamped, true labels kept):
  clean fine-tune   no trigger at all (the fine-tuning baseline)
  point             one trigger reversed in pixel space (Neural-Cleanse-like)
  MESA              the generators for beta 0.9, 0.8, 0.5 (alpha 0.1), cycled by epoch
The official retraining stamps 1% of batches of 128 over 8000 images; on 225 images that is a trigger or two per
epoch, hence 20%. The search runs `--search-epochs` epochs over the defender's images (2 batches of 128 each) with a
narrower generator and statistics network than the official 512 (`--hidden`), to stay within a few minutes on one
core. `--detect` also runs the beta = 0.9 search for every class on the first seed's model and prints the mean target
probability each attains.
"""

from __future__ import annotations

import argparse
import copy
import time
from dataclasses import replace

import torch

from optimizer.training import (
    SearchConfig,
    TrainConfig,
    attack_success_rate,
    backdoor_attack,
    detect_target,
    ensemble_sampler,
    fixed_trigger,
    retrain_with_triggers,
    reverse_trigger,
    search_triggers,
)
from samples.digits.digits_cnn import load_split, make_model, train

TRIGGER = torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]])
TARGET = 0
ATTACK = TrainConfig(epochs=5, batch_size=64, optimizer="adam", lr=1e-3, progress=False)
ATTACK_POISON = 0.1
RETRAIN = TrainConfig(epochs=30, batch_size=32, optimizer="sgd", lr=1e-3, momentum=0.9, progress=False)
RETRAIN_POISON = 0.2
DEFENDER_IMAGES = 225


def defender_split(images: torch.Tensor, labels: torch.Tensor):
    """(defender images, labels), (evaluation images, labels): a fixed permutation of the test split."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    own, held = order[:DEFENDER_IMAGES], order[DEFENDER_IMAGES:]
    return (images[own], labels[own]), (images[held], labels[held])


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(1) == labels).float().mean())


def scores(model, evaluation) -> tuple[float, float]:
    return accuracy(model, *evaluation), attack_success_rate(model, *evaluation, TRIGGER, TARGET)


def pattern(trigger: torch.Tensor) -> str:
    return " / ".join(" ".join(f"{v:.1f}" for v in row) for row in trigger[0].tolist())


def run_seed(seed, train_split, defender, evaluation, search: SearchConfig):
    """({method: (clean accuracy, ASR)}, the backdoored model) for one seed of the whole pipeline."""
    torch.manual_seed(seed)
    clean = train(make_model(), *(t.numpy() for t in train_split), seed=seed)
    backdoored = backdoor_attack(copy.deepcopy(clean), train_split, TRIGGER, TARGET, ATTACK_POISON,
                                 replace(ATTACK, seed=seed))
    retrain_config = replace(RETRAIN, seed=seed)
    rows = {"clean model": scores(clean, evaluation), "backdoored": scores(backdoored, evaluation)}

    tuned = retrain_with_triggers(copy.deepcopy(backdoored), defender, fixed_trigger(TRIGGER), 0.0, retrain_config)
    rows["clean fine-tune"] = scores(tuned, evaluation)

    point = reverse_trigger(backdoored, defender[0], TARGET, 3, 1, seed=seed)
    print(f"seed {seed}: reversed point trigger {pattern(point)}", flush=True)
    repaired = retrain_with_triggers(copy.deepcopy(backdoored), defender, fixed_trigger(point), RETRAIN_POISON,
                                     retrain_config)
    rows["point defense"] = scores(repaired, evaluation)

    started = time.perf_counter()
    generators = search_triggers(backdoored, defender[0], TARGET, (0.9, 0.8, 0.5),
                                 replace(search, seed=seed))
    attained = ", ".join(f"beta {g.beta}: {100 * g.target_probability:.1f}%" for g in generators)
    print(f"seed {seed}: MESA search {time.perf_counter() - started:.0f}s, mean target probability {attained}",
          flush=True)
    repaired = retrain_with_triggers(copy.deepcopy(backdoored), defender, ensemble_sampler(generators, seed),
                                     RETRAIN_POISON, retrain_config)
    rows["MESA"] = scores(repaired, evaluation)
    return rows, backdoored


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--search-epochs", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128, help="width of the generator and the MINE network")
    parser.add_argument("--detect", action="store_true", help="search every class on the first seed's model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()

    x_train, x_test, y_train, y_test = load_split()
    train_split = (torch.from_numpy(x_train), torch.from_numpy(y_train))
    defender, evaluation = defender_split(torch.from_numpy(x_test), torch.from_numpy(y_test))
    search = SearchConfig(trigger_size=3, channels=1, epochs=args.search_epochs, hidden=args.hidden)
    print(f"digits: attacker trains on {len(y_train)}, defender holds {len(defender[1])}, evaluation "
          f"{len(evaluation[1])} ({int((evaluation[1] != TARGET).sum())} non-target for ASR); "
          f"trigger {pattern(TRIGGER)}, "
          f"target {TARGET}, attack poison {ATTACK_POISON:.0%}, retraining poison {RETRAIN_POISON:.0%}")

    results: dict[str, list[tuple[float, float]]] = {}
    first_backdoored = None
    for seed in args.seeds:
        rows, backdoored = run_seed(seed, train_split, defender, evaluation, search)
        if first_backdoored is None:
            first_backdoored = backdoored
        for method, score in rows.items():
            results.setdefault(method, []).append(score)

    print(f"\n{'method':<16}{'clean acc':>11}{'ASR':>9}   ASR per seed ({len(args.seeds)} seeds)")
    for method, runs in results.items():
        accuracies, rates = zip(*runs, strict=True)
        per_seed = " ".join(f"{100 * r:5.1f}" for r in rates)
        print(f"{method:<16}{100 * sum(accuracies) / len(runs):>10.2f}%{100 * sum(rates) / len(runs):>8.1f}%   "
              f"{per_seed}")

    if args.detect:
        probabilities = detect_target(first_backdoored, defender[0], range(10), 0.9, search)
        print("\ndetection (beta 0.9 search per class, mean target probability): "
              + ", ".join(f"{label}: {100 * p:.0f}%" for label, p in probabilities.items()))
    print(f"\ntotal {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
