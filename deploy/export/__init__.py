"""calibrated -> QDQ ONNX: the torch.onnx export of a prepared model with int8 weight
initializers (qdq.py) and the ONNX post-passes that let a runtime fuse more of it (passes.py).
Imports deploy.common, deploy.rules and deploy.frontend."""
