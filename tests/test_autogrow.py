"""AutoGrow: growing by name (ZeroInit is a morphism), optimizer state carried over, the growth and stopping
policies on hand-computed accuracy sequences, a tiny deterministic run on scikit-learn digits, and its ONNX export."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optimizer.errors import ModelError, UsageError  # noqa: E402
from optimizer.training import (  # noqa: E402
    GrowConfig,
    GrowingNet,
    GrowthPolicy,
    auto_grow,
    export,
    grow,
    hold_out,
)
from optimizer.verify import run_ort  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def seed_net(arch=(1, 1, 1), plain=False) -> GrowingNet:
    """A small net whose BatchNorm running statistics are not the defaults (a few train-mode passes)."""
    torch.manual_seed(0)
    net = GrowingNet(arch, (4, 8, 16), in_channels=1, plain=plain)
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 1, 8, 8))
    return net.eval()


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_grow_keeps_every_parameter_and_zero_init_keeps_the_function(stage):
    old = seed_net()
    new, _ = grow(old, stage, initializer="zero")
    expected_arch = [1, 1, 1]
    expected_arch[stage] = 2
    assert new.arch == tuple(expected_arch)
    old_state, new_state = old.state_dict(), new.state_dict()
    assert all(torch.equal(old_state[name], new_state[name]) for name in old_state)
    added = sorted(set(new_state) - set(old_state))
    assert added and all(name.startswith(f"stages.{stage}.1.") for name in added)
    assert torch.equal(new_state[f"stages.{stage}.1.bn2.weight"], torch.zeros(4 * 2**stage))

    inputs = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = float((new.eval()(inputs) - old(inputs)).abs().max())
    assert diff <= 1e-6


def test_building_1_2_1_and_loading_the_seed_by_name():
    from optimizer.training.autogrow import load_by_name

    old = seed_net()
    new = old.with_arch([1, 2, 1])
    missing = load_by_name(new, old.state_dict())
    assert new.arch == (1, 2, 1)
    assert missing and all(name.startswith("stages.1.1.") for name in missing)
    new_params = dict(new.named_parameters())
    assert all(torch.equal(p, new_params[name]) for name, p in old.named_parameters())
    with pytest.raises(ModelError, match="shape"):
        load_by_name(GrowingNet([1, 1, 1], (4, 8, 32), in_channels=1), old.state_dict())


def test_gaussian_and_uniform_init_change_the_function_and_plain_nets_grow():
    old = seed_net()
    inputs = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    gaussian, _ = grow(old, 1, initializer="gaussian", init_meta=1.0)
    uniform, _ = grow(old, 1, initializer="uniform", init_meta=0.5)
    bn = uniform.stages[1][1].bn2
    assert bool((bn.weight >= 0).all() and (bn.weight <= 0.5).all() and (bn.bias >= 0).all())
    with torch.no_grad():
        assert float((gaussian.eval()(inputs) - old(inputs)).abs().max()) > 1e-3
    plain, _ = grow(seed_net(plain=True), 2)
    assert plain.arch == (1, 1, 2) and plain(inputs).shape == (8, 10)
    with pytest.raises(UsageError, match="initializer"):
        grow(old, 0, initializer="ones")
    with pytest.raises(UsageError, match="stage=3"):
        grow(old, 3)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_carries_over_by_name(kind):
    model = seed_net().train()
    if kind == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(4)
    for _ in range(2):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8, generator=generator)),
                                                 torch.randint(0, 10, (16,), generator=generator))
        loss.backward()
        optimizer.step()
    before = {name: {k: v.clone() for k, v in optimizer.state[p].items()} for name, p in model.named_parameters()}

    grown, carried = grow(model, 2, optimizer)

    assert type(carried) is type(optimizer)
    assert {k: v for k, v in carried.param_groups[0].items() if k != "params"} == \
        {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    params = dict(grown.named_parameters())
    for name, state in before.items():
        assert state and state.keys() == carried.state[params[name]].keys()
        assert all(torch.equal(value, carried.state[params[name]][key]) for key, value in state.items())
    new_names = [name for name in params if name.startswith("stages.2.1.")]
    assert new_names and not any(carried.state.get(params[name]) for name in new_names)
    assert sum(1 for _ in grown.parameters()) == len(carried.param_groups[0]["params"])


def test_periodic_policy_on_a_hand_written_accuracy_sequence():
    # K = 1, J = 2, tau = 1 point, max_arch [2, 9, 9]. Running max (points) after each interval:
    # 50, 62.5, 75, 81.25, 82.03125, 82.8125, 82.8125, 82.8125. The gain over the last 2 intervals first drops
    # below 1 at interval 7 (82.8125 - 82.03125 = 0.78): stage 1, grown last (at interval 6), is frozen at 4
    # blocks; at interval 8 the gain is 0: stage 2 (grown at 7) is frozen at 4 and nothing can grow any more.
    # Round-robin: 0 (then at max_arch 2, skipped from then on), 1, 2, 1, 2, 1, 2.
    policy = GrowthPolicy([1, 1, 1], [2, 9, 9], policy="periodic", grow_interval=1, stop_interval=2, threshold=1.0)
    accuracies = [0.5, 0.625, 0.75, 0.8125, 0.8203125, 0.828125, 0.8125, 0.8]
    events, archs = [], []
    for accuracy in accuracies:
        assert not policy.done
        events.append(policy.update([accuracy]))
        archs.append(tuple(policy.arch))
        assert all(a <= m for a, m in zip(policy.arch, [2, 9, 9], strict=True))
    assert events == [(None, 0), (None, 1), (None, 2), (None, 1), (None, 2), (None, 1), (1, 2), (2, None)]
    assert archs[-1] == (2, 4, 4) and policy.max_arch == [2, 4, 4]
    assert policy.frozen == [1, 2] and policy.done
    assert policy.best == [50, 62.5, 75, 81.25, 82.03125, 82.8125, 82.8125, 82.8125]


def test_periodic_policy_takes_the_best_epoch_of_each_interval():
    # K = 3 epochs per interval: the running max is over every epoch's accuracy, J = 1 interval, tau = 0.5.
    policy = GrowthPolicy([1, 1], [5, 5], grow_interval=3, stop_interval=1, threshold=0.5)
    assert policy.step_epochs == 3
    assert policy.update([0.5, 0.75, 0.625]) == (None, 0)   # best 75
    assert policy.update([0.7, 0.7578125, 0.7]) == (None, 1)  # best 75.78125: gain 0.78 >= 0.5
    assert policy.update([0.75, 0.7, 0.7578125]) == (1, 0)  # gain 0 < 0.5: stage 1 (grown last) frozen at 2
    assert policy.arch == [3, 2] and policy.max_arch == [5, 2]
    assert policy.update([0.7, 0.7, 0.7]) == (0, None)  # stage 0 frozen at 3: done
    assert policy.done and policy.frozen == [1, 0]


def test_convergent_policy_on_a_hand_written_accuracy_sequence():
    # K = 2 epochs, tau = 1 point. Grow only once the running max gained < 1 over the last 2 epochs:
    # epochs 1-5 gain 25.78, 1.56, 1.17 (or too few epochs); epoch 6 gain 0.78 -> grow stage 0 (nothing to freeze).
    # Epoch 7 is too soon after it; epoch 8 gains 12.66; epoch 9 gains 0 -> converged, and the growth at epoch 6
    # helped (90 - 77.34 >= 1), so stage 0 stays open and stage 1 grows. Epoch 11: gain 0.23 since epoch 9, the
    # growth did not help -> freeze stage 1 at 2 blocks and grow stage 2.
    policy = GrowthPolicy([1, 1, 1], [9, 9, 9], policy="convergent", grow_interval=2, threshold=1.0)
    assert policy.step_epochs == 1
    accuracies = [0.5, 0.75, 0.7578125, 0.765625, 0.76953125, 0.7734375, 0.9, 0.9, 0.9, 0.9, 0.90234375]
    events = [policy.update([accuracy]) for accuracy in accuracies]
    assert events == [(None, None)] * 5 + [(None, 0), (None, None), (None, None), (None, 1), (None, None), (1, 2)]
    assert policy.arch == [2, 2, 2] and policy.max_arch == [9, 2, 9] and not policy.done


def test_policy_and_config_reject_bad_values():
    with pytest.raises(UsageError, match="max_arch"):
        GrowthPolicy([2, 1], [1, 5])
    with pytest.raises(UsageError, match="policy"):
        GrowthPolicy([1, 1], [5, 5], policy="sometimes")
    with pytest.raises(UsageError, match="arch"):
        GrowingNet([1, 0, 1])
    with pytest.raises(UsageError, match="fraction"):
        hold_out(np.zeros((4, 1)), np.zeros(4), fraction=1.5)


@pytest.fixture(scope="module")
def digits_runs():
    """Two identical tiny AutoGrow runs on digits (growth on a held-out validation split; test split unseen)."""
    torch.set_num_threads(1)
    from samples.digits.digits_cnn import load_split

    x_train, x_test, y_train, y_test = load_split()
    train, validation = hold_out(x_train, y_train, fraction=0.15, seed=0)
    config = GrowConfig(widths=(8, 16, 32), in_channels=1, grow_interval=1, stop_interval=2, threshold=0.5,
                        max_epochs=12, tail_epochs=3, seed=0)
    runs = [auto_grow(train, validation, config) for _ in range(2)]
    return runs, torch.from_numpy(x_test), torch.from_numpy(y_test), len(validation[0])


def test_a_tiny_digits_run_grows_stops_and_is_deterministic(digits_runs):
    (first, second), x_test, y_test, validation_size = digits_runs
    assert first.stopped_by == "policy" and first.growth_epochs < 12 and first.frozen
    assert sum(first.arch) > 3 and all(a >= 1 for a in first.arch)
    assert first.model.arch == first.arch == first.records[-1].arch and first.records[-1].grew is None
    assert [r.epoch for r in first.records] == list(range(1, len(first.records) + 1))
    assert first.arch == second.arch and first.records == second.records
    assert validation_size == 202
    first.model.eval()
    with torch.no_grad():
        accuracy = float((first.model(x_test).argmax(1) == y_test).float().mean())
    assert accuracy > 0.85  # chance is 0.10


def test_the_grown_model_exports_and_ort_matches_torch(digits_runs, tmp_path):
    (grown, _), x_test, _, _ = digits_runs
    model = grown.model.eval()
    proto = export(model, x_test[:2], tmp_path / "grown.onnx", input_names=["input"], output_names=["logits"])
    residual_adds = sum(1 for n in proto.graph.node if n.op_type == "Add")
    convs = sum(1 for n in proto.graph.node if n.op_type == "Conv")
    assert residual_adds == sum(grown.arch)
    assert convs == 1 + 2 * sum(grown.arch) + len(grown.arch) - 1  # stem, two per block, two projections
    inputs = x_test[:64]
    with torch.no_grad():
        expected = model(inputs).numpy()
    got = run_ort(proto, {"input": inputs.numpy()})["logits"]
    assert float(np.abs(got - expected).max()) <= 1e-4
