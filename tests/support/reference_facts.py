"""Release facts of the real models, written once, each with where it was confirmed.

Tests that check a shipped manifest compare it with these values, never with a copy of the
manifest under test. The section numbers name the project's reference notes:
PIXTRAL = ``../shared/reference/pixtral-12b.md``, FAMILY = ``../shared/reference/mistral-family.md``.
Only facts marked confirmed there are here; nothing is derived from provision's own data.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Magnet:
    """A torrent as posted: infohash (BTIHv1, lower-case hex), display name, decoded trackers."""

    btih: str
    name: str
    trackers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Release:
    """What a release's manifest may pin: its torrent, its Hub repo/commit, and per-file facts
    ({path: {"sha256"|"md5"|"size": value}})."""

    magnet: Magnet | None = None
    hf_repo: str | None = None
    hf_revision: str | None = None
    files: dict[str, dict[str, str | int]] = field(default_factory=dict)


# PIXTRAL §1.1 (magnet as posted), §2.1 (first commit of mistralai/Pixtral-12B-2409), §3 (params.json,
# 453 bytes).
PIXTRAL_12B = Release(
    magnet=Magnet("7278e625de2b1da598b23954c13933047126238a", "pixtral-12b-240910",
                  ("udp://tracker.opentrackr.org:1337/announce", "udp://open.demonii.com:1337/announce",
                   "http://tracker.ipv6tracker.org:80/announce")),
    hf_repo="mistralai/Pixtral-12B-2409",
    hf_revision="a9da202d8e3192195835f077c43435c8b22545ab",
    files={"params.json": {"size": 453}},
)

# FAMILY §1.1 (infohash, dn, the one decodable tracker) and §5 (sha256 of the HF files; the
# tokenizer's sha256 also in §2, = mistral-common's tokenizer.model.v1).
MISTRAL_7B = Release(
    magnet=Magnet("208b101a0f51514ecf285885a8b0f6fb1a1e4d7d", "mistral-7B-v0.1",
                  ("udp://tracker.opentrackr.org:1337/announce",)),
    hf_repo="mistralai/Mistral-7B-v0.1",
    files={
        "model-00001-of-00002.safetensors": {"sha256": "9742cb4764964155b7a5f35eefad651f590006091ddeb536863d6c5865cca1b9"},
        "model-00002-of-00002.safetensors": {"sha256": "9bcf56354ec0c68b5f8e97b4f3b02d16af899a65b0868d6dba5a51c1b30f01cb"},
        "tokenizer.model": {"sha256": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"},
    },
)

# FAMILY §5 (mistralai/Mistral-Nemo-Instruct-2407: consolidated.safetensors sha256, params.json 204 B).
NEMO_INSTRUCT_2407 = Release(
    hf_repo="mistralai/Mistral-Nemo-Instruct-2407",
    files={
        "consolidated.safetensors": {"sha256": "5f96d5192b5a0b531f093531a8450014da99527945831b58ac1a42a7c0727834"},
        "params.json": {"size": 204},
    },
)

# FAMILY §1.2 (infohash, dn, decoded trackers), §2 ("Official MD5"s; the tokenizer's size and
# sha256, = mistral-common's tokenizer.model.v1), §3 (params.json 193 B), §5 (sha256 of the HF files).
MIXTRAL_8X7B = Release(
    magnet=Magnet("5546272da9065eddeb6fcd7ffddeef5b75be79a7", "mixtral-8x7b-32kseqlen",
                  ("udp://opentracker.i2p.rocks:6969/announce", "http://tracker.openbittorrent.com:80/announce")),
    hf_repo="mistralai/Mixtral-8x7B-v0.1",
    files={
        "model-00001-of-00019.safetensors": {"sha256": "b43400ce8695edf089a8c276245f670ef0f39e798688e7cf9256636c8f5da053"},
        "model-00002-of-00019.safetensors": {"sha256": "ae019aa5319535c0f14629cc009da551e86ec385315bf4bb871f23547ad4fa59"},
        "consolidated.00.pt": {"sha256": "78074bbe2b8e78e15f3edb237b7d1b5fd744bbb40d60ac7298de8ed0afe1846e"},
        "consolidated.01.pt": {"sha256": "f5a3d70225a42ade1d5b1d277fada2cdcde6a403609829ab2acd7bff5d12bb83"},
        "consolidated.00.pth": {"md5": "1faa9bc9b20fcfe81fcd4eb7166a79e6"},
        "tokenizer.model": {"md5": "37974873eb68a7ab30c4912fc36264ae", "size": 493443,
                            "sha256": "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"},
        "params.json": {"size": 193},
    },
)

# FAMILY §1.3 (infohash, dn, the clean form's trackers) and §3 (params.json 274 B).
MIXTRAL_8X22B = Release(
    magnet=Magnet("9238b09245d0d8cd915be09927769d5f7584c1c9", "mixtral-8x22b",
                  ("udp://open.demonii.com:1337/announce", "http://tracker.opentrackr.org:1337/announce")),
    files={"params.json": {"size": 274}},
)
