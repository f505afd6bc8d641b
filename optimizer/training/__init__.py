"""The PyTorch training frontend: regularizers, QAT, a trainer, export and the training-time methods (AutoGrow, MoLe,
MESA, feedback learning, the conditional transferring-features GAN).

Importing this package is light: torch loads on first use of a name below (PEP 562 lazy attributes), and a
missing torch is reported as MissingDependency naming the `train` extra.

    from optimizer.training import SparsityRegularizer, Term, Trainer, TrainConfig, export
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "regularizers": ("l1", "group_lasso", "group_norms", "hoyer", "hoyer_square", "group_hoyer_square",
                     "bitslice_l1", "magnitude_slices", "SparsityRegularizer", "Term"),
    "masks": ("Layer", "Masks", "select_layers", "threshold_masks", "zero_filters", "zero_input_channels"),
    "quantization": ("WeightQuantizer", "ActivationQuantizer", "QuantLinear", "QuantConv1d", "QuantConv2d",
                     "prepare_qat", "fake_quantize_ste"),
    "trainer": ("Trainer", "TrainConfig", "build_optimizer", "seed_everything"),
    "export": ("export",),
    "activation": ("WTADropout", "ActivationThreshold", "ThresholdSchedule", "activation_density"),
    "autogrow": ("GrowingNet", "GrowthPolicy", "GrowConfig", "GrowthRecord", "GrowthResult", "auto_grow", "grow",
                 "carry_optimizer", "hold_out", "train_fixed"),
    "mole": ("AugConv", "conv_geometry", "key_for_conv"),
    "mesa": ("Mine", "StatisticsNetwork", "TriggerGenerator", "SearchConfig", "SearchResult", "stamp_trigger",
             "random_locations", "poison_batch", "fixed_trigger", "attack_success_rate", "search_trigger",
             "search_triggers", "ensemble_sampler", "detect_target", "poisoned_training", "backdoor_attack",
             "retrain_with_triggers", "reverse_trigger"),
    "feedback": ("BoundarySearch", "Boundary", "boundary_search", "ClassCriteria", "class_criteria", "allocate",
                 "Generated", "generate_examples", "FeedbackConfig", "FeedbackRound", "FeedbackResult",
                 "feedback_learning", "fgsm", "pgd", "adversarial_transform", "noisy_correct", "RobustnessReport",
                 "robustness_report", "format_table"),
    "gan": ("Generator", "ProjectionDiscriminator", "GANConfig", "GanSampler", "GANResult", "train_gan", "rotate",
            "rotation_loss", "discriminator_hinge_loss", "generator_hinge_loss", "recalibrate"),
    "gan_transfer": ("Degradation", "degrade", "gaussian_kernel", "QualityPools", "quality_pools", "TransferBranch",
                     "TransferConfig", "train_transfer", "ClassPrior"),
    "gan_metrics": ("Judge", "frechet_distance", "mean_pairwise_distance", "diversity_ratio", "GenerationMetrics",
                    "generation_metrics"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        import torch  # noqa: F401
    except ImportError:
        from optimizer.errors import MissingDependency

        raise MissingDependency("torch", "train") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
