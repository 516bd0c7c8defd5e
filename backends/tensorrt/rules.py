"""TensorRT explicit-quantization rules (TensorRT developer guide, "Q/DQ layer-placement
recommendations"; NVIDIA/TensorRT#1992, #2592, #2774; ModelOpt concat handling).

- int8 only symmetric: activations int8 zero point 0, weights int8 per-channel narrow range.
- Quantize the inputs of weighted ops, not their outputs; TensorRT fuses Conv+BN+ReLU itself.
- Residual Add: Q/DQ on the skip branch only, so TensorRT fuses Conv(+BN)+Add(+ReLU); a Q/DQ
  between the Conv and the Add would break that fusion. A sum of parallel branches of one
  value (RepVGG) is no residual: it stays float (float_branch_sums below).
- AvgPool does not commute with quantization: quantize its input so it runs in int8.
- MaxPool, reshapes and Concat commute: TensorRT propagates Q/DQ through them, so Concat needs
  no per-input quantizers (its consumers' quantizer gives every input one shared scale).
"""

from qat_deploy.deploy.quant.spec import INT8_SYM_ACT, INT8_WEIGHT
from qat_deploy.deploy.rules.backend import CONV_FUSIONS, WEIGHTED_OPS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="tensorrt",
    activation=INT8_SYM_ACT,
    weight=INT8_WEIGHT,
    ops={
        **WEIGHTED_OPS,
        "add": OpRule(Inputs.SKIP_BRANCH),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
    },
    pass_through=frozenset(
        {"maxpool", "reshape", "transpose", "pad", "identity", "concat", "getitem"}
    ),
    # TensorRT also fuses the residual Add (and the ReLU after it) into the Conv
    fusions=(*CONV_FUSIONS, ("conv", "bn", "add", "relu")),
    # transformers (ModelOpt's BERT recipe): quantize Conv/Linear/MatMul inputs (the patch
    # embedding of a ViT is a Conv), keep Softmax, LayerNorm, GELU and residual Adds in float.
    transformer_ops=dict(WEIGHTED_OPS),
    weight_axis={"conv_transpose": 1},
    # ONNX post-passes (deploy/export/passes.py): the Pad of timm's "same" padding into the
    # Conv, as in the fp32 graph, instead of a float Pad before the Conv's quantizer
    export_passes=("fold_pad_into_conv",),
    # timm's fused qkv Linear (output reshaped, permuted and unbound into q, k, v): TensorRT-RTX
    # runs it on dequantized float weights (a CastMulFc kernel fed Int8/Float); written out as
    # three Linears it merges them back into one int8 gemm (DeiT-Tiny: 50 -> 62 of 62 int8)
    # ConvTranspose runs as a float deconv on TensorRT-RTX (SM80/86/89/120, every Q/DQ form a
    # helper tried); written out as Conv + pixel shuffle (DepthToSpace) it builds an int8
    # correlation (the U-Net's decoder)
    decompose=frozenset({"fused_projection", "conv_transpose"}),
    # RepVGG / ACNet blocks in training form (Conv branches merged by lowering + identity BN):
    # their sum is not a residual. A Q/DQ on the identity BN would let TensorRT fuse the Add
    # into the int8 Conv, but one per-tensor scale cannot hold that BN's per-channel gains
    # (random timm RepVGG-A0: fake-quant cosine vs fp32 0.73, exit 4); left float, the Conv
    # writes float into the Add and the next reader quantizes the sum once (0.91, 23/23 int8).
    float_branch_sums=True,
    # TensorRT's own calibrator (IInt8EntropyCalibrator2) minimises the KL divergence; with
    # symmetric int8, post-ReLU values get 128 codes, so clipping matters more than on the
    # uint8 CPU backends. Random timm RepVGG-A0 (zoo protocol), fake-quant cosine vs fp32 on
    # 64 held-out inputs: mse 0.87, entropy 0.94; on OpenVINO entropy scored higher on the
    # held-out calibration samples but lower on those inputs (0.89 vs mse 0.93), so the CPU
    # backends do not offer it.
    auto_observers=("minmax", "mse", "entropy"),
)
