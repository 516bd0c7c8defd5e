"""OpenVINO CPU rules, as NNCF's CPU hardware config states them (setups/cpu.py, qspaces.py).

- Activations uint8 affine per-tensor (Convolution needs per-tensor activation dequantization),
  int8 symmetric where only Convs, Muls, pooling or float BatchNorms read a value that can be
  well below 0 (zero_point_free_readers), as NNCF's signed activations;
  weights int8 symmetric per-channel, narrow range.
- Quantize inputs of Convolution, MatMul, Add (both inputs in CNNs), Multiply, AvgPool,
  ReduceMean, Interpolate; Concat inputs share one scale; MaxPool, Reshape, Transpose and Pad
  are quantization-agnostic.
- Transformer mode (NNCF model_type=TRANSFORMER): quantize only Linear/MatMul inputs, with
  symmetric activations; Add, LayerNorm, Softmax and GELU stay float. Convolutions of
  transformers (ViT patch embedding, ConvNeXt) keep their int8 rule.
- Real CNNs (QDQ probes, OpenVINO 2026.4; int8/fp32 time): SiLU, HardSwish and HardSigmoid
  stay float with only the Conv inputs quantized (0.69 / 0.72 / 0.86; quantizing around them
  too: 0.83 / 1.0 / 0.83). ConvTranspose stays float: with a quantized input the CPU plugin
  runs Deconvolution in f32 anyway, plus the FakeQuantize (1.15x; with its output quantized
  too, 3.8x).
- Grouped Convs reading more than 64 channels per group, not a multiple of 64, stay float: on
  a Xeon with AMX-INT8 the CPU plugin's int8 kernel computes them wrong (timm MixNet-S).
"""

from qat_deploy.deploy.quant.spec import INT8_SYM_ACT, INT8_WEIGHT, UINT8_AFFINE_ACT
from qat_deploy.deploy.rules.backend import CONV_FUSIONS, WEIGHTED_OPS, BackendRules, Inputs, OpRule

