"""One module per CLI command; each defines ``command`` (a click command or group).

``cli.LazyGroup`` discovers these modules without importing them and imports one only when
its command runs (or when ``--help`` lists short help). Modules here import only click and
light provision modules at top level; heavy libraries load inside the command bodies.
"""
