"""The `minillm` command-line app (Typer). `main.py` assembles the commands defined in the sibling modules."""
