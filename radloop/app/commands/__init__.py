"""The `radloop` subcommands, one module per command group, registered by `radloop.app.cli`."""
