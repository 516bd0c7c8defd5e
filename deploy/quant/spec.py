"""What a quantizer does, as plain data: bit width, sign, symmetry, granularity, narrow range."""

from __future__ import annotations

from dataclasses import dataclass, replace

from qat_deploy.deploy.common.errors import BadInputError


@dataclass(frozen=True)
class QuantSpec:
    """An integer grid and how a float range is mapped onto it.

    `axis` None means per-tensor; an int means one scale per slice along that axis.
    `narrow_range` drops the most negative code (int8 -> [-127, 127]) so the grid is
    symmetric around zero, as TensorRT and OpenVINO expect for weights.
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    axis: int | None = None
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise BadInputError(f"bit width {self.bits} is outside the supported 2..8")
        if self.narrow_range and not self.signed:
            raise BadInputError("narrow range only applies to signed quantization")

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1 if not self.signed else 2 ** (self.bits - 1) - 1

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def with_bits(self, bits: int) -> QuantSpec:
        return replace(self, bits=bits)

    def describe(self) -> str:
        kind = ("int" if self.signed else "uint") + str(self.bits)
        mode = "sym" if self.symmetric else "affine"
        gran = f"per-channel(axis={self.axis})" if self.per_channel else "per-tensor"
        narrow = " narrow" if self.narrow_range else ""
        return f"{kind} {mode}{narrow} {gran}"


#: Weights everywhere: int8 symmetric per-channel on the output-channel axis, narrow range.
INT8_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, axis=0, narrow_range=True)
#: TensorRT activations: int8 symmetric per-tensor, zero point 0.
INT8_SYM_ACT = QuantSpec(bits=8, signed=True, symmetric=True)
#: OpenVINO / onnxruntime activations: uint8 affine per-tensor.
UINT8_AFFINE_ACT = QuantSpec(bits=8, signed=False, symmetric=False)
