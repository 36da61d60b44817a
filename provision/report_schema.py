"""``python -m provision.report_schema REPORT.json|-``: the report validator under the name CI recipes already use.

The validator lives in ``provision.formats.report_schema``; this module only forwards to it.
"""

from __future__ import annotations

from provision.formats.report_schema import main

if __name__ == "__main__":
    raise SystemExit(main())
