"""Pixtral in plain PyTorch: loading, the vision mask, the KV cache, image token layouts."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from provision.errors import HostileContentError, ParamsError, ResourceError, StructureError
from provision.formats.manifest import SmokeImage
from provision.formats.params import IMG_BREAK_TOKEN_ID, IMG_END_TOKEN_ID, IMG_TOKEN_ID, tensor_spec
from provision.model import loader
from provision.model.inputs import encode_chat, square_image
from provision.model.loader import load_model, open_checkpoint
from provision.model.pixtral import build_model, greedy_generate
from tests.support.hf_reference import write_hf_copy

PROMPT = "Describe the image."


def _image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def test_module_names_equal_the_checkpoint_keys(tiny_src: Path) -> None:
    ckpt = open_checkpoint(tiny_src)
    model = build_model(ckpt.args)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == tensor_spec(ckpt.args)
    assert all(p.device.type == "meta" for p in model.parameters())


def test_loaded_weights_equal_the_file_and_nothing_stays_on_meta(tiny_src: Path, tiny_model: Any) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_src / "consolidated.safetensors"), framework="pt") as f:
        ref = f.get_tensor("layers.1.attention.wq.weight")
    assert torch.equal(tiny_model.layers[1].attention.wq.weight, ref.float())
    assert not any(p.device.type == "meta" for p in tiny_model.parameters())
    assert tiny_model.dtype == torch.float32


def test_bf16_load_keeps_the_checkpoint_dtype(tiny_src: Path) -> None:
    model, _ = load_model(tiny_src, device="cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_two_images_in_one_call_give_each_image_its_features_alone(tiny_model: Any) -> None:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 48, 64, generator=g), torch.randn(3, 32, 96, generator=g)
    with torch.no_grad():
        alone_a = tiny_model.image_features([a])
        alone_b = tiny_model.image_features([b])
        both = tiny_model.image_features([a, b])
    assert both.shape[0] == alone_a.shape[0] + alone_b.shape[0]
    torch.testing.assert_close(both[: alone_a.shape[0]], alone_a, rtol=0, atol=1e-5)
    torch.testing.assert_close(both[alone_a.shape[0]:], alone_b, rtol=0, atol=1e-5)


def test_without_the_block_mask_the_second_image_would_change_the_first(tiny_model: Any) -> None:
    """Guards the test above: the mask is what keeps the images apart (mistral-inference's bug)."""
    from provision.model import vision

    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 48, 64, generator=g), torch.randn(3, 32, 96, generator=g)
    orig = vision.block_diagonal_mask
    try:
        vision.block_diagonal_mask = lambda seqlens, device: None  # type: ignore[assignment,return-value]
        with torch.no_grad():
            leaky = tiny_model.image_features([a, b])
    finally:
        vision.block_diagonal_mask = orig
    with torch.no_grad():
        alone_a = tiny_model.image_features([a])
    assert (leaky[: alone_a.shape[0]] - alone_a).abs().max() > 1e-3


def test_generation_with_the_kv_cache_equals_full_recomputation(tiny_model: Any, tiny_tok: Any) -> None:
    enc = encode_chat(tiny_tok, PROMPT, [_image(64, 48, 3), _image(32, 48, 4)])
    cached = greedy_generate(tiny_model, enc.tokens, enc.images, max_tokens=6, eos_id=None, use_cache=True)
    full = greedy_generate(tiny_model, enc.tokens, enc.images, max_tokens=6, eos_id=None, use_cache=False)
    assert cached.tokens == full.tokens
    assert len(cached.tokens) == 6 and cached.all_finite


def test_cached_logits_equal_the_full_forward_at_every_position(tiny_model: Any) -> None:
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(1000, 131072, (1, 12), generator=g)
    with torch.no_grad():
        full = tiny_model(tokens)
        cache = tiny_model.new_cache(1, 12)
        first = tiny_model(tokens[:, :5], cache=cache, start_pos=0)
        chunk = tiny_model(tokens[:, 5:9], cache=cache, start_pos=5)  # a multi-token chunk after the cache
        steps = [tiny_model(tokens[:, i:i + 1], cache=cache, start_pos=i) for i in range(9, 12)]
    inc = torch.cat([first, chunk, *steps], dim=1)
    torch.testing.assert_close(inc, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("w", "h", "rows", "cols"), [(32, 48, 3, 2), (200, 120, 8, 13), (1024, 512, 32, 64)])
