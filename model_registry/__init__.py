"""MLflow tracking and registry, the Triton model repository, the Triton client (and its
in-process twin for tests), loading, verifying and rolling back served versions."""
