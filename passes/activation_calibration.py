"""Calibration for activation-prune: choose each mask's threshold t or winners k on calibration data.

Sites are calibrated in graph order with the earlier masks already active (masking one layer changes what the
next one sees), through one onnxruntime session whose mask parameters are graph inputs. Every fit aims at the
*measured* sparsity of the masked tensor, natural zeros included:

    threshold  t = smallest value with P(|x| <= t) >= target           (t = 0 when natural zeros already suffice)
    wta        k = winners per sample whose mean sparsity is closest to the target, counting natural zeros
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from optimizer.activation_stats import ProbeSession
from optimizer.verify import top1

NP_TYPES = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
}


class Calibrator:
    """Chooses t or k per site on calibration data, layer by layer in graph order (earlier masks active)."""

    def __init__(self, session: ProbeSession, sites: list, options, feeds: dict[str, np.ndarray]):
        self.session, self.sites, self.options, self.feeds = session, sites, options, feeds
        self._unmasked: dict[str, np.ndarray] | None = None

    def disabled(self) -> dict[str, object]:
        """Parameters that make every mask an exact identity (t = -inf, k = all units)."""
        if self.options.method == "wta":
            return {s.tensor: s.units for s in self.sites}
        return {s.tensor: -np.inf for s in self.sites}

    def param_feeds(self, params: dict[str, object]) -> dict[str, np.ndarray]:
        feeds = {}
        for site in self.sites:
            if self.options.method == "wta":
                feeds[site.param_name] = np.array([params[site.tensor]], dtype=np.int64)
            else:
                feeds[site.param_name] = np.array(params[site.tensor], dtype=NP_TYPES[site.elem_type])
        return feeds

    def run(self, feeds: dict[str, np.ndarray], params: dict[str, object]) -> dict[str, np.ndarray]:
        return self.session.run({**feeds, **self.param_feeds(params)})

    def unmasked(self) -> dict[str, np.ndarray]:
        """Outputs and probes of the model with every mask disabled, on the calibration data (cached)."""
        if self._unmasked is None:
            self._unmasked = self.run(self.feeds, self.disabled())
        return self._unmasked

    def calibrate(self, sparsity: float) -> dict[str, object]:
        targets = self.targets(sparsity)
        params = self.disabled()
        for index, site in enumerate(self.sites):
            values = self.unmasked() if index == 0 else self.run(self.feeds, params)
            params[site.tensor] = self.fit(site, values[site.pre_mask], targets[site.tensor])
        return params

    def targets(self, sparsity: float) -> dict[str, float]:
        if self.options.scope == "uniform":
            return {s.tensor: sparsity for s in self.sites}
        keys = {s.tensor: np.sort(self.cut_keys(s, self.unmasked()[s.pre_mask])) for s in self.sites}
        return global_shares(keys, sparsity)

    def cut_keys(self, site, values: np.ndarray) -> np.ndarray:
        """Per element, the value a global cut compares: the magnitude, or its channel's score (channel WTA);
        exact zeros stay 0, so a cut at c zeroes every element whose key is <= c."""
        magnitude = np.abs(values.astype(np.float64))
        if self.options.method == "wta" and self.options.granularity == "channel" and values.ndim >= 3:
            score = _channel_scores(magnitude, self.options.score)
            magnitude = np.where(magnitude > 0, score.reshape(score.shape + (1,) * (values.ndim - 2)), 0.0)
        return magnitude.ravel()

    def fit(self, site, values: np.ndarray, target: float) -> object:
        magnitude = np.abs(values.astype(np.float64))
        if self.options.method == "threshold":
            return fit_threshold(magnitude, target)
        if self.options.granularity == "channel" and values.ndim >= 3:
            return fit_channel_k(magnitude, target, self.options.score)
        return fit_element_k(magnitude.reshape(len(magnitude), -1), target)


def fit_threshold(magnitude: np.ndarray, target: float) -> float:
    """Smallest t >= 0 with P(|x| <= t) >= target over all calibration elements (t = 0 keeps natural zeros)."""
    flat = magnitude.ravel()
    rank = math.ceil(target * flat.size) - 1
    if rank < 0:
        return 0.0
    return float(np.partition(flat, rank)[rank])


def fit_element_k(magnitude: np.ndarray, target: float) -> int:
    """k (winners per sample, of F) whose mean sparsity max(1 - k/F, natural) is closest to the target."""
    features = magnitude.shape[1]
    nonzero = np.count_nonzero(magnitude > 0, axis=1)
    ks = np.arange(1, features + 1)
    kept = np.minimum(ks[:, None], nonzero[None, :]).mean(axis=1)
    return int(ks[np.argmin(np.abs((1.0 - kept / features) - target))])


def fit_channel_k(magnitude: np.ndarray, target: float, score: str) -> int:
    """k (channels per sample) whose mean element sparsity (dropped channels plus natural zeros) is closest."""
    scores = _channel_scores(magnitude, score)
    nonzero = np.count_nonzero(magnitude.reshape(*magnitude.shape[:2], -1) > 0, axis=2)
    order = np.argsort(-scores, axis=1, kind="stable")
    kept = np.cumsum(np.take_along_axis(nonzero, order, axis=1), axis=1).mean(axis=0)
    sparsity = 1.0 - kept / magnitude[0].size
    return int(np.argmin(np.abs(sparsity - target))) + 1


def _channel_scores(magnitude: np.ndarray, score: str) -> np.ndarray:
    spatial = tuple(range(2, magnitude.ndim))
    return magnitude.mean(axis=spatial) if score == "mean" else magnitude.max(axis=spatial)


def global_shares(sorted_keys: dict[str, np.ndarray], sparsity: float) -> dict[str, float]:
    """Per-layer targets from one cut c over every layer's keys, chosen so that the element-weighted fraction of
    keys <= c is the requested sparsity (layers with large activations keep more, as in global magnitude pruning)."""
    total = sum(keys.size for keys in sorted_keys.values())

    def zero_fraction(cut: float) -> float:
        return sum(np.searchsorted(keys, cut, side="right") for keys in sorted_keys.values()) / total

    low, high = 0.0, max(float(keys[-1]) for keys in sorted_keys.values() if keys.size)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if zero_fraction(middle) < sparsity else (low, middle)
    cut = high if zero_fraction(low) < sparsity else low
    return {
        name: float(np.searchsorted(keys, cut, side="right") / max(keys.size, 1)) for name, keys in sorted_keys.items()
    }



def limit_accuracy_drop(calibrator: Calibrator, evaluation, labels, options, ctx) -> tuple[dict, float, list]:
    """The largest target a * sparsity (bisection on a, 6 steps) whose masks lose at most max_drop top-1 points.
    Returns the parameters, the target reached and every (target, accuracy drop) tried."""
    output = calibrator.session.output_names[0]
    baseline = top1(calibrator.run(evaluation, calibrator.disabled())[output], labels)
    search = []

    def attempt(target: float) -> tuple[dict, bool]:
        params = calibrator.calibrate(target)
        drop = 100.0 * (baseline - top1(calibrator.run(evaluation, params)[output], labels))
        search.append({"target": target, "accuracy_drop": drop})
        return params, drop <= options.max_drop

    params, ok = attempt(options.sparsity)
    if ok:
        return params, options.sparsity, search
    best, low, high = calibrator.calibrate(0.0), 0.0, 1.0
    for step in range(6):
        ctx.report_progress("activation-prune: max_drop search", (step + 1) / 6)
        middle = (low + high) / 2
        candidate, ok = attempt(options.sparsity * middle)
        if ok:
            best, low = candidate, middle
        else:
            high = middle
    return best, options.sparsity * low, search
