"""Manifest validation field by field: every rule refuses alone with the field it names, the
defaults are the documented ones, and a written manifest keeps exactly what was set.

Each case edits one field of a minimal valid manifest written here; the expected field names,
messages and defaults are the schema in ``provision.formats.manifest``'s docstring, typed out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from provision.errors import ManifestError
from provision.formats.manifest import (
    FileSpec,
    Source,
    dump_manifest,
    load_manifest,
    manifest_to_dict,
    parse_manifest,
    parse_manifest_bytes,
    resolve_manifest_path,
    with_file_facts,
    write_manifest,
)

H40 = "a9da202d8e3192195835f077c43435c8b22545ab"
H64 = "ab" * 32


def doc(**over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "schema_version": 1, "name": "m", "architecture": "pixtral", "format": "mistral",
        "sources": [{"type": "hf", "repo": "org/repo", "revision": H40}],
        "files": [{"path": "params.json"}],
    }
    d.update(over)
    return d


def refused(d: dict[str, Any], field: str, needle: str) -> None:
    with pytest.raises(ManifestError) as ei:
        parse_manifest(d)
    assert ei.value.context["field"] == field, str(ei.value)
    assert str(ei.value).startswith(f"Manifest {field}: ")
    assert needle in str(ei.value), str(ei.value)
    assert ei.value.exit_code == 3


def test_a_minimal_manifest_takes_the_documented_defaults() -> None:
    m = parse_manifest(doc())
    assert (m.description, m.schema_version, m.params, m.path, m.sha256) == ("", 1, None, None, None)
    f = m.files[0]
    assert f == FileSpec(path="params.json")
    assert (f.size, f.sha256, f.git_sha1, f.md5, f.optional, f.pickle, f.sources) == (None,) * 4 + (False, False, ())
    s = m.sources[0]
    assert (s.prefix, s.gated, s.magnet, s.torrent) == ("", False, None, None)
    sm = m.smoke
    assert (sm.prompt, sm.expected, sm.max_tokens) == (
        "What colour is the square in this image? Answer in one word.", None, 16)
    assert (sm.image.kind, sm.image.width, sm.image.height, sm.image.color, sm.image.background) == \
        ("square", 256, 256, "red", "white")
    assert not m.complete


@pytest.mark.parametrize(("over", "field", "needle"), [
    ({"extra": 1}, "extra", "unknown field (check its spelling)."),
    ({"schema_version": 2}, "schema_version", "this provision reads version 1, got 2."),
    ({"schema_version": True}, "schema_version", "expected int, got bool True."),
    ({"name": "Pixtral"}, "name", "must match ^[a-z0-9][a-z0-9._-]*$, got 'Pixtral'."),
    ({"name": "-x"}, "name", "must match"),
    ({"name": 3}, "name", "expected str, got int 3."),
    ({"architecture": "llama"}, "architecture", "must be one of pixtral, mistral, mixtral, got 'llama'."),
    ({"format": "gguf"}, "format", "must be one of mistral, hf, got 'gguf'."),
    ({"sources": []}, "sources", "at least one source is required."),
    ({"files": []}, "files", "at least one file is required."),
    ({"sources": {"type": "hf"}}, "sources", "expected list, got dict"),
    ({"description": 5}, "description", "expected str, got int 5."),
    ({"smoke": "x"}, "smoke", "expected dict, got str 'x'."),
    ({"params": []}, "params", "expected dict, got list"),
])
def test_each_top_level_rule_refuses_naming_its_field(over: dict[str, Any], field: str, needle: str) -> None:
    refused(doc(**over), field, needle)


@pytest.mark.parametrize("missing", ["schema_version", "name", "architecture", "format", "sources", "files"])
def test_each_required_top_level_field_is_named_when_missing(missing: str) -> None:
    d = doc()
    del d[missing]
    refused(d, missing, "required field is missing.")


@pytest.mark.parametrize("ok", ["mistral", "mixtral"])
def test_every_listed_architecture_and_the_hf_format_are_accepted(ok: str) -> None:
    m = parse_manifest(doc(architecture=ok, format="hf"))
    assert (m.architecture, m.format) == (ok, "hf")


def src(**kw: Any) -> dict[str, Any]:
    return doc(sources=[kw])


@pytest.mark.parametrize(("source", "field", "needle"), [
    ("not a table", "sources[0]", "expected a table."),
    ({"repo": "org/repo"}, "sources[0].type", "required field is missing."),
    ({"type": "ftp"}, "sources[0].type", "must be one of torrent, hf, local, got 'ftp'."),
    ({"type": "hf", "repo": "org/repo", "gated": "yes"}, "sources[0].gated", "expected bool, got str 'yes'."),
    ({"type": "hf", "repo": "org/repo", "magnet": "m"}, "sources[0].magnet", "not allowed for an hf source."),
    ({"type": "hf", "repo": "org/repo", "torrent": "t"}, "sources[0].torrent", "not allowed for an hf source."),
    ({"type": "hf"}, "sources[0].repo", "required field is missing."),
    ({"type": "hf", "repo": "noslash"}, "sources[0].repo", "expected 'org/name', got 'noslash'."),
    ({"type": "hf", "repo": "org/repo", "revision": "main"}, "sources[0].revision",
     "must be a full 40-hex commit id (not a branch or a short id), got 'main'."),
    ({"type": "hf", "repo": "org/repo", "prefix": "../up"}, "sources[0].prefix", "would leave the destination"),
    ({"type": "torrent"}, "sources[0]", "a torrent source needs 'magnet' or 'torrent'."),
    ({"type": "torrent", "torrent": "t.torrent", "repo": "a/b"}, "sources[0].repo", "not allowed for a torrent source."),
    ({"type": "torrent", "torrent": "t.torrent", "revision": H40}, "sources[0].revision",
     "not allowed for a torrent source."),
    ({"type": "torrent", "torrent": "t.torrent", "gated": True}, "sources[0].gated", "not allowed for a torrent"),
    ({"type": "torrent", "magnet": "magnet:?dn=x"}, "sources[0].magnet", "no 'xt=urn:btih:'"),
    ({"type": "torrent", "torrent": "/etc/x.torrent"}, "sources[0].torrent", "absolute paths are not allowed"),
])
def test_each_source_rule_refuses_naming_its_field(source: Any, field: str, needle: str) -> None:
    refused(doc(sources=[source]), field, needle)


def test_a_second_bad_source_is_named_by_its_index() -> None:
    refused(doc(sources=[{"type": "hf", "repo": "a/b"}, {"type": "hf", "repo": "bad"}]), "sources[1].repo",
            "expected 'org/name'")


def test_sources_normalise_prefix_revision_case_and_describe_themselves() -> None:
    m = parse_manifest(doc(sources=[
        {"type": "hf", "repo": "Org/Re.po", "revision": H40.upper(), "prefix": "sub", "gated": True},
        {"type": "torrent", "magnet": f"magnet:?xt=urn:btih:{H40}&dn=n", "prefix": "root/"},
        {"type": "torrent", "torrent": "x.torrent"},
        {"type": "hf", "repo": "a/b"},
    ]))
    hf, mag, tor, unpinned = m.sources
    assert hf == Source(type="hf", repo="Org/Re.po", revision=H40, prefix="sub/", gated=True)
    assert hf.describe() == f"hf://Org/Re.po@{H40}"
    assert mag.prefix == "root/" and mag.describe() == f"btih:{H40} (n)"
    assert tor.describe() == "torrent file x.torrent"
    assert unpinned.describe() == "hf://a/b (main, unpinned)"
    assert m.source("torrent") is mag and m.source("hf") is hf


def fil(**kw: Any) -> dict[str, Any]:
    return doc(files=[kw])


@pytest.mark.parametrize(("f", "field", "needle"), [
    ("x", "files[0]", "expected a table."),
    ({"size": 1}, "files[0].path", "required field is missing."),
    ({"path": "../x"}, "files[0].path", "would leave the destination folder"),
    ({"path": "a", "size": -1}, "files[0].size", "must be >= 0, got -1."),
    ({"path": "a", "size": 1.5}, "files[0].size", "expected int, got float 1.5."),
    ({"path": "a", "size": True}, "files[0].size", "expected int, got bool True."),
    ({"path": "a", "sha256": "ab" * 31}, "files[0].sha256", "must be 64 hex characters"),
    ({"path": "a", "sha256": "zz" * 32}, "files[0].sha256", "must be 64 hex characters"),
    ({"path": "a", "git_sha1": "ab" * 21}, "files[0].git_sha1", "must be 40 hex characters"),
    ({"path": "a", "md5": "ab" * 15}, "files[0].md5", "must be 32 hex characters"),
    ({"path": "a", "md5": "ab" * 16 + "00"}, "files[0].md5", "must be 32 hex characters"),
    ({"path": "a", "sources": ["ftp"]}, "files[0].sources", "unknown source type 'ftp'."),
    ({"path": "a", "optional": 1}, "files[0].optional", "expected bool, got int 1."),
    ({"path": "w.pth"}, "files[0].path", "'w.pth' is a pickle format; provision reads safetensors only"),
    ({"path": "w.pth", "pickle": True}, "files[0].optional", "pickle file 'w.pth' must be optional"),
    ({"path": "w.safetensors", "pickle": True, "optional": True}, "files[0].pickle",
     "'w.safetensors' is not a pickle file name ("),
])
def test_each_file_rule_refuses_naming_its_field(f: Any, field: str, needle: str) -> None:
    refused(doc(files=[f]), field, needle)


def test_a_duplicate_path_is_named_at_its_second_place_after_normalising() -> None:
    refused(doc(files=[{"path": "a/b"}, {"path": "c"}, {"path": "./a//b"}]), "files[2].path", "duplicate path 'a/b'.")


def test_file_facts_are_normalised_to_lower_case_and_kept() -> None:
    m = parse_manifest(doc(files=[
        {"path": "./w.safetensors", "size": 0, "sha256": H64.upper(), "git_sha1": H40.upper(),
         "md5": "AB" * 16, "optional": True, "sources": ["torrent"]},
        {"path": "w.pth", "pickle": True, "optional": True},
    ]))
    w, p = m.files
    assert (w.path, w.size, w.sha256, w.git_sha1, w.md5) == ("w.safetensors", 0, H64, H40, "ab" * 16)
    assert w.optional and w.sources == ("torrent",) and w.in_source("torrent") and not w.in_source("hf")
    assert p.pickle and FileSpec(path="x").in_source("hf")
    assert m.file("w.safetensors") is w and m.file("nope") is None


@pytest.mark.parametrize(("smoke", "field", "needle"), [
    ({"prompt": 1}, "smoke.prompt", "expected str, got int 1."),
    ({"max_tokens": 0}, "smoke.max_tokens", "must be between 1 and 4096, got 0."),
    ({"max_tokens": 4097}, "smoke.max_tokens", "must be between 1 and 4096, got 4097."),
    ({"image": {"kind": "circle"}}, "smoke.image.kind", "only 'square' is supported, got 'circle'."),
    ({"image": {"width": 15}}, "smoke.image", "width and height must be between 16 and 4096."),
    ({"image": {"height": 4097}}, "smoke.image", "width and height must be between 16 and 4096."),
    ({"image": {"dpi": 3}}, "smoke.image.dpi", "unknown field"),
    ({"colour": "red"}, "smoke.colour", "unknown field"),
])
def test_each_smoke_rule_refuses_naming_its_field(smoke: dict[str, Any], field: str, needle: str) -> None:
    refused(doc(smoke=smoke), field, needle)


def test_smoke_bounds_are_inclusive() -> None:
    for mt in (1, 4096):
        assert parse_manifest(doc(smoke={"max_tokens": mt})).smoke.max_tokens == mt
    for side in (16, 4096):
        img = parse_manifest(doc(smoke={"image": {"width": side, "height": side}})).smoke.image
        assert (img.width, img.height) == (side, side)


def test_params_are_validated_as_a_params_json() -> None:
    with pytest.raises(ManifestError) as ei:
        parse_manifest(doc(params={"dim": 8}))
    assert ei.value.context["field"] == "params"


def test_parse_manifest_bytes_hashes_the_raw_bytes_and_names_the_file_in_errors(tmp_path: Path) -> None:
    raw = dump_manifest(parse_manifest(doc())).encode()
    m = parse_manifest_bytes(raw, path=tmp_path / "m.toml")
    assert m.sha256 == hashlib.sha256(raw).hexdigest() and m.path == tmp_path / "m.toml"
    with pytest.raises(ManifestError, match=r"Manifest manifest is not UTF-8 text\."):
        parse_manifest_bytes(b"name = '\xff'")
    with pytest.raises(ManifestError, match=r"Manifest /x/m\.toml is not valid TOML: "):
        parse_manifest_bytes(b"name = ", path=Path("/x/m.toml"))


def test_a_written_manifest_keeps_only_what_is_set_and_reads_back_equal(tmp_path: Path) -> None:
    m = parse_manifest(doc(
        description="d",
        sources=[{"type": "torrent", "magnet": f"magnet:?xt=urn:btih:{H40}", "prefix": "r/"},
                 {"type": "hf", "repo": "a/b", "gated": True}],
        files=[{"path": "w.safetensors", "size": 5, "sha256": H64, "sources": ["hf"], "optional": True},
               {"path": "params.json"}],
        smoke={"expected": "red", "max_tokens": 3}))
    d = manifest_to_dict(m)
    assert d["files"] == [{"path": "w.safetensors", "size": 5, "sha256": H64, "optional": True, "sources": ["hf"]},
                          {"path": "params.json"}]
    assert d["sources"] == [{"type": "torrent", "magnet": f"magnet:?xt=urn:btih:{H40}", "prefix": "r/"},
                            {"type": "hf", "repo": "a/b", "gated": True}]
    assert d["description"] == "d" and d["smoke"]["expected"] == "red" and "params" not in d
    assert "description" not in manifest_to_dict(parse_manifest(doc()))
    out = write_manifest(m, tmp_path / "w.toml")
    assert out.path == tmp_path / "w.toml"
    assert out.sha256 == hashlib.sha256((tmp_path / "w.toml").read_bytes()).hexdigest()
    assert load_manifest(tmp_path / "w.toml") == m


def test_with_file_facts_records_only_the_named_files() -> None:
    m = parse_manifest(doc(files=[{"path": "a"}, {"path": "b"}]))
    locked = with_file_facts(m, {"a": (7, H64)})
    assert locked.file("a") == FileSpec(path="a", size=7, sha256=H64)
    assert locked.file("b") == FileSpec(path="b") and not locked.complete
    assert with_file_facts(locked, {"b": (0, H64)}).complete


def test_manifest_references_resolve_paths_and_refuse_bad_names(tmp_path: Path) -> None:
    p = tmp_path / "x.toml"
    p.write_text(dump_manifest(parse_manifest(doc())))
    assert resolve_manifest_path(str(p)) == p
    with pytest.raises(ManifestError, match="Manifest file not found"):
        resolve_manifest_path(str(tmp_path / "missing.toml"))
    with pytest.raises(ManifestError, match="Manifest file not found"):
        resolve_manifest_path(str(tmp_path))  # a folder
    with pytest.raises(ManifestError, match="Unknown manifest 'Bad Name'"):
        resolve_manifest_path("Bad Name")
    with pytest.raises(ManifestError, match="Unknown manifest 'no-such-model'") as ei:
        resolve_manifest_path("no-such-model")
    assert ei.value.hint is not None and "pixtral-12b-2409" in ei.value.hint
