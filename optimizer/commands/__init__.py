"""The `optimize` subcommands, one module each; optimizer/cli.py imports a module only when its command runs."""
