"""``python -m provision.stages.convert.hf_tokenizer TEKKEN OUT``: transformers' tokenizer files
(``tokenizer.json`` & co.) built from a ``tekken.json``, written into the folder ``OUT``.

The build is pure Python and takes seconds (about 9 s of one core for Pixtral's tekken.json), so
``hf_export`` runs it in this child process: it holds no lock the conversion needs, and on a
host with spare cores it costs the conversion nothing. Exit 0 when written, 3 when transformers
is missing or too old, 4 when it cannot convert this file. It reads one file and writes one folder.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m provision.stages.convert.hf_tokenizer TEKKEN OUT", file=sys.stderr)
        return 2
    try:
        from transformers.integrations.mistral import convert_tekken_tokenizer
    except Exception as e:  # transformers missing or too old
        print(f"transformers cannot convert tekken.json here: {e}", file=sys.stderr)
        return 3
    try:
        convert_tekken_tokenizer(args[0]).save_pretrained(args[1])
    except Exception as e:  # a tekken.json transformers cannot convert
        print(f"{args[0]}: {e}", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
