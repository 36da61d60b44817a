"""Air-gapped bundles: a model's verified files, carried by hand and landed as if fetched.

``export_bundle`` copies a model's verified original and/or one converted profile out of the
store with a manifest lock, a ``.torrent`` of the contents and ``bundle.json`` (every file's
size and sha256); ``import_bundle`` verifies such a folder or tar offline and commits it into
another store, resumably. The index format lives in ``index``. Nothing here downloads.
"""

from __future__ import annotations

from provision.stages.bundle.export import ExportResult, export_bundle
from provision.stages.bundle.importing import ImportResult, import_bundle
from provision.stages.bundle.index import INDEX_NAME, MANIFEST_NAME, BundleIndex, parse_index

__all__ = ["INDEX_NAME", "MANIFEST_NAME", "BundleIndex", "ExportResult", "ImportResult", "export_bundle",
           "import_bundle", "parse_index"]
