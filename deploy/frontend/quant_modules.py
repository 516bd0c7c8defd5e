"""Weighted layers with fake-quantized weights: what the front end swaps Conv/Linear(+BN) for.

QuantConvBn folds BatchNorm into the weights the quantizer sees, as deployed engines do
(Jacob et al. 2018; Krishnamoorthi 2018, sec. 3.2): in training it first uses batch statistics
(the real BN still runs, so running statistics keep updating), and after `freeze_bn()` it uses
the frozen running statistics; in eval mode it is exactly conv(x, Q(W_fold)) + b_fold, the
graph that gets exported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat_deploy.deploy.quant.fake_quant import FakeQuantize


def _conv(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Apply `module`'s convolution (any dimensionality, transposed or not) with a new weight."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[
            len(module.kernel_size)
        ]
        return fn(
            x,
            weight,
            bias,
            module.stride,
            module.padding,
            module.output_padding,
            module.groups,
            module.dilation,
        )
    if module.padding_mode != "zeros":
        x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        padding = 0
    else:
        padding = module.padding
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(module.kernel_size)]
    return fn(x, weight, bias, module.stride, padding, module.dilation, module.groups)


def _channel_shape(module: nn.Module, weight_axis: int) -> list[int]:
    shape = [1] * module.weight.dim()
    shape[weight_axis] = -1
    return shape


#: Op kinds of the modules below, all of which can round their bias as an int32 engine does.
BIASED_KINDS = ("conv", "conv_transpose", "linear")


class _ExportWeight(nn.Module):
    """A fake-quantized weight that export writes already inside its quantizer's range."""

    weight_quant: FakeQuantize
    #: the weight export writes, fixed when export mode is switched on (see set_export_mode)
    _export_weight: torch.Tensor | None = None

    def float_weight(self) -> torch.Tensor:
        """The wrapped layer's own (float, trainable) weight."""
        raise NotImplementedError

    def set_export_mode(self, enabled: bool) -> None:
        with torch.no_grad():
            weight = self.float_weight().detach()
            fixed = self.weight_quant.within_range(weight).clone() if enabled else None
        self.__dict__["_export_weight"] = fixed

    def quantized_weight(self) -> torch.Tensor:
        weight = self.float_weight() if self._export_weight is None else self._export_weight
        return self.weight_quant(weight)

    def export_weight(self) -> torch.Tensor:
        """The fake-quantized weight export writes as integer codes (in export mode): what
        deploy.verify.provenance holds a QDQ file's weights to."""
        return self.weight_quant(self._export_weight)


class _EngineBias(_ExportWeight):
    """Bias as an int8 kernel adds it: round(b / (x_scale * w_scale)) in the int32 accumulator
    (straight-through gradient), once round_bias_with() names the data-input quantizer."""

    _bias_source: FakeQuantize | None = None

    def round_bias_with(self, source: FakeQuantize) -> None:
        self.__dict__["_bias_source"] = source  # a reference, not a second owner in state_dict

    def engine_bias(self, bias: torch.Tensor | None) -> torch.Tensor | None:
        """Call after weight_quant ran, so its scale belongs to this weight."""
        source, weight_quant = self._bias_source, self.weight_quant
        if (
            bias is None
            or source is None
            or weight_quant.export_mode  # export writes float bias; its post-pass rounds it
            or not (bool(source.fake_quant_enabled) and bool(weight_quant.fake_quant_enabled))
        ):
            return bias
        scale = source.effective_qparams()[0] * weight_quant.effective_qparams()[0]
        scale = scale.to(bias.dtype)
        codes = torch.clamp(torch.round(bias / scale), -(2**31), 2**31 - 1)
        return bias + (codes * scale - bias).detach()


