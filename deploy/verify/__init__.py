"""engine -> report's accuracy: how close an engine's outputs are to a reference (closeness.py),
where int8 error enters layer by layer (layer_debug.py) and which layer costs the accuracy
(sensitivity.py). Imports any library folder (common, rules, quant, frontend, training, export,
engines), never deploy.app."""
