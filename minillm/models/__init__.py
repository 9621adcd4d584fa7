"""The model zoo. Each architecture registers itself here (see `registry.py`)."""
