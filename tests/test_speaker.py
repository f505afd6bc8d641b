"""The speaker sample: corpus determinism, feature shapes, EER on hand cases, the x-vector export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from samples.speaker.corpus import CorpusConfig, build, utterance_features
from samples.speaker.eer import cosine_scores, equal_error_rate
from samples.speaker.features import N_MELS, log_mel, mel_filterbank, samples_for_frames

TINY = CorpusConfig(
    n_train_speakers=2, train_utterances=2, train_frames=40, n_test_speakers=2, test_utterances=2, test_frames=30
)


def test_utterance_is_deterministic_and_depends_on_its_identity():
    first = utterance_features(TINY, "train", 1, 0, 50)
    again = utterance_features(TINY, "train", 1, 0, 50)
    np.testing.assert_array_equal(first, again)
    assert first.shape == (N_MELS, 50) and first.dtype == np.float32
    assert not np.allclose(first, utterance_features(TINY, "train", 1, 1, 50))
    assert not np.allclose(first, utterance_features(TINY, "test", 1, 0, 50))


def test_corpus_cache_round_trip(tmp_path):
    corpus = build(TINY, tmp_path)
    assert corpus.train_features.shape == (4, N_MELS, 40)
    assert corpus.test_features.shape == (4, N_MELS, 30)
    np.testing.assert_array_equal(corpus.train_labels, [0, 0, 1, 1])
    cached = build(TINY, tmp_path)
    # stored as float16: the cached copy equals the float16 rounding of a fresh synthesis
    fresh = utterance_features(TINY, "test", 1, 1, 30)
    np.testing.assert_array_equal(cached.test_features[3], fresh.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(cached.train_features, corpus.train_features)


def test_log_mel_frames_and_mean_normalisation():
    n_frames = 37
    signal = np.random.default_rng(0).standard_normal(samples_for_frames(n_frames))
    features = log_mel(signal)
    assert features.shape == (N_MELS, n_frames)
    np.testing.assert_allclose(features.mean(axis=1), 0.0, atol=1e-5)


def test_log_mel_puts_a_tone_in_the_band_around_it():
    from samples.speaker.voices import SAMPLE_RATE

    n = samples_for_frames(40)
    rng = np.random.default_rng(1)
    signal = 1e-3 * rng.standard_normal(n)
    signal[n // 2 :] += np.sin(2 * np.pi * 1000.0 * np.arange(n - n // 2) / SAMPLE_RATE)
    features = log_mel(signal)
    rise = features[:, -5:].mean(axis=1) - features[:, :5].mean(axis=1)
    bin_1khz = int(round(1000.0 * 256 / SAMPLE_RATE))
    assert int(np.argmax(rise)) == int(np.argmax(mel_filterbank()[:, bin_1khz]))


@pytest.mark.parametrize(
    ("target", "nontarget", "expected"),
    [
        ([0.9, 0.8, 0.3], [0.7, 0.2, 0.1], 1 / 3),  # one of three wrong on each side at threshold 0.7
        ([0.9, 0.8], [0.2, 0.1], 0.0),  # separable
        ([0.1, 0.2], [0.8, 0.9], 1.0),  # inverted
        ([0.5], [0.5], 0.5),  # a tie: accept both or neither
        ([0.9, 0.6, 0.5, 0.2], [0.7, 0.4, 0.3, 0.1], 0.25),  # interleaved: crossing at one error in four each
    ],
    ids=["one-error-each", "separable", "inverted", "tie", "interleaved"],
)
def test_equal_error_rate_hand_cases(target, nontarget, expected):
    scores = np.array(target + nontarget)
    is_target = np.array([True] * len(target) + [False] * len(nontarget))
    assert equal_error_rate(scores, is_target) == pytest.approx(expected)


def test_equal_error_rate_interpolates_across_a_tie():
    # targets [0.9, 0.5], non-targets [0.5, 0.1]: accepting >= 0.9 gives (FA 0, FR 1/2); accepting >= 0.5 takes
    # a target and a non-target at once, (FA 1/2, FR 0). On the segment between, FA = FR at 1/4.
    is_target = np.array([True, True, False, False])
    assert equal_error_rate(np.array([0.9, 0.5, 0.5, 0.1]), is_target) == pytest.approx(0.25)
    # with four non-targets the second point is (FA 1/4, FR 0): FR - FA goes 1/2 -> -1/4, crossing 2/3 of the
    # way, where FA = 2/3 * 1/4 = 1/6
    is_target = np.array([True, True, False, False, False, False])
    assert equal_error_rate(np.array([0.9, 0.5, 0.5, 0.1, 0.1, 0.1]), is_target) == pytest.approx(1 / 6)


def test_cosine_scores_pairs_and_labels():
    embeddings = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    scores, is_target = cosine_scores(embeddings, np.array([7, 7, 8]))
    np.testing.assert_allclose(scores, [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_array_equal(is_target, [True, False, False])


def test_equal_error_rate_needs_both_kinds_of_trials():
    with pytest.raises(ValueError, match="both kinds"):
        equal_error_rate(np.array([0.1, 0.2]), np.array([True, True]))


def test_exported_embedding_matches_torch_and_folding_keeps_the_function(tmp_path):
    torch = pytest.importorskip("torch")
    from optimizer.verify import run_ort
    from samples.speaker.model import XVectorTDNN, fold_batch_norm
    from samples.speaker.train import export_embedding

    torch.manual_seed(0)
    model = XVectorTDNN(5, frame_channels=(8, 8, 8, 8, 12), embedding_dim=6)
    with torch.no_grad():
        for norm in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.2, 0.2)
    model.eval()
    features = torch.randn(3, N_MELS, 40)
    proto = export_embedding(model, tmp_path / "x.onnx", 40)
    onnx.checker.check_model(proto, full_check=True)
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim][1:] == [N_MELS, 40]
    out = run_ort(proto, {"features": features.numpy()})["embedding"]
    assert out.shape == (3, 6)
    with torch.no_grad():
        expected = model.embed(features).numpy()
        folded = fold_batch_norm(model).eval().embed(features).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(folded, expected, rtol=1e-4, atol=1e-5)


def test_zeroed_groups_are_removed_exactly_by_the_pass(tmp_path):
    torch = pytest.importorskip("torch")
    import optimizer
    from optimizer.verify import run_ort
    from samples.speaker.model import XVectorTDNN, fold_batch_norm
    from samples.speaker.train import TrainingPlan, export_embedding, sparsity_regularizer

    torch.manual_seed(1)
    model = fold_batch_norm(XVectorTDNN(5, frame_channels=(8, 8, 8, 8, 12), embedding_dim=6).eval()).eval()
    with torch.no_grad():
        # kill half of every frame layer's filters, and four of segment6's input columns (mean and std of one
        # pooled channel, plus two of one more channel's)
        for conv in (m for m in model.frame_layers if isinstance(m, torch.nn.Conv1d)):
            conv.weight[::2] *= 1e-6
            conv.bias[::2] *= 1e-6
        model.segment6.weight[:, [1, 13]] *= 1e-6
    regularizer = sparsity_regularizer(model, TrainingPlan())
    regularizer.threshold_masks(std_ratio=0.1)
    features = torch.randn(2, N_MELS, 40)
    with torch.no_grad():
        expected = model.embed(features).numpy()
    proto = export_embedding(model, tmp_path / "sparse.onnx", 40, regularizer)
    pruned, report = optimizer.optimize(
        proto, passes=["structured-sparse:criterion=zero"], calibration={"features": features.numpy()}
    )
    kept = [g["channels_after"] for g in report["passes"][0]["details"]["groups"]]
    assert kept == [4, 4, 4, 4, 5, 6]  # the last frame layer also loses pooled channel 1 (both columns zero)
    np.testing.assert_allclose(run_ort(pruned, {"features": features.numpy()})["embedding"], expected, atol=1e-5)
