"""The package version and the version of the ``--json`` report envelope (no imports)."""

__version__ = "0.1.0"
JSON_SCHEMA_VERSION = 1
