"""`python -m fatezero_cli` runs the `fatezero` command."""

from fatezero_cli.cli import main

main()
