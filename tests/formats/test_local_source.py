"""A manifest's ``local`` source: a folder already on disk, parsed, validated and written back.

Malformed ones are exit 3 naming the field; a relative path resolves against the manifest's folder
(not the working directory) and is re-expressed when the manifest is written elsewhere; ``--source
auto`` tries it first.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from provision.errors import EXIT_MANIFEST, ManifestError
from provision.formats.manifest import load_manifest, parse_manifest, write_manifest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def _doc(*sources: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": 1, "name": "m", "architecture": "pixtral", "format": "mistral",
            "sources": list(sources), "files": [{"path": "params.json"}]}


def _write(path: Path, *sources: str) -> Path:
    """A manifest file whose [[sources]] tables are the given TOML bodies."""
    body = "".join(f"[[sources]]\n{s}\n" for s in sources)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('schema_version = 1\nname = "m"\narchitecture = "pixtral"\nformat = "mistral"\n'
                    f'{body}[[files]]\npath = "params.json"\n')
    return path


def test_a_relative_local_path_resolves_against_the_manifest_folder_not_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a" / "weights").mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # a "weights" folder here would be the wrong one
    m = load_manifest(_write(tmp_path / "a" / "m.toml", 'type = "local"\npath = "weights"'))
    (src,) = m.sources
    assert (src.type, src.path, src.folder) == ("local", "weights", tmp_path / "a" / "weights")
    assert src.describe() == f"local folder {tmp_path / 'a' / 'weights'}"


def test_an_absolute_local_path_is_kept(tmp_path: Path) -> None:
    folder = tmp_path / "w"
    folder.mkdir()
    m = load_manifest(_write(tmp_path / "x" / "m.toml", f'type = "local"\npath = "{folder}"'))
    assert m.sources[0].folder == folder


@pytest.mark.parametrize(("body", "field", "says"), [
    ('type = "local"', "sources[0].path", "required field is missing"),
    ('type = "local"\npath = "params.json"', "sources[0].path", "is not a folder"),
    ('type = "local"\npath = "nowhere"', "sources[0].path", "does not exist"),
    ('type = "local"\npath = ""', "sources[0].path", "expected a folder"),
    ('type = "local"\npath = 7', "sources[0].path", "expected str"),
    ('type = "local"\npath = "."\nrepo = "a/b"', "sources[0].repo", "not allowed for a local source"),
    ('type = "local"\npath = "."\nprefix = "x/"', "sources[0].prefix", "not allowed for a local source"),
    ('type = "hf"\nrepo = "a/b"\npath = "."', "sources[0].path", "not allowed for an hf source"),
])
def test_a_malformed_local_source_is_exit_3_naming_the_field(tmp_path: Path, body: str, field: str,
                                                              says: str) -> None:
    (tmp_path / "params.json").write_text("{}")  # a file, not a folder
    with pytest.raises(ManifestError) as ei:
        load_manifest(_write(tmp_path / "m.toml", body))
    assert ei.value.exit_code == EXIT_MANIFEST == 3
    assert ei.value.context["field"] == field
    assert field in str(ei.value) and says in str(ei.value)
    assert "\n" not in str(ei.value)


def test_write_manifest_writes_a_local_source_back_and_re_expresses_a_relative_path(tmp_path: Path) -> None:
    (tmp_path / "a" / "weights").mkdir(parents=True)
    m = load_manifest(_write(tmp_path / "a" / "m.toml", 'type = "local"\npath = "weights"'))
    (tmp_path / "b" / "c").mkdir(parents=True)
    same = write_manifest(m, tmp_path / "a" / "again.toml")
    moved = write_manifest(m, tmp_path / "b" / "c" / "m.toml")
    written_same = tomllib.loads((tmp_path / "a" / "again.toml").read_text())["sources"]
    written_moved = tomllib.loads((tmp_path / "b" / "c" / "m.toml").read_text())["sources"]
    assert written_same == [{"type": "local", "path": "weights"}]
    # from b/c, up two folders to tmp_path, then a/weights: still the same folder
    assert written_moved == [{"type": "local", "path": "../../a/weights"}]
    assert same.sources[0].folder == moved.sources[0].folder == tmp_path / "a" / "weights"


def test_a_local_source_is_listed_first_for_auto_whatever_its_place(tmp_path: Path) -> None:
    m = parse_manifest(_doc({"type": "hf", "repo": "a/b"}, {"type": "local", "path": str(tmp_path)},
                            {"type": "torrent", "magnet": "magnet:?xt=urn:btih:" + "a" * 40}),
                       path=tmp_path / "m.toml")
    assert [s.type for s in m.sources] == ["hf", "local", "torrent"]  # as written
    assert [s.type for s in m.sources_in_order()] == ["local", "hf", "torrent"]


def test_a_file_may_name_local_among_its_sources(tmp_path: Path) -> None:
    doc = _doc({"type": "local", "path": "."})
    doc["files"] = [{"path": "params.json", "sources": ["local", "hf"]}]
    m = parse_manifest(doc, path=tmp_path / "m.toml")
    assert m.files[0].in_source("local") and not m.files[0].in_source("torrent")


def test_writing_a_local_source_without_a_path_is_exit_3_and_writes_nothing(tmp_path: Path) -> None:
    from dataclasses import replace

    from provision.formats.manifest import Source

    (tmp_path / "a").mkdir()
    m = load_manifest(_write(tmp_path / "a" / "m.toml", 'type = "local"\npath = "."'))
    with pytest.raises(ManifestError) as ei:
        write_manifest(replace(m, sources=(Source(type="local"),)), tmp_path / "out.toml")
    assert ei.value.exit_code == 3 and ei.value.context["field"] == "sources[0].path"
    assert not (tmp_path / "out.toml").exists()
