"""``python -m provision.stages.convert.hf_tokenizer TEKKEN OUT``: transformers' tokenizer files
(``tokenizer.json`` & co.) built from a ``tekken.json``, written into the folder ``OUT``.

The build is pure Python and takes seconds (about 9 s of one core for Pixtral's tekken.json), so
for a big conversion ``hf_export`` runs it in this child process: it holds no lock the
conversion needs, and on a host with spare cores it costs the conversion nothing (a small one
calls ``main`` in its own process, sparing the child's start-up). Exit 0 when written, 3 when transformers
is missing or too old, 4 when it cannot convert this file. It reads one file and writes one folder.
"""

from __future__ import annotations

import sys


def build(tekken: str, out: str) -> tuple[int, str]:
    """Write the tokenizer files of ``tekken`` into ``out``: (exit code, why not; "" when written)."""
    try:
        from transformers.integrations.mistral import convert_tekken_tokenizer
    except Exception as e:  # transformers missing or too old
        return 3, f"transformers cannot convert tekken.json here: {e}"
    try:
        convert_tekken_tokenizer(tekken).save_pretrained(out)
    except Exception as e:  # a tekken.json transformers cannot convert
        return 4, f"{tekken}: {e}"
    return 0, ""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m provision.stages.convert.hf_tokenizer TEKKEN OUT", file=sys.stderr)
        return 2
    code, why = build(args[0], args[1])
    if why:
        print(why, file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
