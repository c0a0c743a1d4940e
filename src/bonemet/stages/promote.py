"""`bonemet promote VERSION --alias staging|production`: move an alias by hand."""

from __future__ import annotations

import argparse

ALIASES = ("staging", "production")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="registered model version number")
    parser.add_argument("--alias", required=True, choices=ALIASES, help="the alias to point at VERSION: staging or production")
    parser.add_argument("--model", default=None, help="registered model name (default: params register.model_name)")


def run(args: argparse.Namespace) -> int:
    import logging

    from bonemet.registry.store import model_versions, set_alias
    from bonemet.stages._common import open_store, specs_from

    log = logging.getLogger(__name__)
    params = specs_from(args)
    store = open_store(params)
    name = args.model or params.registration.model_name
    versions = {v["version"] for v in model_versions(store, name)}
    if args.version not in versions:
        log.error("model '%s' has no version %s (versions: %s)", name, args.version, ", ".join(sorted(versions, key=int)) or "none")
        return 1
    set_alias(store, name, args.alias, args.version)
    print(f"{name}@{args.alias} -> version {args.version}")
    return 0
