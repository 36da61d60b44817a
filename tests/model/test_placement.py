"""The layer -> device map (pure), the forward pass with every device mapped to the CPU, and the
281 GB Mixtral 8x22B shape placed on four devices and run on the meta device (no memory)."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

from provision.errors import GPUMemoryError, UsageError
from provision.formats.params import ModelArgs, parameter_count
from provision.model.placement import model_bytes, place_model, plan_placement, split
from tests.support.params import MIXTRAL_8X22B

H100 = 81559 * 2**20  # NVML's total for an H100 80GB HBM3 (provision.hardware.CARDS)
CUDA4 = [f"cuda:{i}" for i in range(4)]


def _best_max(items: list[int], n: int) -> int:
    """Brute force: the smallest possible largest part over every split into <= n consecutive parts."""
    best = sum(items)
    for cuts in itertools.combinations(range(1, len(items)), min(n - 1, len(items) - 1)):
        bounds = (0, *cuts, len(items))
        best = min(best, max(sum(items[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def test_equal_layers_are_split_evenly_and_consecutively() -> None:
    assert split([5] * 8, 4) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert split([5] * 8, 1) == [0] * 8
    assert split([], 3) == []


def test_the_split_minimizes_the_largest_device_as_brute_force_does() -> None:
    rng = random.Random(0)
    for _ in range(200):
        items = [rng.randint(1, 50) for _ in range(rng.randint(1, 9))]
        n = rng.randint(1, 5)
        where = split(items, n)
        assert where is not None and len(where) == len(items)
        assert where == sorted(where) and max(where) < n  # consecutive layers on consecutive devices
        loads = [sum(s for s, d in zip(items, where, strict=True) if d == k) for k in range(n)]
        assert max(loads) == _best_max(items, n)


def test_capacities_are_respected_and_a_model_no_split_fits_gets_none() -> None:
    where = split([4, 4, 4, 4], 2, [4, 100])
    assert where == [0, 1, 1, 1]
    assert split([4, 4, 4, 4], 2, [5, 5]) is None
    assert split([9, 1], 2, [5, 10]) == [1, 1]  # a device too small for the first part stays empty


def test_zero_devices_or_mismatched_capacities_are_usage_errors() -> None:
    with pytest.raises(UsageError):
        split([1, 2], 0)
    with pytest.raises(UsageError):
        split([1, 2], 2, [10])
    with pytest.raises(UsageError):
        plan_placement(ModelArgs.from_dict(MIXTRAL_8X22B), [])


def test_model_bytes_are_the_parameter_count_at_two_bytes_and_the_kv_cache_is_per_layer() -> None:
    a = ModelArgs.from_dict(MIXTRAL_8X22B)
    mb = model_bytes(a)
    assert mb.total == 2 * parameter_count(a) == 281_241_268_224  # reference §2: 281.24 GB
    assert mb.first == 32000 * 6144 * 2  # embeddings first
    assert mb.last == 32000 * 6144 * 2 + 6144 * 2  # output head and final norm last
    kv = model_bytes(a, context=1000)
    assert kv.layers[0] - mb.layers[0] == 2 * 8 * 128 * 1000 * 2


def test_mixtral_8x22b_in_bf16_takes_four_h100s_layer_by_layer_and_not_three() -> None:
    a = ModelArgs.from_dict(MIXTRAL_8X22B)
    p = plan_placement(a, CUDA4, capacity_bytes=[H100] * 4)
    assert p.used == 4 and len(p.layer_devices) == 56
    assert [len(p.layers_on(i)) for i in range(4)] == [14, 14, 14, 14]
    assert max(p.bytes_per_device) < H100 and sum(p.bytes_per_device) == model_bytes(a).total
    assert p.device_of("tok_embeddings.weight") == "cuda:0" and p.device_of("output.weight") == "cuda:3"
    assert p.device_of("layers.14.feed_forward.experts.7.w2.weight") == "cuda:1"
    with pytest.raises(GPUMemoryError) as e:
        plan_placement(a, CUDA4[:3], capacity_bytes=[H100] * 3)
    assert e.value.exit_code == 6 and "3 device(s)" in e.value.message


def test_the_vision_encoder_stays_with_the_embeddings_on_the_first_device(tiny_pixtral_large: Path) -> None:
    a = ModelArgs.from_file(tiny_pixtral_large / "params.json")
    p = plan_placement(a, ["cuda:0", "cuda:1"])
    assert p.device_of("vision_encoder.patch_conv.weight") == "cuda:0"
    assert p.device_of("vision_language_adapter.w_in.weight") == "cuda:0"
    assert p.remap({"cuda:0": "cpu", "cuda:1": "cpu"}).devices == ("cpu", "cpu")


def test_a_forward_pass_split_over_devices_mapped_to_the_cpu_equals_one_device(tiny_mixtral: Path) -> None:
    from provision.model.loader import load_model
    from provision.model.pixtral import greedy_generate

    one, a = load_model(tiny_mixtral, device="cpu", dtype=torch.float32)
    p = plan_placement(a, ["cuda:0", "cuda:1", "cuda:2"], dtype_bytes=4)
    assert p.used == 3 and p.layer_devices == (0, 1, 2)
    on_cpu = p.remap({d: "cpu" for d in p.devices})
    split_model, _ = load_model(tiny_mixtral, device="cpu", dtype=torch.float32, placement=on_cpu)
    toks = torch.tensor([list(range(1, 30, 2))])
    with torch.no_grad():
        torch.testing.assert_close(split_model(toks), one(toks), atol=0, rtol=0)
    assert greedy_generate(split_model, toks[0].tolist(), max_tokens=5, eos_id=None).tokens == \
        greedy_generate(one, toks[0].tolist(), max_tokens=5, eos_id=None).tokens


def test_the_smoke_test_places_layers_on_the_devices_it_is_given(tiny_pixtral_large: Path) -> None:
    from provision.stages.smoke import smoke

    rep = smoke(tiny_pixtral_large, device="cpu", dtype="float32", devices=["cpu", "cpu"])
    assert rep.passed and rep.placement is not None
    assert rep.placement["devices"] == ["cpu", "cpu"] and len(rep.placement["layer_devices"]) == 2


def test_the_smoke_test_refuses_a_device_that_is_not_one(tiny_mixtral: Path) -> None:
    from provision.stages.smoke import smoke

    with pytest.raises(UsageError) as e:
        smoke(tiny_mixtral, device="cpu", devices=["cpu", "tpu:0"])
    assert e.value.exit_code == 2


def test_the_281_gb_8x22b_shape_runs_on_the_meta_device_over_four_devices_without_memory() -> None:
    from provision.model.pixtral import build_model

    a = ModelArgs.from_dict(MIXTRAL_8X22B)
    model = build_model(a, dtype=torch.bfloat16)
    p = plan_placement(a, CUDA4, capacity_bytes=[H100] * 4).remap({d: "meta" for d in CUDA4})
    place_model(model, p)
    assert sum(t.numel() for t in model.parameters()) == parameter_count(a)
    with torch.no_grad():
        logits = model(torch.zeros(1, 8, dtype=torch.long, device="meta"))
    assert logits.shape == (1, 8, 32000) and logits.device.type == "meta"
    # without memory: not one parameter or buffer holds storage (a meta tensor has none)
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}


def test_the_smoke_command_takes_devices_and_reports_the_placement(
        tiny_mixtral: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from provision.cli.main import run_cli

    assert run_cli(["smoke", str(tiny_mixtral), "--device", "cpu", "--dtype", "float32", "--devices",
                    "cpu,cpu,cpu", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["smoke"]
    assert rep["passed"] and rep["placement"]["layer_devices"] == [0, 1, 2]


def test_a_gpu_device_this_host_lacks_is_a_resource_error(tiny_mixtral: Path) -> None:
    from provision.errors import ResourceError
    from provision.stages.smoke import smoke

    with pytest.raises(ResourceError) as e:
        smoke(tiny_mixtral, device="cpu", devices=["cpu", f"cuda:{torch.cuda.device_count()}"])
    assert e.value.exit_code == 6
