"""Model lookup by name or by ``package.module:factory`` reference.

Built-in names map to the models in this package. A user reference names a zero-argument
factory that returns an ``nn.Module``, an ``(nn.Module, input_shape)`` tuple, or an
``(nn.Module, {name: {"shape": ..., "dtype": ..., "range": ...}})`` tuple for several inputs;
when the factory returns a bare module the caller must supply the input shape or specs.
Caller-supplied inputs always win over the factory's. load_model names every input after its
forward() parameter and checks the names (models.inputs). Every failure to resolve a model is
the user's to fix, so it is raised as a one-line ``BadInputError``.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import io
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from qat_deploy.deploy.common.errors import BadInputError, one_line
from qat_deploy.models.bert_tiny import BertConfig, bert_tiny
from qat_deploy.models.digits_resnet import INPUT_SIZE as DIGITS_RESNET_SIZE
from qat_deploy.models.digits_resnet import digits_resnet
from qat_deploy.models.inputs import (
    DTYPES,
    InputSpec,
    bind_to_forward,
    check_dtype,
    check_shape,
    specs_from_mapping,
    with_vocab_ranges,
)
from qat_deploy.models.mnist_cnn import mnist_cnn
from qat_deploy.models.mobilenet_v2 import mobilenet_v2
from qat_deploy.models.resnet import resnet18, resnet50

INPUT_DTYPES = DTYPES
_WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """What the pipeline needs to know about a model besides its weights.

    Single-input models give input_shape/input_dtype; multi-input models give `inputs` (then
    input_shape/input_dtype are the first input's). `inputs` is always filled afterwards."""

    name: str
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...] = ()
    input_dtype: str = "float32"  # one of INPUT_DTYPES
    default_data: str = "synthetic"  # a data set name known to deploy.data
    task: str = "classification"
    description: str = ""
    vocab_size: int | None = None  # int64 token-id inputs are drawn from [0, vocab_size)
    weights: str | None = None  # trained state_dict shipped in models/weights/
    inputs: tuple[InputSpec, ...] = field(default=())  # in forward() order
    by_keyword: bool = False  # call model(**inputs) rather than model(x)

    def __post_init__(self) -> None:
        if self.inputs:
            object.__setattr__(self, "inputs", tuple(self.inputs))
            object.__setattr__(self, "input_shape", self.inputs[0].shape)
            object.__setattr__(self, "input_dtype", self.inputs[0].dtype)
            return
        if not self.input_shape:
            raise BadInputError(f"model '{self.name}' has neither input_shape nor inputs")
        vocab = (0, self.vocab_size) if self.vocab_size and self.input_dtype != "float32" else None
        single = InputSpec(None, tuple(self.input_shape), self.input_dtype, vocab)
        object.__setattr__(self, "inputs", (single,))


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
            "digits_resnet",
            digits_resnet,
            (1, 1, DIGITS_RESNET_SIZE, DIGITS_RESNET_SIZE),
            default_data="digits",
            description="residual digit classifier, 64x64 upsampled digits, 10 classes "
            "(the embedded default)",
            weights="digits_resnet_digits.pt",
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
    name_or_ref: str,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    inputs: Sequence[InputSpec] | None = None,
) -> ModelSpec:
    """Spec of a built-in name or a user reference.

    A user reference's factory is called once, because it may be what declares the shape.
    Built-in specs are not bound to forward(): a single input keeps name None ("input").
    """
    if ":" in name_or_ref:
        return load_model(
            name_or_ref, input_shape=input_shape, input_dtype=input_dtype, inputs=inputs
        )[1]
    return _override(_builtin(name_or_ref), input_shape, input_dtype, inputs)


