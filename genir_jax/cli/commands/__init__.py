"""One module per `genir-jax` subcommand (see `genir_jax.cli.main`)."""
