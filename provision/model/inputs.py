"""Model inputs through mistral-common: a chat request with images and text -> token ids + image tensors.

``load_tokenizer(model_dir)`` opens the checkpoint's ``tekken*.json`` with mistral-common's
``MistralTokenizer`` (the release's ``multimodal`` key and the newer ``image`` key both load), or,
for a checkpoint without one, its SentencePiece model (``tokenizer.model.v3``... or a bare
``tokenizer.model``, which mistral-common reads as v1: Mistral 7B v0.1, Mixtral v0.1).
``load_image(spec)`` turns a file path, an ``http(s)://`` URL (fetched only because the user
passed it), a ``data:image/...;base64,`` URL or a bare base64 string into a decoded PIL image,
with typed one-line errors. ``square_image(spec)`` draws the smoke test's generated picture.
``encode_chat(tokenizer, prompt, images)`` builds one user message (image chunks, then the text
chunk) and lets mistral-common tokenize it and preprocess the images (resize to the 16-pixel
grid, CLIP normalisation). Nothing here re-implements the tokenizer or the image transform.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provision.errors import FetchError, StructureError, UsageError

if TYPE_CHECKING:
    import torch
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from PIL import Image

    from provision.formats.manifest import SmokeImage

_B64 = re.compile(r"^[A-Za-z0-9+/=\s]+$")
URL_TIMEOUT_S = 30.0


@dataclass
class Encoded:
    tokens: list[int]
    images: list[torch.Tensor]  # normalized float32 (C, H, W), H and W multiples of the patch size
    text: str  # the prompt as the tokenizer renders it (special tokens included)
    grids: list[tuple[int, int]]  # (rows, cols) of patches per image

    @property
    def n_patches(self) -> int:
        return sum(r * c for r, c in self.grids)


def find_tokenizer(model_dir: Path) -> Path:
    """The checkpoint's tokenizer file: ``tekken.json``, else one ``tekken*.json``, else a SentencePiece
    ``tokenizer.model.v*`` (highest version), else ``tokenizer.model``."""
    d = Path(model_dir)
    if (d / "tekken.json").is_file():
        return d / "tekken.json"
    found = sorted(p for p in d.glob("tekken*.json") if p.is_file())
    if found:
        return found[0]
    spm = sorted((p for p in d.glob("tokenizer.model.v*") if p.is_file()), key=_spm_version_key)
    if spm:
        return spm[-1]
    if (d / "tokenizer.model").is_file():
        return d / "tokenizer.model"
    raise StructureError(f"{d} has no tekken.json or tokenizer.model tokenizer; fetch the model's tokenizer "
                         "file too.", path=str(d))


def _spm_version_key(p: Path) -> tuple[int, str]:
    m = re.match(r"^v(\d+)(.*)$", p.name.rsplit(".", 1)[-1])
    return (int(m.group(1)), m.group(2)) if m else (-1, p.name)


def load_tokenizer(model_dir_or_file: Path, *, require_image: bool = True) -> MistralTokenizer:
    """mistral-common's tokenizer (with its image encoder) from a model folder, a tekken*.json or a
    SentencePiece ``tokenizer.model[.vN]`` file.

    Loaded tokenizers are cached per (file, size, mtime): building the 150k-entry vocabulary
    costs about a second.
    """
    p = Path(model_dir_or_file)
    path = (p if p.is_file() else find_tokenizer(p)).resolve()
    st = path.stat()
    tok = _load_tokenizer_cached(str(path), st.st_size, st.st_mtime_ns)
    if require_image and getattr(tok.instruct_tokenizer, "image_encoder", None) is None:
        raise StructureError(f"{path} has no image section (multimodal/image); it is not a Pixtral tokenizer.",
                             path=str(path))
    return tok


@functools.lru_cache(maxsize=4)
def _load_tokenizer_cached(path: str, _size: int, _mtime_ns: int) -> MistralTokenizer:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    try:
        tok = MistralTokenizer.from_file(str(path))
    except ImportError as e:  # a SentencePiece model without the sentencepiece package
        raise StructureError(f"{path} needs a package that is not installed ({e}); install "
                             "'mistral-common[sentencepiece]'.", path=str(path)) from None
    except Exception as e:  # mistral-common raises TokenizerException, ValueError, KeyError, AssertionError...
        raise StructureError(f"{path} is not a tokenizer mistral-common can load ({type(e).__name__}: {e}).",
                             path=str(path)) from None
    return tok


def _decoded(img: Image.Image, what: str) -> Image.Image:
    try:
        img.load()
    except Exception as e:
        raise UsageError(f"{what} is not a readable image ({type(e).__name__}: {e}); pass a PNG, JPEG or WebP.",
                         image=what) from None
    return img


def load_image(spec: str | Path | bytes | Image.Image) -> Image.Image:
    """A decoded PIL image from a path, an http(s) URL, a base64 data URL/string, raw bytes or a PIL image."""
    from PIL import Image

    if isinstance(spec, Image.Image):
        return spec
    if isinstance(spec, bytes):
        try:
            return _decoded(Image.open(io.BytesIO(spec)), "the image bytes")
        except UsageError:
            raise
        except Exception as e:
            raise UsageError(f"The image bytes are not a readable image ({e}).") from None
    s = str(spec)
    if isinstance(spec, str) and s.startswith(("http://", "https://")):
        return _load_url(s)
    path = Path(spec)
    try:
        is_file = path.is_file()
    except (OSError, ValueError):  # a long base64 string is not a valid file name
        is_file = False
    if isinstance(spec, str) and not is_file and (s.startswith("data:") or (len(s) > 64 and _B64.match(s[:4096]))):
        return _load_base64(s)
    if not is_file:
        raise UsageError(f"Image file {path} does not exist; pass an existing image file, URL or base64 data.",
                         image=str(path))
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(f"Cannot read image file {path}: {e.strerror}.", image=str(path)) from None
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as e:
        raise UsageError(f"{path} is not a readable image ({type(e).__name__}); pass a PNG, JPEG or WebP.",
                         image=str(path)) from None
    return _decoded(img, str(path))


def _load_base64(s: str) -> Image.Image:
    from mistral_common.image import maybe_load_image_from_str_or_bytes

    try:
        img = maybe_load_image_from_str_or_bytes(s)
    except Exception as e:
        raise UsageError(f"The base64 image cannot be decoded ({type(e).__name__}).") from None
    return _decoded(img, "the base64 image")


def _load_url(url: str) -> Image.Image:
    import requests
    from mistral_common.image import download_image

    try:
        img = download_image(url, URL_TIMEOUT_S)
    except requests.exceptions.RequestException as e:
        raise FetchError(f"Cannot download image {url}: {type(e).__name__}; check the URL and the network.",
                         url=url) from None
    except Exception as e:
        raise UsageError(f"{url} did not return a readable image ({e}).", url=url) from None
    return _decoded(img, url)


def square_image(spec: SmokeImage) -> Image.Image:
    """A ``spec.color`` square (half the shorter side) centred on a ``spec.background`` canvas."""
    from PIL import Image, ImageColor, ImageDraw

    if spec.kind != "square":
        raise UsageError(f"Smoke image kind {spec.kind!r} is not supported; use 'square'.")
    if spec.width < 1 or spec.height < 1:
        raise UsageError(f"Smoke image size {spec.width}x{spec.height} must be positive.")
    try:
        fg, bg = ImageColor.getrgb(spec.color), ImageColor.getrgb(spec.background)
    except ValueError as e:
        raise UsageError(f"Smoke image colour is not a colour name or #rrggbb: {e}.") from None
    img = Image.new("RGB", (spec.width, spec.height), bg[:3])
    side = max(1, min(spec.width, spec.height) // 2)
    x0, y0 = (spec.width - side) // 2, (spec.height - side) // 2
    ImageDraw.Draw(img).rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=fg[:3])
    return img


def encode_chat(tokenizer: MistralTokenizer, prompt: str, images: Sequence[Any] = ()) -> Encoded:
    """One user turn, image chunks first then the text, tokenized and preprocessed by mistral-common."""
    import numpy as np
    import torch
    from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    content: list[Any] = [ImageChunk(image=load_image(im)) for im in images]
    if prompt:
        content.append(TextChunk(text=prompt))
    if not content:
        raise UsageError("Nothing to encode: give a prompt, an image or both.")
    req = ChatCompletionRequest(messages=[UserMessage(content=content)])
    try:
        enc = tokenizer.encode_chat_completion(req)
    except Exception as e:
        raise UsageError(f"mistral-common refused the request ({type(e).__name__}: {e}).") from None
    tensors = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in enc.images]
    grids: list[tuple[int, int]] = []
    if tensors:
        patch = tokenizer.instruct_tokenizer.image_encoder.image_config.image_patch_size  # type: ignore[union-attr]
        grids = [(int(t.shape[1]) // patch, int(t.shape[2]) // patch) for t in tensors]
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    text = tokenizer.decode(list(enc.tokens), special_token_policy=SpecialTokenPolicy.KEEP)
    return Encoded(tokens=list(enc.tokens), images=tensors, text=text, grids=grids)