def load_model(
    ref: str,
    seed: int = 0,
    input_shape: tuple[int, ...] | None = None,
    input_dtype: str | None = None,
    pretrained: bool = False,
    inputs: Sequence[InputSpec] | None = None,
) -> tuple[nn.Module, ModelSpec]:
    """Build the model in eval mode with weights seeded by ``seed``; global RNG untouched.
    pretrained=True loads the shipped trained weights where the model has them. ``inputs``
    (named specs) wins over ``input_shape``/``input_dtype``; the returned spec's inputs are
    named and ordered by the model's forward()."""
    if ":" in ref:
        factory = _import_factory(ref)
        module, declared = _call_user_factory(ref, factory, seed)
        spec = ModelSpec(
            ref,
            _module_only(factory),
            inputs=_user_inputs(ref, inputs, input_shape, input_dtype, declared),
            description=f"user model {ref}",
        )
        return module.eval(), _bound(spec, module)
    spec = _override(_builtin(ref), input_shape, input_dtype, inputs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = spec.factory()
        if spec.default_data == "synthetic" and spec.input_dtype == "float32":
            try:
                estimate_bn_statistics(module, spec.input_shape)
            except RuntimeError as exc:  # the first forward pass: a shape the model rejects
                shape = "x".join(map(str, spec.input_shape))
                raise BadInputError(
                    f"model '{ref}' does not take input shape {shape}: {one_line(exc)}"
                ) from exc
    if pretrained and spec.weights is not None:
        state = torch.load(_WEIGHTS_DIR / spec.weights, map_location="cpu", weights_only=True)
        module.load_state_dict(state)
    return module.eval(), _bound(spec, module)


def _user_inputs(
    ref: str,
    inputs: Sequence[InputSpec] | None,
    input_shape: tuple[int, ...] | None,
    input_dtype: str | None,
    declared: object,
) -> tuple[InputSpec, ...]:
    if inputs:
        return tuple(inputs)
    if input_shape is None and isinstance(declared, dict):
        return specs_from_mapping(declared, f"model factory '{ref}'")
    shape = input_shape if input_shape is not None else declared
    if shape is None:
        raise BadInputError(
            f"model '{ref}' returned no input shape; pass an input shape "
            "(e.g. 1x3x224x224) or return (module, shape) from the factory"
        )
    return (InputSpec(None, _check_shape(ref, shape), _check_dtype(ref, input_dtype or "float32")),)


def _bound(spec: ModelSpec, module: nn.Module) -> ModelSpec:
    """The spec with its inputs named, checked and ordered by the module's forward()."""
    specs, by_keyword = bind_to_forward(module, spec.inputs, spec.name)
    return replace(spec, inputs=with_vocab_ranges(module, specs), by_keyword=by_keyword)


def estimate_bn_statistics(
    module: nn.Module, input_shape: tuple[int, ...], batches: int = 4
) -> None:
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
        for _ in range(batches):
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
    spec: ModelSpec,
    input_shape: tuple[int, ...] | None,
    input_dtype: str | None,
    inputs: Sequence[InputSpec] | None = None,
) -> ModelSpec:
    if inputs:
        return replace(spec, inputs=tuple(inputs))
    changes: dict[str, object] = {"inputs": ()}  # re-derived from the new shape/dtype
    if input_shape is not None:
        changes["input_shape"] = _check_shape(spec.name, input_shape)
    if input_dtype is not None:
        changes["input_dtype"] = _check_dtype(spec.name, input_dtype)
    return replace(spec, **changes) if len(changes) > 1 else spec


def _import_factory(ref: str) -> Callable[[], object]:
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr or ":" in attr:
        raise BadInputError(f"bad model reference '{ref}'; expected package.module:factory")
    with _user_code(f"cannot import module '{module_name}' for model '{ref}'", module_name):
        module = importlib.import_module(module_name)
    factory = getattr(module, attr, None)
    if factory is None:
        raise BadInputError(f"module '{module_name}' has no attribute '{attr}' (model '{ref}')")
    if not callable(factory):
        raise BadInputError(f"'{ref}' is not callable; expected a factory function or class")
    return factory


def _call_user_factory(
    ref: str, factory: Callable[[], object], seed: int
) -> tuple[nn.Module, object]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with _user_code(f"model factory '{ref}' failed", ref):
            result = factory()
    shape = None  # a shape, or a dict of named input specs
    if isinstance(result, tuple) and len(result) == 2:
        result, shape = result
    if not isinstance(result, nn.Module):
        raise BadInputError(
            f"model factory '{ref}' returned {type(result).__name__}; expected "
            "an nn.Module, an (nn.Module, input_shape) or an (nn.Module, {name: spec}) tuple"
        )
    return result, shape


@contextlib.contextmanager
def _user_code(what: str, argv0: str) -> Iterator[None]:
    """Run a user's module or factory as library code: sys.argv holds only `argv0` (a module
    that parses the command line at import must not see deploy's options), what it prints is
    kept out of our output, and any way it fails, sys.exit() included, is one BadInputError
    quoting the last line it printed."""
    argv, printed = sys.argv, io.StringIO()
    sys.argv = [argv0]
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            yield
    except (Exception, SystemExit) as exc:  # user code: any failure is the user's to fix
        failure = (
            f"it exited with code {exc.code!r}" if isinstance(exc, SystemExit) else one_line(exc)
        )
        said = printed.getvalue().strip().splitlines()
        tail = f" (it printed: {said[-1].strip()})" if said else ""
        raise BadInputError(f"{what}: {failure}{tail}") from exc
    finally:
        sys.argv = argv


def _module_only(factory: Callable[[], object]) -> Callable[[], nn.Module]:
    """Wrap a user factory so ``ModelSpec.factory`` always returns just the module."""

    def build() -> nn.Module:
        result = factory()
        return result[0] if isinstance(result, tuple) else result

    return build


def _check_shape(name: str, shape: object) -> tuple[int, ...]:
    return check_shape(f"model '{name}'", shape)


def _check_dtype(name: str, dtype: str) -> str:
    return check_dtype(f"model '{name}'", dtype)
