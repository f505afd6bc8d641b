"""The `sculpt.*` metadata keys: what one stage leaves in the model for a later one (DESIGN.md, "Contracts").

Writers and readers import the key from here, so a runtime never imports a pass to learn where a plan lives.
"""

QUANT = "sculpt.quant"  # quantize pass / QAT export: weight bits, scales, frac lengths (JSON)
BITSLICE = "sculpt.bitslice"  # bit-slice pass: per-layer slices and the ADC plan, read by the reram runtime
ACTIVATION_MASKS = "sculpt.activation_masks"  # activation-prune pass: the masks it inserted
SPARSIFY = "sculpt.sparsify"  # sparsify pass: pattern and target
DEPTH = "sculpt.depth"  # depth pass: blocks removed or inserted
MOLE = "sculpt.mole"  # mole pass: morphed input and the key's fingerprint (never the key)
REGULARIZER = "sculpt.regularizer"  # training export: the sparsity regularizer's terms
GROUPS = "sculpt.groups"  # training export: the regularized layer groups
