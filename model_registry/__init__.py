"""MLflow registry and the Triton model repository."""
