"""Prefect flows: thin sequences of idempotent calls into agents and the registry."""
