"""Model zoo: project-owned definitions (torchvision is not importable beside our torch)."""

from qat_deploy.models.registry import ModelSpec, get_model_spec, list_models, load_model

__all__ = ["ModelSpec", "get_model_spec", "list_models", "load_model"]
