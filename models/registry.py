"""Model lookup by name or by ``package.module:factory`` reference.

Built-in names map to the models in this package. A user reference names a zero-argument
factory that returns either an ``nn.Module`` or a ``(nn.Module, input_shape)`` tuple; when the
factory returns a bare module the caller must supply ``input_shape``. A caller-supplied
``input_shape`` always wins over the factory's. Every failure to resolve a model is the user's
to fix, so it is raised as a one-line ``BadInputError``.
"""

from __future__ import annotations

import difflib
import importlib
import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from deploy.errors import BadInputError, one_line
from models.bert_tiny import BertConfig, bert_tiny
from models.mnist_cnn import mnist_cnn
from models.mobilenet_v2 import mobilenet_v2
from models.resnet import resnet18, resnet50

INPUT_DTYPES = ("float32", "int64")
_WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model besides its weights."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    input_dtype: str = "float32"  # one of INPUT_DTYPES
    default_data: str = "synthetic"  # a data set name known to deploy.data
    task: str = "classification"
    description: str = ""
    vocab_size: int | None = None  # int64 token-id inputs are drawn from [0, vocab_size)
    weights: str | None = None  # trained state_dict shipped in models/weights/


_IMAGENET = (1, 3, 224, 224)
_BERT = BertConfig()

_REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "resnet18",
            resnet18,
            _IMAGENET,
            description="ResNet-18, torchvision layout, 1000 classes",
        ),
        ModelSpec(
            "resnet50",
            resnet50,
            _IMAGENET,
            description="ResNet-50 (v1.5), torchvision layout, 1000 classes",
        ),
        ModelSpec(
            "mobilenet_v2",
            mobilenet_v2,
            _IMAGENET,
            description="MobileNetV2 width 1.0, torchvision layout, 1000 classes",
        ),
        ModelSpec(
            "mnist_cnn",
            mnist_cnn,
            (1, 1, 16, 16),
            default_data="digits",
            description="two-conv digit classifier, 16x16 upsampled digits, 10 classes",
            weights="mnist_cnn_digits.pt",
        ),
        ModelSpec(
            "bert_tiny",
            bert_tiny,
            (1, _BERT.seq_len),
            input_dtype="int64",
            vocab_size=_BERT.vocab_size,
            description=f"{_BERT.layers}-layer BERT-style encoder, hidden {_BERT.hidden}, "
            f"{_BERT.heads} heads, {_BERT.num_classes}-class head",
        ),
    )
}


def list_models() -> list[str]:
    """Built-in model names, sorted."""
    return sorted(_REGISTRY)


def get_model_spec(
    name_or_ref: str, input_shape: tuple[int, ...] | None = None, input_dtype: str | None = None
) -> ModelSpec:
    """Spec of a built-in name or a user reference.

    A user reference's factory is called once, because it may be what declares the shape.
    """
    if ":" in name_or_ref:
        return load_model(name_or_ref, input_shape=input_shape, input_dtype=input_dtype)[1]
    return _override(_builtin(name_or_ref), input_shape, input_dtype)


def load_model(
    ref: str,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    pretrained: bool = False,
) -> tuple[nn.Module, ModelSpec]:
    """Build the model in eval mode with weights seeded by ``seed``; global RNG untouched.
    pretrained=True loads the shipped trained weights where the model has them."""
    if ":" in ref:
        factory = _import_factory(ref)
        module, factory_shape = _call_user_factory(ref, factory, seed)
        shape = input_shape if input_shape is not None else factory_shape
        if shape is None:
            raise BadInputError(
                f"model '{ref}' returned no input shape; pass an input shape "
                "(e.g. 1x3x224x224) or return (module, shape) from the factory"
            )
        spec = ModelSpec(
            ref,
            _module_only(factory),
            _check_shape(ref, shape),
            _check_dtype(ref, input_dtype or "float32"),
            description=f"user model {ref}",
        )
        return module.eval(), spec
    spec = _override(_builtin(ref), input_shape, input_dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.factory()
        if spec.default_data == "synthetic" and spec.input_dtype == "float32":
            _estimate_bn_statistics(module, spec.input_shape)
    if pretrained and spec.weights is not None:
        state = torch.load(_WEIGHTS_DIR / spec.weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    return module.eval(), spec


def _estimate_bn_statistics(module: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Random-weight zoo models stand in for trained ones. With BN's initial statistics their
    activations shrink or blow up layer by layer (MobileNetV2 logits ~1e-9), which makes
    calibration and accuracy checks meaningless; statistics measured on random images give
    the normalised activations a trained network has."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    module.train()
    with torch.no_grad():
        for _ in range(4):
            module(torch.randn(4, *input_shape[1:]))
    for bn in bns:
        bn.momentum = 0.1


def _builtin(name: str) -> ModelSpec:
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, _REGISTRY, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise BadInputError(
        f"unknown model '{name}'{hint}; known: {', '.join(list_models())}; "
        "or pass package.module:factory"
    )


def _override(
    spec: ModelSpec, input_shape: tuple[int, ...] | None, input_dtype: str | None
) -> ModelSpec:
    changes: dict[str, object] = {}
    if input_shape is not None:
        changes["input_shape"] = _check_shape(spec.name, input_shape)
    if input_dtype is not None:
        changes["input_dtype"] = _check_dtype(spec.name, input_dtype)
    return replace(spec, **changes) if changes else spec


def _import_factory(ref: str) -> Callable[[], object]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr or ":" in attr:
        raise BadInputError(f"bad model reference '{ref}'; expected package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # user code: any failure to import is the user's to fix
        raise BadInputError(
            f"cannot import module '{module_name}' for model '{ref}': {one_line(exc)}"
        ) from exc
    factory = getattr(module, attr, None)
    if factory is None:
        raise BadInputError(f"module '{module_name}' has no attribute '{attr}' (model '{ref}')")
    if not callable(factory):
        raise BadInputError(f"'{ref}' is not callable; expected a factory function or class")
    return factory


def _call_user_factory(
    ref: str, factory: Callable[[], object], seed: int
) -> tuple[nn.Module, tuple[int, ...] | None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            result = factory()
        except Exception as exc:  # user code
            raise BadInputError(f"model factory '{ref}' raised {one_line(exc)}") from exc
    shape = None
    if isinstance(result, tuple) and len(result) == 2:
        result, shape = result
    if not isinstance(result, nn.Module):
        raise BadInputError(
            f"model factory '{ref}' returned {type(result).__name__}; expected "
            "an nn.Module or an (nn.Module, input_shape) tuple"
        )
    return result, shape


def _module_only(factory: Callable[[], object]) -> Callable[[], nn.Module]:
    """Wrap a user factory so ``ModelSpec.factory`` always returns just the module."""

    def build() -> nn.Module:
        result = factory()
        return result[0] if isinstance(result, tuple) else result

    return build


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    if (
        isinstance(shape, (tuple, list))
        and shape
        and all(
            isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape
        )
    ):
        return tuple(int(d) for d in shape)
    raise BadInputError(
        f"bad input shape {shape!r} for model '{name}'; "
        "expected positive integers such as (1, 3, 224, 224)"
    )


def _check_dtype(name: str, dtype: str) -> str:
    if dtype not in INPUT_DTYPES:
        raise BadInputError(
            f"bad input dtype '{dtype}' for model '{name}'; "
            f"expected one of {', '.join(INPUT_DTYPES)}"
        )
    return dtype
