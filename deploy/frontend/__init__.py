"""model -> prepared: capture with torch.export, lowering of the ATen graph to modules, and the
one generic pass (prepare.py) that places fake-quantizers by a target's rules, with the weighted
modules it swaps in and the plan it records. Imports deploy.common, deploy.rules and
deploy.quant."""
