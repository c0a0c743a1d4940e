"""Entry points: one module per `bonemet` subcommand / DVC stage. Thin wrappers over the library."""
