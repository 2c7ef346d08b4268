"""CLI subcommands of this package (see phi3v_spatial/cli.py)."""
