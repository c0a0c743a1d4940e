"""`bonemet models`: registered versions with aliases, key metrics, and the rule that chose each classifier."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="registered model name (repeatable; default: bonemet-classifier and bonemet-segmenter)")
    parser.add_argument("--json", action="store_true",
                        help="print the versions as JSON ({model: [version, aliases, run_id, tags, ...]}) instead of a table")


def run(args: argparse.Namespace) -> int:
    from bonemet.registry.store import model_versions
    from bonemet.stages._common import open_store, specs_from

    params = specs_from(args)
    reg = params.registration
    store = open_store(params)
    names = args.model or [reg.model_name, params.segment.model_name]  # one key each: segment registers it
    if args.json:
        import json

        print(json.dumps({name: model_versions(store, name) for name in names}, indent=2, sort_keys=True, default=str))
        return 0
    for name in names:
        rows = model_versions(store, name)
        print(f"{name}: {len(rows)} version(s)")
        for row in rows:
            tags = row["tags"]
            metrics = "  ".join(
                f"{k}={float(tags[k]):.3f}" for k in ("cv_auc_mean", "test_auc", "dice_mean") if k in tags
            )
            aliases = ",".join(row["aliases"]) or "-"
            rule = f" (register.model {tags['registered_rule']})" if "registered_rule" in tags else ""
            print(f"  v{row['version']:<4} aliases={aliases:<20} {tags.get('classifier', '')}{rule}  {metrics}  "
                  f"run={row['run_id']}")
    return 0
