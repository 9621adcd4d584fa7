"""Commands of the `minillm` app defined in this module are added by `register(app)`."""

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to the app."""
