"""Rule data that contradicts itself is refused when the backend's rules are defined."""

from __future__ import annotations

import dataclasses

import pytest

from qat_deploy.deploy.rules.backend import available_targets, get_rules


@pytest.mark.parametrize("target", available_targets())
def test_a_quantizer_goes_above_pass_through_kinds_only(target):
    rules = get_rules(target)
    assert rules.quantize_pass_through_inputs <= rules.pass_through
    # Softmax does not commute with quantization: a quantizer above it would change the model
    with pytest.raises(ValueError, match=f"{rules.name} rules: .*not pass-through: softmax"):
        dataclasses.replace(
            rules, quantize_pass_through_inputs=rules.quantize_pass_through_inputs | {"softmax"}
        )
