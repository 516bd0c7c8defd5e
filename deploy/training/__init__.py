"""prepared -> calibrated / trained: calibration, SmoothQuant, quantization-aware training with
its checkpoints, and data-parallel training across ranks. Imports deploy.common, deploy.rules,
deploy.quant, deploy.frontend and deploy.verify.closeness (SmoothQuant picks its strength by it)."""
