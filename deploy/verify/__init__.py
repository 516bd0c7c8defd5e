"""engine -> report's accuracy: how close an engine's outputs are to a reference (closeness.py),
whether an engine computes its fake-quant model (engine_check.py: deploy build's verdict, which
the vendor benchmark applies too), where int8 error enters layer by layer (layer_debug.py) and
which layer costs the accuracy (sensitivity.py). Imports any library folder (common, rules,
quant, frontend, training, export, engines), never deploy.app."""
