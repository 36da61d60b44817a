"""`provision import-pickle SRC --out DIR --sha256 HEX`: turn a pickled release into safetensors.

The one explicit way to use a PyTorch pickle (Mistral 7B v0.1's torrent ships
``consolidated.00.pth``): the release hash is checked first, the pickle is loaded with
``torch.load(weights_only=True, mmap=True)`` in a separate process, and only
``consolidated.safetensors`` (+ params.json, the tokenizer and ``import.json``) lands in DIR.
A thin command over ``provision.stages.pickle_import.import_pickle``. Exit 2 without a hash or with a
bad argument, 3 for a bad params.json or a manifest that pins no hash, 5 for a hash mismatch, a
shard without a hash, a hostile or unreadable pickle or tensors that do not match params.json, 6
when the loader passes its memory or CPU limit, 7 when it fails otherwise. With ``--manifest`` and
a folder of shards (``consolidated.00.pt`` ...), every shard is imported into one model.
"""

from __future__ import annotations

from pathlib import Path

import click

from provision.cli.app import get_app
from provision.cli.options import json_option


@click.command("import-pickle")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="New (or empty) folder for the safetensors model.")
@click.option("--sha256", "sha256", metavar="HEX", default=None,
              help="The release's sha256 of the pickle, from a source you trust (checked before loading).")
@click.option("--md5", "md5", metavar="HEX", default=None,
              help="The release's published md5, when that is all it publishes (Mixtral's torrent).")
@click.option("--manifest", "manifest_ref", metavar="M", default=None,
              help="Take the pickle's sha256 (or md5) from manifest M (a file marked pickle = true).")
@click.option("--params", "params", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="params.json to use (default: the one beside the pickle).")
@click.option("--keep-params", is_flag=True,
              help="Copy params.json as is (default: write out rope_theta 10000 when it is missing, as 7B v0.1 means).")
@click.option("--timeout", type=click.FloatRange(min=1), default=3600.0, show_default=True,
              help="Seconds the loader process may run (wall clock; its CPU time is limited to the same).")
@click.option("--memory-limit", "memory_limit", metavar="SIZE", default=None,
              help="Data memory the loader process may use, e.g. 40GiB (default: twice the pickles + 4 GiB).")
@json_option
def command(src: Path, out_dir: Path, sha256: str | None, md5: str | None, manifest_ref: str | None,
            params: Path | None, keep_params: bool, timeout: float, memory_limit: str | None,
            json_out: bool) -> None:
    """Import the PyTorch pickle SRC (a .pth file or its folder) as Mistral-format safetensors in the --out folder."""
    app = get_app(json_out, "import-pickle")
    from provision.cli.options import parse_rate
    from provision.stages.pickle_import import import_pickle, import_pickles, manifest_sources

    mem = parse_rate(memory_limit) or None
    if manifest_ref is not None and sha256 is None and md5 is None:
        from provision.formats.manifest import load_manifest

        m = load_manifest(manifest_ref)
        app.manifest_sha256 = m.sha256
        # one pickle, or the shards of one model (consolidated.00.pt ...): each with the hash m pins
        res = import_pickles(manifest_sources(src, m), out_dir, params=params, explicit_rope=not keep_params,
                             timeout=timeout, memory_limit=mem, progress=app.terminal.progress)
    else:
        res = import_pickle(src, out_dir, sha256=sha256, md5=md5, params=params, explicit_rope=not keep_params,
                            timeout=timeout, memory_limit=mem, progress=app.terminal.progress)
    t = app.terminal
    checked = res.source_md5 if res.authority == "md5" else res.source_sha256
    if len(res.shards) > 1:
        for sh in res.shards:
            t.info(f"{sh['name']}: {sh['authority']} matches the release; sha256 {sh['sha256']}")
    else:
        t.info(f"{res.source.name}: {res.authority} matches the release ({checked}); sha256 {res.source_sha256}")
    t.info(f"{res.tensors} tensors, {res.parameters:,d} parameters ({', '.join(f'{n} {d}' for d, n in res.dtypes.items())})")
    if res.rope_theta_added:
        t.info("params.json had no rope_theta: wrote it out (10000 for Mistral 7B v0.1, 1e6 for Mixtral)")
    for name, (size, sha) in sorted(res.files.items()):
        t.info(f"{name:28s} {size:>14,d} B  sha256 {sha}")
    t.success(f"imported {res.source} into {res.out_dir} in {res.seconds:.1f} s; the pickle was not copied.")
    app.finish(res.to_dict())
