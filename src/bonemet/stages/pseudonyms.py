"""`bonemet pseudonyms`: map the pipeline's pseudonymous ids back to the manifest's ids (needs the key).

With ``data.pseudonymize`` on, every output carries pseudonyms only (keyed hashes of the case and
patient ids). A keyed hash cannot be inverted: this command hashes the manifest's ids again with
the key from ``$<data.pseudonym_key_env>`` and prints the table (CSV: kind, id, pseudonym), or
only the rows whose pseudonym is given with ``--lookup``. Without the key it refuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cohort-dir", default=None, help="cohort folder (default: params data.cohort_dir)")
    parser.add_argument("--lookup", action="append", default=None, metavar="PSEUDONYM",
                        help="print only the id behind this pseudonym (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of CSV")


def run(args: argparse.Namespace) -> int:
    from bonemet.data.manifest import PATIENT_COLUMN, read_manifest_table
    from bonemet.data.pseudonym import PseudonymKeyError, pseudonym
    from bonemet.stages._common import pseudonym_key, specs_from

    params = specs_from(args)
    if not params.data.pseudonymize:
        raise PseudonymKeyError("data.pseudonymize is off: the outputs carry the manifest's own ids, there is "
                                "nothing to map back")
    key = pseudonym_key(params)
    table = read_manifest_table(args.cohort_dir or params.data.cohort_dir, pseudonym_key=None)
    rows = []
    for kind, column in (("case", "case_id"), ("patient", PATIENT_COLUMN)):
        if column in table.columns:
            rows += [{"kind": kind, "id": v, "pseudonym": pseudonym(v, key)} for v in dict.fromkeys(table[column]) if v]
    if args.lookup:
        wanted = set(args.lookup)
        rows = [r for r in rows if r["pseudonym"] in wanted]
        missing = wanted - {r["pseudonym"] for r in rows}
        if missing:
            raise PseudonymKeyError(f"no id of this cohort has the pseudonym(s) {', '.join(sorted(missing))} under "
                                    f"this key (another cohort, or another ${params.data.pseudonym_key_env}?)")
    if args.json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
    else:
        writer = csv.DictWriter(sys.stdout, fieldnames=["kind", "id", "pseudonym"])
        writer.writeheader()
        writer.writerows(rows)
    return 0
