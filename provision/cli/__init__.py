"""The command line: a thin click layer over ``provision.pipeline`` and ``provision.api``.

``main`` is the console-script entry point; commands live one per module in ``commands/``.
Nothing outside this package prints to the terminal or imports rich.
"""
