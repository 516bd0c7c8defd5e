"""Acceptance on real third-party architectures (models/thirdparty.py), fast subset.

The front end was written against our own models; these are torchvision's and Hugging Face's
as their authors wrote them (hardswish SE, channel shuffle, HF BERT with a mask). On every
target, prepare + calibrate + export must give a QDQ graph that lints clean, without falling
back to the generic placement. Small inputs keep the file well under 90 s; the full zoo at
full size is benchmarks/zoo.py.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import cache
from pathlib import Path

import onnx
import pytest
import torch
from torch import nn

from qat_deploy.models import thirdparty

thirdparty.install_torchvision_shim()  # before any import of torchvision, timm, transformers
pytest.importorskip("torchvision")
pytest.importorskip("timm")
pytest.importorskip("transformers")

from qat_deploy.deploy.export.qdq import export  # noqa: E402
from qat_deploy.deploy.frontend.prepare import prepare  # noqa: E402
from qat_deploy.deploy.lint import lint  # noqa: E402
from qat_deploy.deploy.rules.backend import available_targets  # noqa: E402
from qat_deploy.deploy.training.calibrate import calibrate  # noqa: E402

TARGETS = available_targets()
SEQ = 32

Example = torch.Tensor | dict[str, torch.Tensor]

#: name -> factory call with a small input; the factories' defaults are the full-size models.
SUBSET: dict[str, Callable[[], tuple[nn.Module, object]]] = {
    "mobilenet_v3_small": lambda: thirdparty.tv_mobilenet_v3_small(size=96),
    "shufflenet_v2_x0_5": lambda: thirdparty.tv_shufflenet_v2_x0_5(size=96),
    "squeezenet1_1": lambda: thirdparty.tv_squeezenet1_1(size=96),
    "hf_bert_2l": lambda: thirdparty.hf_bert(layers=2, hidden=128, heads=2, seq_len=SEQ),
    "hf_t5_1l": lambda: thirdparty.hf_t5_encoder(layers=1, hidden=64, heads=2, seq_len=SEQ),
    "hf_wav2vec2_1l": lambda: thirdparty.hf_wav2vec2(layers=1, hidden=64, heads=2, samples=4000),
}
#: Through prepare + export + lint on every target. The ONNX export takes ~25 s per target
#: for MobileNetV3-Small or ShuffleNetV2 on 2 CPUs whatever the input size, which would blow
#: the file's 90 s budget: those two run through benchmarks/zoo.py instead.
ACCEPTANCE = ("squeezenet1_1", "hf_bert_2l")


@cache
def built(name: str) -> tuple[nn.Module, object]:
    torch.manual_seed(0)
    return SUBSET[name]()


def examples(declared: object, batch: int, seed: int) -> Example:
    """Random inputs for an image shape or a token-input declaration; masks end in padding."""
    gen = torch.Generator().manual_seed(seed)
    if not isinstance(declared, dict):
        return torch.randn((batch, *declared[1:]), generator=gen)
    ids = declared["input_ids"]
    shape = (batch, *ids["shape"][1:])
    mask = torch.ones(shape, dtype=torch.int64)
    mask[:, shape[1] * 3 // 4 :] = 0
    token_ids = torch.randint(0, ids["vocab_size"], shape, generator=gen)
    return {"input_ids": token_ids, "attention_mask": mask}


def run(model: nn.Module, x: Example) -> torch.Tensor:
    with torch.no_grad():
        return model(**x) if isinstance(x, dict) else model(x)


def test_zoo_covers_the_families() -> None:
    assert len(thirdparty.ZOO) >= 15
    families = " ".join(family for _, family in thirdparty.ZOO.values())
    for needle in ("SE", "shuffle", "concat", "Ghost", "RepVGG", "LayerNorm", "ConvTranspose"):
        assert needle in families
    assert "nn.MultiheadAttention" in families and "BERT" in families
    for needle in ("segmentation", "weight standardised", "relative position bias", "audio"):
        assert needle in families
    assert thirdparty.HEAVY <= set(thirdparty.ZOO)
    for factory, _ in thirdparty.ZOO.values():  # `--model pkg.mod:factory` calls it bare
        required = [
            p
            for p in inspect.signature(factory).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        assert not required, factory.__name__


def test_shim_is_idempotent() -> None:
    thirdparty.install_torchvision_shim()
    thirdparty.install_torchvision_shim()
    import torchvision

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]], dtype=torch.float32)
    assert torchvision.models.shufflenet_v2_x0_5 is not None
    # torchvision.ops.nms refuses without its C++ extension; the registered op is the shim's
    kept = torch.ops.torchvision.nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert kept.tolist() == [0, 2]


@pytest.mark.parametrize("name", list(SUBSET))
def test_factory_builds_and_runs(name: str) -> None:
    model, declared = built(name)
    assert not model.training
    out = run(model, examples(declared, 2, seed=1))
    assert out.shape[0] == 2
    assert torch.isfinite(out).all()
    assert out.std() > 0  # random weights that give a constant output test nothing
    if isinstance(declared, dict):
        assert list(declared) == ["input_ids", "attention_mask"]
        assert out.shape[1] == SEQ


class _Block(nn.Module):
    """A residual block as timm initialises one: its branch switched off at the last norm
    and by a 1e-6 layer scale; a class token and a bias at zero, which are not switches."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)
        self.gamma = nn.Parameter(torch.full((4,), 1e-6))
        self.cls_token = nn.Parameter(torch.zeros(1, 4))
        nn.init.zeros_(self.bn.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma[:, None, None] * self.bn(self.conv(x))


def test_wake_residual_branches_switches_on_only_branch_scales() -> None:
    block = _Block().eval()
    x = torch.randn(2, 4, 3, 3)
    assert torch.allclose(run(block, x), x, atol=1e-5)  # the branch is dead as initialised
    conv_weight = block.conv.weight.detach().clone()
    torch.manual_seed(0)
    assert thirdparty.wake_residual_branches(block) == 2
    for scale in (block.bn.weight, block.gamma):
        assert 0.1 <= scale.min() and scale.max() <= 1.0 and scale.std() > 0  # per channel
    assert torch.equal(block.conv.weight, conv_weight)
    assert not block.conv.bias.any() and not block.cls_token.any()
    assert (run(block, x) - x).abs().mean() > 0.01  # the branch contributes


def test_zoo_levit_has_no_dead_branch() -> None:
    """LeViT zero-inits the last BatchNorm of every attention and MLP branch: the zoo's copy
    must not, or a runtime folds the branches away (see wake_residual_branches)."""
    torch.manual_seed(0)
    model, _ = thirdparty.timm_levit_128s(size=64)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    assert norms and all(m.weight.abs().max() > 1e-3 for m in norms)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", ACCEPTANCE)
def test_prepares_exports_and_lints_clean(name: str, target: str, tmp_path: Path) -> None:
    model, declared = built(name)
    example = examples(declared, 1, seed=0)
    prepared = prepare(model, target, example)
    assert prepared.plan.mode != "fallback", f"{name} fell back to generic placement"
    calibrate(prepared, [examples(declared, 2, seed=s) for s in (2, 3)], progress=False)
    path = export(prepared, tmp_path / "model.qdq.onnx", example)
    graph = onnx.load(str(path)).graph
    assert any(node.op_type == "QuantizeLinear" for node in graph.node)
    violations = lint(path, target)
    assert violations == [], "\n".join(str(v) for v in violations[:10])


def test_minilm_embedding_is_what_sentence_transformers_encodes() -> None:
    """The embedding factory against the vendor's own pipeline (tokenize, encode, pool,
    normalise) on real sentences: the figures benchmarks/minilm_sentences.py reports are of
    the model users run."""
    from benchmarks.minilm_sentences import sentences

    text = sentences(4)
    assert len(text) == 4 and all(len(s.split()) >= 6 for s in text)
    encoder = thirdparty.minilm_sentence_transformer()
    expected = encoder.encode(text, convert_to_tensor=True, normalize_embeddings=True)
    model, inputs = thirdparty.minilm_l6_embedding(seq_len=64)
    tokens = encoder.tokenizer(
        text, padding="max_length", truncation=True, max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        ours = model(tokens["input_ids"], tokens["attention_mask"])
    assert list(inputs) == ["input_ids", "attention_mask"]
    torch.testing.assert_close(ours, expected.to(ours.dtype), rtol=1e-4, atol=1e-5)