class QuantConv(_EngineBias):
    """Conv / ConvTranspose with a fake-quantized weight."""

    def __init__(self, conv: nn.Module, weight_quant: FakeQuantize, kind: str) -> None:
        super().__init__()
        self.conv = conv
        self.weight_quant = weight_quant
        self.op_kind = kind

    def float_weight(self) -> torch.Tensor:
        return self.conv.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        return _conv(self.conv, x, weight, self.engine_bias(self.conv.bias))


class QuantLinear(_EngineBias):
    """Linear with a fake-quantized weight."""

    op_kind = "linear"

    def __init__(self, linear: nn.Linear, weight_quant: FakeQuantize) -> None:
        super().__init__()
        self.linear = linear
        self.weight_quant = weight_quant

    def float_weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.engine_bias(self.linear.bias))


class QuantConvBn(_EngineBias):
    """Conv followed by BatchNorm, with BN folded into the quantized weight."""

    def __init__(
        self,
        conv: nn.Module,
        bn: nn.modules.batchnorm._BatchNorm,
        weight_quant: FakeQuantize,
        kind: str,
        weight_axis: int,
    ) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.weight_quant = weight_quant
        self.op_kind = kind
        self.weight_axis = weight_axis
        self.register_buffer("bn_frozen", torch.tensor(False))
        self._export: tuple[torch.Tensor, torch.Tensor] | None = None

    def set_export_mode(self, enabled: bool) -> None:
        """Precompute the folded weight and bias as constants, so the exported graph holds
        W_fold -> QuantizeLinear -> DequantizeLinear -> Conv and no BN arithmetic."""
        if not enabled:
            self._export = None
            return
        with torch.no_grad():
            weight, bias = self.folded_weight_and_bias()
        weight = self.weight_quant.within_range(weight)
        self._export = (weight.detach().clone(), bias.detach().clone())

    def export_weight(self) -> torch.Tensor:
        return self.weight_quant(self._export[0])

    def freeze_bn(self, frozen: bool = True) -> None:
        """From now on fold with running statistics and stop updating them."""
        self.bn_frozen.fill_(frozen)

    def folded_weight_and_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W * gamma / sigma and (b - mu) * gamma / sigma + beta, from running statistics."""
        factor = self._factor()
        weight = self.conv.weight * factor.reshape(_channel_shape(self.conv, self.weight_axis))
        bias = self.conv.bias if self.conv.bias is not None else torch.zeros_like(factor)
        return weight, (bias - self.bn.running_mean) * factor + self._beta()

    def _factor(self) -> torch.Tensor:
        gamma = self.bn.weight if self.bn.affine else torch.ones_like(self.bn.running_var)
        return gamma / torch.sqrt(self.bn.running_var + self.bn.eps)

    def _beta(self) -> torch.Tensor:
        return self.bn.bias if self.bn.affine else torch.zeros_like(self.bn.running_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._export is not None:
            weight, bias = self._export
            return _conv(self.conv, x, self.weight_quant(weight), bias)
        weight, bias = self.folded_weight_and_bias()
        q_weight = self.weight_quant(weight)
        if not self.training or bool(self.bn_frozen):
            return _conv(self.conv, x, q_weight, self.engine_bias(bias))
        # Batch statistics: undo the running-stat folding factor on the conv output, then let
        # the real BN normalise with this batch's statistics (and update its running ones).
        factor = self._factor()
        safe = torch.where(factor.abs() < 1e-12, torch.full_like(factor, 1e-12), factor)
        y = _conv(self.conv, x, q_weight, None)
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y / safe.reshape(shape)
        if self.conv.bias is not None:
            y = y + self.conv.bias.reshape(shape)
        return self.bn(y)


class QuantEmbedding(_ExportWeight):
    """Embedding with a fake-quantized (per-row int8) table: weight-only, the lookup is float."""

    op_kind = "embedding"

    def __init__(self, embedding: nn.Embedding, weight_quant: FakeQuantize) -> None:
        super().__init__()
        self.embedding = embedding
        self.weight_quant = weight_quant

    def float_weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.quantized_weight(), self.embedding.padding_idx)
