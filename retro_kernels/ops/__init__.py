"""Public ops: validation, backend dispatch and torch custom-op registration."""
