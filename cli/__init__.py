"""The `pfl` command line (Typer)."""