def test_images_of_different_sizes_give_the_expected_token_layout(
        tiny_model: Any, tiny_tok: Any, w: int, h: int, rows: int, cols: int) -> None:
    enc = encode_chat(tiny_tok, PROMPT, [_image(w, h, 7)])
    assert enc.grids == [(rows, cols)]
    assert tuple(enc.images[0].shape) == (3, rows * 16, cols * 16)
    img_part = [t for t in enc.tokens if t in (IMG_TOKEN_ID, IMG_BREAK_TOKEN_ID, IMG_END_TOKEN_ID)]
    expected = ([IMG_TOKEN_ID] * cols + [IMG_BREAK_TOKEN_ID]) * rows
    expected[-1] = IMG_END_TOKEN_ID
    assert img_part == expected
    start = enc.tokens.index(IMG_TOKEN_ID)
    assert enc.tokens[start:start + len(expected)] == expected  # contiguous, image before the text
    with torch.no_grad():
        logits = tiny_model(torch.tensor([enc.tokens]), enc.images, last_only=True)
    assert logits.shape == (1, 1, 131072) and torch.isfinite(logits).all()


def test_an_image_larger_than_1024_pixels_is_scaled_down_to_the_encoder_limit(tiny_tok: Any) -> None:
    enc = encode_chat(tiny_tok, PROMPT, [square_image(SmokeImage(width=2048, height=512))])
    assert enc.grids == [(16, 64)]


def test_a_token_count_that_does_not_match_the_patches_is_refused(tiny_model: Any) -> None:
    tokens = torch.tensor([[1, 3] + [IMG_TOKEN_ID] * 5 + [4]])
    with pytest.raises(ValueError, match="5 \\[IMG\\] tokens but the images have 12 patches"):
        tiny_model(tokens, [torch.zeros(3, 48, 64)])


def test_the_hf_layout_loads_through_the_key_map_with_identical_logits(tiny_model: Any, tiny_hf: Path) -> None:
    hf_loaded, _args = load_model(tiny_hf, device="cpu", dtype=torch.float32)
    assert open_checkpoint(tiny_hf).layout == "hf"
    g = torch.Generator().manual_seed(2)
    img = torch.randn(3, 32, 48, generator=g)
    tokens = torch.tensor([[1, 3] + ([IMG_TOKEN_ID] * 3 + [IMG_BREAK_TOKEN_ID]) * 2 + [1050, 4]])
    tokens[0, 9] = IMG_END_TOKEN_ID
    with torch.no_grad():
        torch.testing.assert_close(hf_loaded(tokens, [img]), tiny_model(tokens, [img]), rtol=0, atol=1e-5)


def test_a_sharded_hf_checkpoint_with_an_index_loads(tiny_src: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    d = write_hf_copy(tiny_src, tmp_path / "hf")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    names = sorted(sd)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(d / fname))
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    model, _ = load_model(d, device="cpu")
    assert len(model.state_dict()) == len(sd)


