"""Checks of cohorts (manifest, images, masks) and feature tables, run with Great Expectations.

``gx`` is the only module importing great_expectations (slow to import), so nothing is
imported here: use ``from bonemet.validation.gx import Rule, check_table`` and
``from bonemet.validation.cohort import validate_cohort``.
"""

#: the validate stage's machine-readable report in ``validate.out_dir`` (beside ``report.txt``)
REPORT_FILE = "report.json"