RULES = BackendRules(
    name="openvino",
    activation=UINT8_AFFINE_ACT,
    weight=INT8_WEIGHT,
    ops={
        **{k: v for k, v in WEIGHTED_OPS.items() if k != "conv_transpose"},
        "add": OpRule(Inputs.ALL),
        "mul": OpRule(Inputs.ALL),
        "avgpool": OpRule(Inputs.ALL),
        "global_avgpool": OpRule(Inputs.ALL),
        "reduce_mean": OpRule(Inputs.ALL),
        "interpolate": OpRule(Inputs.ALL),
        "concat": OpRule(Inputs.ALL, shared_scale=True),
    },
    pass_through=frozenset({"maxpool", "reshape", "transpose", "pad", "identity", "getitem"}),
    fusions=CONV_FUSIONS,
    # NNCF's unified Concat scales: ShuffleNetV2 x0.5 with its split halves requantized u8 -> u8
    # (16 CPU-plugin Subgraphs) took 1.135x the time of the same graph without (paired, 3 runs)
    shared_scale_outputs_quantized=True,
    # NNCF's one quantizer above a MaxPool tree: GoogLeNet's stem MaxPool feeds inception 3a's
    # Convs and its pool branch's MaxPool; with the output quantizers placed after each, both
    # pools and the Conv before them ran in bf16 (paired: 1.024x the time of one quantizer
    # above). Reshapes, transposes and slices too, as in NNCF's default graphs: a Linear's
    # output reaching attention MatMuls through head reshapes and the q/k/v Gathers is then
    # quantized once, at the Linear, which writes int8, and the CPU plugin moves int8 instead
    # of bf16. Paired, median of 3, int8 speedup over fp32 with/without: torchvision ViT
    # 2.45x / 2.24x (NNCF's default model 2.26x), DeiT-Tiny 2.24x / 2.08x, HF BERT 2.95x /
    # 3.02x, LeViT-128S 1.60x / 1.58x; held-out cosine vs fp32 unchanged to 1e-4.
    quantize_pass_through_inputs=frozenset(
        {"maxpool", "reshape", "transpose", "getitem", "identity"}
    ),
    # The CPU plugin runs a gate's sigmoid as a post-op of the Conv before it, the quantizer
    # after it too: timm ECA-ResNet26t's Conv1d -> sigmoid -> view -> Mul then writes u8 and
    # the view moves u8, as in NNCF's graph (paired, median of 3: 0.965x the time of the
    # quantizer after the view).
    post_op_activations=frozenset({"sigmoid", "hardsigmoid"}),
    # NNCF's signed activations, where no Conv reads them: the CPU plugin runs a Mul, a
    # pooling or a float BatchNorm reading u8 data with a zero point as a Subgraph that
    # subtracts it first (DenseNet-121's 586 BN+ReLU Subgraphs after its Concats ran in bf16;
    # in i8 with zero point 0). A Concat is looked through to its readers. Paired, median of
    # 3, time over NNCF's before -> after (with drop_requantize_after_pass_through below):
    # timm ECA-ResNet26t 1.005 -> 0.978, torchvision DenseNet-121 1.021 -> 0.998; held-out
    # cosine vs fp32 within 0.001. Not Add: the CPU plugin fuses a residual Add into the Conv
    # before it, which reads the zero point itself (EfficientNetV2-B0, ResNeXt-50, RegNetY,
    # MobileNetV3-L with their Conv -> Add values int8 too: no change beyond noise, and
    # MobileNetV3-L's centred cosine fell 0.934 -> 0.918). SiLU, HardSwish and GELU outputs
    # keep uint8 (deploy.rules.backend.HARDLY_NEGATIVE): torchvision EfficientNet-B0 with its
    # SiLU outputs int8 ran 1.006 -> 0.994 but its centred cosine fell 0.894 -> 0.851.
    # A Conv too (the image into the stem, a block's output read only by the next block's
    # Convs, ECA's pooled vectors): the AMX Convs of a Xeon with AMX-INT8 ran ~25% slower on
    # u8 with a zero point (PERF_COUNT: ECA-ResNet26t's stem 107 vs 82 us). Harness, ours over
    # NNCF before -> after, untuned: ECA-ResNet26t 1.030 -> 1.004, DenseNet-121 1.032 -> 0.998.
    # That needs deploy.rules.backend.hardly_negative to look through pooling and gates: with
    # the squeeze-excite means and gated Muls of EfficientNet-B0 int8, its cosine vs fp32 fell
    # 0.9758 -> 0.9614; with them uint8 only near-symmetric values turn int8.
    zero_point_free_readers=frozenset(
        {"conv", "mul", "reduce_mean", "global_avgpool", "avgpool", "bn"}
    ),
    signed_activation=INT8_SYM_ACT,
    # OpenVINO 2026.4.1's CPU plugin on a Xeon with AMX-INT8 computes an int8 grouped Conv
    # with more than 64 input channels per group, not a multiple of 64, wrong: Q -> DQ ->
    # Conv(group 2, 240 -> 40, 1x1) -> Q put 95% of its codes up to 255 steps from
    # onnxruntime's, for uint8 or int8 input and any zero point; 48, 60, 64 and 128 channels
    # per group were exact. timm MixNet-S's 2-group pointwise Convs (120 per group) failed
    # deploy build's engine check (exit 4, cosine 0.87 vs the fake-quant model).
    float_grouped_conv_width=64,
    transformer_ops={
        "conv": WEIGHTED_OPS["conv"],
        "linear": OpRule(Inputs.ACTIVATION, activation=INT8_SYM_ACT),
        "matmul": OpRule(Inputs.ALL, activation=INT8_SYM_ACT),
    },
    weight_axis={"conv_transpose": 1},  # its weight is [in, out, ...]; lint reads the axis
    # ONNX post-passes (deploy/export/passes.py) that let openvino fuse more int8 kernels
    export_passes=(
        "fold_pad_into_conv",
        "fold_quantized_constants",
        "reduce_mean_keepdims",
        "quantize_before_pass_through",
        "drop_requantize_after_pass_through",
        "average_pool_floor_mode",
        # DenseNet-121 (zoo: BN scales 1, batch 1): 594 -> 63 Subgraphs; paired with the same
        # file without the pass, 0.78-0.81 of its time (3 orders). Mixed-sign BN scales or a
        # dynamic batch: OpenVINO does not split the quantizer, and the pass leaves those
        # ReLUs alone (rewritten, DenseNet-121 with mixed-sign scales took 1.013-1.015x).
        "relu_as_max_after_concat",
    ),
    # The CPU plugin fuses a residual Add into the Conv feeding it as a oneDNN sum post-op and
    # rounds only at the last post-op: that Conv's output quantizer becomes a clamp. Measured
    # with OpenVINO 2026.4 on random MobileNetV2: int8 vs a rounding fake-quant model cosine
    # 0.986, vs this emulation 0.9966; ResNet-18: error 6x lower with the first Conv operand
    # unrounded than with none or with the second (downsample) operand.
    unrounded_fused_add=True,
    # An Add of parallel Conv/BN branches of one input stays float (after lowering merged the
    # Conv branches: RepVGG's identity BN + the merged 3x3): the CPU plugin fuses it into the
    # int8 Conv as a float sum post-op, and the sum is quantized once, by its reader.
    float_branch_sums=True,
    # The CPU plugin's FakeQuantize rounds clamp(x) * k + b (k = levels / range, each step in
    # float32), a helper found bit-exact; ONNX's round(x / scale) codes differ at near-ties.
    # Random ShuffleNetV2 amplifies those flips: OpenVINO vs the fake-quant model cosine
    # 0.9980 -> 0.9994 and mean error 1.69 -> 0.87 output steps with this emulation.
    scale_shift_quantize=True,
    # oneDNN's u8s8 AVX2 kernels add product pairs in saturating int16 too (NNCF's
    # overflow_fix exists for this). Measured on an AMD EPYC without VNNI: 8-bit weights left
    # a random residual stack 1.84 mean output steps from its fake-quant model.
    int16_pair_sums_without_vnni=True,
    # SmoothQuant on Linear inputs, at the strength (or none) the calibration data favours
    # (deploy.training.smooth.choose_alpha; NNCF's OpenVINO default for MatMul is 0.95). The CPU
    # plugin folds the per-channel Mul into the FakeQuantize after it. Pretrained
    # all-MiniLM-L6-v2, fake-quant embedding cosine vs fp32 over 64 held-out inputs: 0.953
    # without; 0.5: 0.853, 0.8: 0.991, 0.9: 0.9923, 0.95: 0.9924, 1.0: 0.990. Random-weight
    # LeViT has no outliers to move: 0.994 without, 0.974 at 0.95.
    smooth_quant_alphas=(0.5, 0.8, 0.95),
    # Embedding tables int8 per row: the CPU plugin gathers from the compressed table
    # (int8 -> DequantizeLinear -> Gather, 30522x384 table, 128 ids, 2 threads on an AMD EPYC:
    # 0.78 ms vs 0.58 ms float; the file shrinks 46.9 -> 11.9 MB). Not on onnxruntime: it runs
    # that DequantizeLinear over the whole table on every call (17 ms there vs 0.08 ms).
    weight_only=frozenset({"embedding"}),
)