def test_a_quantized_hf_checkpoint_without_the_runtime_is_a_convert_error(
        tiny_src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from provision.errors import ConvertError

    d = write_hf_copy(tiny_src, tmp_path / "hf")
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors"}
    (d / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setitem(sys.modules, "provision.model.quantized", None)  # import fails
    with pytest.raises(ConvertError, match="quantization runtime"):
        load_model(d, device="cpu")


def test_a_missing_tensor_fails_the_strict_load_with_a_structure_error(tiny_copy: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tiny_copy / "consolidated.safetensors"
    sd = load_file(str(path))
    del sd["layers.1.feed_forward.w3.weight"]
    save_file(sd, str(path))
    with pytest.raises(StructureError, match="do not match the architecture"):
        load_model(tiny_copy)


def test_a_corrupt_safetensors_file_is_a_structure_error(tiny_copy: Path) -> None:
    (tiny_copy / "consolidated.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(StructureError, match="not a readable safetensors file"):
        load_model(tiny_copy)


def test_pickle_only_weights_are_refused_not_loaded(tiny_copy: Path) -> None:
    (tiny_copy / "consolidated.safetensors").unlink()
    (tiny_copy / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(HostileContentError, match="pickle"):
        load_model(tiny_copy)


def test_a_shard_index_pointing_outside_the_folder_is_refused(tiny_copy: Path) -> None:
    (tiny_copy / "consolidated.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"output.weight": "../evil.safetensors"}}))
    with pytest.raises(HostileContentError, match="outside its folder"):
        load_model(tiny_copy)


def test_a_folder_without_params_or_config_is_a_structure_error(tmp_path: Path) -> None:
    with pytest.raises(StructureError, match=r"neither params\.json"):
        load_model(tmp_path)


def test_bad_params_json_is_a_params_error(tiny_copy: Path) -> None:
    (tiny_copy / "params.json").write_text('{"dim": 64}')
    with pytest.raises(ParamsError):
        load_model(tiny_copy)


def test_weights_that_do_not_fit_fail_before_loading_with_needed_and_free(
        tiny_src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "free_device_bytes", lambda device: 1000)
    read: list[str] = []

    def spy(*_a: Any, **_k: Any) -> dict[str, torch.Tensor]:
        read.append("x")
        return {}

    monkeypatch.setattr(loader, "_read_tensors", spy)
    with pytest.raises(ResourceError) as ei:
        load_model(tiny_src, device="cpu", dtype=torch.float32)
    assert ei.value.exit_code == 6
    assert ei.value.context["free_bytes"] == 1000
    assert ei.value.context["needed_bytes"] == sum(
        4 * torch.Size(s).numel() for s in tensor_spec(open_checkpoint(tiny_src).args).values())
    assert read == []


def test_cuda_on_a_host_without_a_gpu_is_a_resource_error(tiny_src: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    with pytest.raises(ResourceError, match="no CUDA GPU"):
        load_model(tiny_src, device="cuda")


def test_loading_copies_no_tensor_twice(tiny_src: Path, tmp_path: Path) -> None:
    """The loaded parameters are the very tensors safetensors returned (assign=True, no copy)."""
    seen: dict[str, int] = {}
    orig = loader._read_tensors

    def spy(*a: Any, **k: Any) -> dict[str, torch.Tensor]:
        out = orig(*a, **k)
        seen.update({n: t.data_ptr() for n, t in out.items()})
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(loader, "_read_tensors", spy)
    try:
        model, _ = load_model(tiny_src, device="cpu", dtype=torch.bfloat16)
    finally:
        mp.undo()
    for name, t in model.state_dict().items():
        assert t.data_ptr() == seen[name], name
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_an_unknown_device_is_a_usage_error(tiny_src: Path) -> None:
    from provision.errors import UsageError

    with pytest.raises(UsageError, match="not supported"):
        load_model(tiny_src, device="tpu")


def test_a_sequence_longer_than_a_sliding_window_attends_within_the_window(tiny_src: Path, tmp_path: Path) -> None:
    params = json.loads((tiny_src / "params.json").read_text())
    params["sliding_window"] = 4
    d = tmp_path / "sw"
    shutil.copytree(tiny_src, d)
    (d / "params.json").write_text(json.dumps(params))
    model, _ = load_model(d)
    full, _ = load_model(tiny_src)
    toks = torch.tensor([[1, 1050, 1051, 1052, 1053]])
    with torch.no_grad():
        a, b = model(toks), full(toks)
    assert torch.allclose(a[:, :4], b[:, :4])  # within the window nothing changes
    assert not torch.allclose(a[:, 4], b[:, 4])  # the 5th token no longer sees the first
