"""QDQ ONNX -> engine: the adapter contract every backend fulfils (adapter.py; the adapters live
in backends/<name>/) and latency measured in interleaved blocks (timing.py). Imports
deploy.common and deploy.rules."""
