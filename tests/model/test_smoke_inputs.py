"""Inputs through mistral-common: tokenizer variants, image sources, the generated test image."""

from __future__ import annotations

import base64
import http.server
import io
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from provision.errors import FetchError, StructureError, UsageError
from provision.formats.manifest import SmokeImage
from provision.model.inputs import encode_chat, find_tokenizer, load_image, load_tokenizer, square_image


def _png(w: int = 20, h: int = 20, color: str = "blue") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def test_the_release_tokenizer_with_the_multimodal_key_loads(tiny_src: Path) -> None:
    raw = (tiny_src / "tekken.json").read_bytes()
    assert b'"multimodal":' in raw
    tok = load_tokenizer(tiny_src)
    assert tok.instruct_tokenizer.image_encoder is not None  # type: ignore[attr-defined]


def test_the_newer_tokenizer_with_the_image_key_loads_and_encodes_the_same(tiny_src: Path, tmp_path: Path) -> None:
    raw = (tiny_src / "tekken.json").read_bytes()
    (tmp_path / "tekken.json").write_bytes(raw.replace(b'"multimodal": {', b'"image": {', 1))
    assert b'"image": {' in (tmp_path / "tekken.json").read_bytes()
    img = square_image(SmokeImage(width=48, height=32))
    a = encode_chat(load_tokenizer(tiny_src), "Colour?", [img])
    b = encode_chat(load_tokenizer(tmp_path), "Colour?", [img])
    assert a.tokens == b.tokens and a.grids == b.grids == [(2, 3)]


def test_a_tokenizer_without_an_image_section_is_refused(tiny_src: Path, tmp_path: Path) -> None:
    import json

    data = json.loads((tiny_src / "tekken.json").read_bytes())
    data.pop("multimodal", None)
    data.pop("image", None)
    (tmp_path / "tekken.json").write_text(json.dumps(data))
    with pytest.raises(StructureError, match="no image section"):
        load_tokenizer(tmp_path)


def test_a_folder_without_tekken_json_is_a_structure_error(tmp_path: Path) -> None:
    with pytest.raises(StructureError, match=r"no tekken\.json"):
        find_tokenizer(tmp_path)


def test_the_image_comes_first_and_the_prompt_is_wrapped_in_inst(tiny_src: Path) -> None:
    enc = encode_chat(load_tokenizer(tiny_src), "Hi", [square_image(SmokeImage(width=16, height=16))])
    assert enc.tokens[:4] == [1, 3, 10, 13]
    assert enc.tokens[-1] == 4 and enc.text.startswith("<s>[INST][IMG][IMG_END]")
    assert enc.images[0].dtype.is_floating_point and tuple(enc.images[0].shape) == (3, 16, 16)


def test_images_are_normalised_with_the_clip_constants(tiny_src: Path) -> None:
    enc = encode_chat(load_tokenizer(tiny_src), "x", [Image.new("RGB", (16, 16), (255, 255, 255))])
    white = enc.images[0][:, 0, 0]
    expected = [(1 - m) / s for m, s in zip((0.48145466, 0.4578275, 0.40821073),
                                             (0.26862954, 0.26130258, 0.27577711), strict=True)]
    assert [round(float(v), 4) for v in white] == [round(v, 4) for v in expected]


def test_square_image_draws_a_centred_square_of_the_colour() -> None:
    img = square_image(SmokeImage(width=64, height=48, color="red", background="white"))
    assert img.size == (64, 48)
    assert img.getpixel((32, 24)) == (255, 0, 0)
    assert img.getpixel((1, 1)) == (255, 255, 255)


def test_square_image_with_an_unknown_colour_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="colour"):
        square_image(SmokeImage(color="ultraviolet"))


def test_base64_and_data_url_images_decode() -> None:
    b64 = base64.b64encode(_png(24, 40)).decode()
    assert load_image(b64).size == (24, 40)
    assert load_image("data:image/png;base64," + b64).size == (24, 40)
    assert load_image(_png(8, 9)).size == (8, 9)


def test_bad_base64_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="base64"):
        load_image("data:image/png;base64," + "A" * 100)


def test_a_truncated_image_is_a_usage_error(tmp_path: Path) -> None:
    p = tmp_path / "cut.png"
    p.write_bytes(_png(64, 64)[:60])
    with pytest.raises(UsageError, match="not a readable image"):
        load_image(p)


def test_a_text_file_is_not_an_image(tmp_path: Path) -> None:
    p = tmp_path / "notes.jpg"
    p.write_text("hello")
    with pytest.raises(UsageError, match="not a readable image"):
        load_image(str(p))


@pytest.fixture()
def image_server() -> Iterator[str]:
    """An HTTP server on 127.0.0.1 serving /ok.png and 404 for anything else (loopback only)."""
    body = _png(30, 10, "red")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *_args: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=5)


def test_an_image_url_the_user_passes_is_downloaded(image_server: str) -> None:
    assert load_image(f"{image_server}/ok.png").size == (30, 10)


def test_an_image_url_that_fails_is_a_fetch_error(image_server: str) -> None:
    with pytest.raises(FetchError, match="Cannot download image"):
        load_image(f"{image_server}/missing.png")
