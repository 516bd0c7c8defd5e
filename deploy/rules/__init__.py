"""The one op vocabulary (ops.py: what a node of a captured graph, an ONNX graph or a built
engine is) and the schema and interpreter of a backend's rules (backend.py), which the front end,
the linter and the tuner all call, so a prepared model's export passes lint by construction. The
rules themselves are data in backends/<name>/rules.py. Imports deploy.common and
deploy.quant.spec."""
