"""Manifest refusals, word for word, where the mutation run of ``formats/manifest.py`` found a
message no test read (its other survivors were a test-selection gap: the local-source tests,
now in ``[tool.mutmut]``). The expected lines are typed out here from the schema's rules.
"""

from __future__ import annotations

from typing import Any

import pytest

from provision.errors import ManifestError
from provision.formats.manifest import parse_manifest

H40 = "a9da202d8e3192195835f077c43435c8b22545ab"


def _refusal(files: list[dict[str, Any]]) -> ManifestError:
    d = {"schema_version": 1, "name": "m", "architecture": "pixtral", "format": "mistral",
         "sources": [{"type": "hf", "repo": "org/repo", "revision": H40}], "files": files}
    with pytest.raises(ManifestError) as ei:
        parse_manifest(d)
    return ei.value


@pytest.mark.parametrize(("path", "why"), [
    ("../w.bin", "it would leave the destination folder ('..')."),
    ("/etc/passwd", "absolute paths are not allowed."),
    ("a\\b", "backslashes are not allowed."),
])
def test_a_hostile_file_path_is_refused_as_a_file_path_naming_its_field(path: str, why: str) -> None:
    e = _refusal([{"path": path}])
    assert e.message == f"Manifest files[0].path: Refusing file path {path!r}: {why}"
    assert e.context["field"] == "files[0].path"


def test_a_pickle_that_is_not_optional_is_refused_with_the_whole_reason() -> None:
    e = _refusal([{"path": "consolidated.00.pth", "pickle": True}])
    assert e.message == ("Manifest files[0].optional: pickle file 'consolidated.00.pth' must be optional: "
                         "it is never fetched or loaded as a model file.")
