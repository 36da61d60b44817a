"""The profile table on Pixtral 12B's real params.json: memory figures, fit, and the rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from provision.errors import GPUMemoryError, ManifestError, UsageError
from provision.formats.params import tensor_spec
from provision.hardware import Target, detect, parse_target, target_from_hardware
from provision.stages.profiles import (
    OVERHEAD,
    candidates,
    choose,
    kv_cache_bytes,
    profile,
    quantized_tensor,
    support,
    weight_bytes,
)
from tests.support.nvml import FakeNVML
from tests.support.params import PIXTRAL_12B_PARAMS_JSON, pixtral_args
from tests.support.sizing import PIXTRAL_12B

# The profile auto picks for Pixtral 12B at a 32k context, worked out without profiles.py: auto takes
# the first scheme of the card's list that fits, on the fewest GPUs (README: fp8 first on sm_89+,
# bf16 from sm_80 and fp16 below, then w8a16, w4a16). Needs for the whole model, GB, from its
# 12.68B parameters (10.91B of them in decoder Linears) and bytes per weight, x 1.1 with the KV cache:
#   bf16/fp16 33.8, fp8 21.8, w8a16 22.0, w4a16 16.0.
# Per card (driver MiB): T4 15,360 MiB = 16.1 GB -> w4a16 (16.0); A10G 23,028 MiB = 24.1 GB -> w8a16;
# L4 -> fp8; A100 40/80 GB -> bf16; H100 -> fp8. Two A10Gs: bf16 at 16.9 GB each; two T4s: fp16 at
# 16.9 > 16.1 GB, so w8a16 at 11.0 GB each.
AUTO_CHOICES = [  # (card, count, driver MiB, schemes auto tries in order, the profile it picks)
    ("t4", 1, 15360, ("fp16", "w8a16", "w4a16"), "w4a16-hf"),
    ("a10g", 1, 23028, ("bf16", "w8a16", "w4a16"), "w8a16-hf"),
    ("l4", 1, 23034, ("fp8", "bf16", "w8a16", "w4a16"), "fp8-hf"),
    ("a100-40gb", 1, 40960, ("bf16", "w8a16", "w4a16"), "bf16-mistral"),
    ("a100-80gb", 1, 81920, ("bf16", "w8a16", "w4a16"), "bf16-mistral"),
    ("h100", 1, 81559, ("fp8", "bf16", "w8a16", "w4a16"), "fp8-hf"),
    ("a10g", 2, 23028, ("bf16", "w8a16", "w4a16"), "bf16-mistral-tp2"),
    ("t4", 2, 15360, ("fp16", "w8a16", "w4a16"), "w8a16-hf-tp2"),
]


@pytest.mark.parametrize(("card", "count", "mib", "order", "expected"), AUTO_CHOICES)
def test_the_expected_choices_follow_from_bytes_per_weight(card: str, count: int, mib: int,
                                                           order: tuple[str, ...], expected: str) -> None:
    derived = None
    for scheme in order:
        n = PIXTRAL_12B.gpus_needed(scheme, mib * 2**20, max_gpus=count)
        if n is not None:
            layout = "mistral" if scheme in ("bf16", "fp16") else "hf"
            derived = f"{scheme}-{layout}" + (f"-tp{n}" if n > 1 else "")
            break
    assert derived == expected
    assert choose(pixtral_args(), parse_target(card if count == 1 else f"{card}x{count}")).name == expected


def test_reference_params_json_is_the_453_byte_release_file() -> None:
    assert len(PIXTRAL_12B_PARAMS_JSON.encode()) == 453
    assert len(tensor_spec(pixtral_args())) == 585


@pytest.mark.parametrize("card,expected", [("t4", "w4a16-hf"), ("a10g", "w8a16-hf"), ("l4", "fp8-hf"),
                                           ("a100-40gb", "bf16-mistral"), ("a100-80gb", "bf16-mistral"),
                                           ("h100", "fp8-hf")])
def test_auto_picks_the_scheme_the_rules_give_for_pixtral_12b(card: str, expected: str) -> None:
    assert choose(pixtral_args(), parse_target(card)).name == expected


@pytest.mark.parametrize("card,expected", [("t4", "w4a16-hf"), ("a10g", "w8a16-hf"), ("l4", "fp8-hf"),
                                           ("a100-40gb", "bf16-mistral"), ("h100", "fp8-hf")])
def test_detected_recorded_cards_pick_the_same_schemes(card: str, expected: str) -> None:
    t = target_from_hardware(detect(FakeNVML.card(card), use_smi=False))
    assert choose(pixtral_args(), t).name == expected


def test_16bit_bf16_weights_are_the_release_size() -> None:
    assert weight_bytes(pixtral_args(), "bf16") == 25_365_479_424


def test_memory_is_weights_plus_kv_cache_plus_ten_percent() -> None:
    a = pixtral_args()
    p = profile(a, parse_target("h100"), "fp8", context=32768)
    kv = 2 * 40 * 8 * 128 * 32768 * 2
    assert p.kv_bytes == kv == kv_cache_bytes(a, 32768, 2)
    assert p.need_bytes == math.ceil((p.weight_bytes + kv) * OVERHEAD)


def test_fp8_weights_are_one_byte_per_quantized_weight_plus_row_scales() -> None:
    a = pixtral_args()
    spec = tensor_spec(a)
    q = {k: s for k, s in spec.items() if quantized_tensor(k, s, "fp8")}
    assert len(q) == 40 * 7  # every decoder Linear, nothing else
    dense = sum(math.prod(s) for k, s in spec.items() if k not in q) * 2
    assert weight_bytes(a, "fp8") == dense + sum(math.prod(s) + s[0] * 2 for s in q.values())


def test_only_decoder_linears_are_quantized() -> None:
    spec = tensor_spec(pixtral_args())
    kept = [k for k, s in spec.items() if not quantized_tensor(k, s, "w4a16")]
    assert "output.weight" in kept and "tok_embeddings.weight" in kept
    assert all(not quantized_tensor(k, s, "w4a16") for k, s in spec.items()
               if k.startswith(("vision_encoder.", "vision_language_adapter.")) or k.endswith("norm.weight"))


def test_kv_cache_grows_with_context_and_can_break_the_fit() -> None:
    a = pixtral_args()
    assert choose(a, parse_target("t4"), context=8192).name == "w4a16-hf"
    with pytest.raises(GPUMemoryError) as e:
        choose(a, parse_target("t4"), context=131072)
    assert e.value.exit_code == 6 and "w4a16" in str(e.value)


def test_no_bf16_below_sm80_names_fp16() -> None:
    with pytest.raises(ManifestError) as e:
        choose(pixtral_args(), parse_target("t4"), "bf16")
    assert e.value.exit_code == 3 and "--scheme w4a16" in str(e.value)
    assert support("fp16", parse_target("t4"))[0]


def test_fp8_on_turing_is_refused_naming_a_scheme_that_works() -> None:
    with pytest.raises(ManifestError) as e:
        choose(pixtral_args(), parse_target("t4"), "fp8")
    assert e.value.exit_code == 3 and "--scheme w4a16" in str(e.value)


def test_fp8_on_ampere_runs_weight_only_and_is_not_chosen_by_auto() -> None:
    ok, how = support("fp8", parse_target("a10g"))
    assert ok and "weight-only" in how
    assert choose(pixtral_args(), parse_target("a10g"), "fp8").scheme == "fp8"
    assert choose(pixtral_args(), parse_target("a10g")).scheme == "w8a16"


def test_fp8_on_ada_and_hopper_is_fp8_dynamic() -> None:
    for card in ("l4", "h100"):
        ok, how = support("fp8", parse_target(card))
        assert ok and "FP8_DYNAMIC" in how


def test_explicit_scheme_that_does_not_fit_is_exit_6_naming_one_that_fits() -> None:
    with pytest.raises(GPUMemoryError) as e:
        choose(pixtral_args(), parse_target("l4"), "bf16")
    assert e.value.exit_code == 6 and "--scheme fp8 fits" in str(e.value)


def test_nothing_fits_is_exit_6_with_the_numbers() -> None:
    with pytest.raises(GPUMemoryError) as e:
        choose(pixtral_args(), Target("tiny", (8, 9), 4 * 2**30))
    err = e.value
    assert err.exit_code == 6 and err.context["needed"] > err.context["available"]


def test_more_gpus_split_the_memory() -> None:
    a = pixtral_args()
    p = choose(a, parse_target("a10gx2"))
    assert p.name == "bf16-mistral-tp2" and p.gpus == 2
    assert choose(a, parse_target("t4x2")).name == "w8a16-hf-tp2"


def test_mistral_layout_refuses_quantized_schemes() -> None:
    with pytest.raises(ManifestError) as e:
        choose(pixtral_args(), parse_target("h100"), "w4a16", "mistral")
    assert e.value.exit_code == 3 and "--layout hf" in str(e.value)


def test_auto_with_mistral_layout_keeps_to_casts() -> None:
    assert choose(pixtral_args(), parse_target("h100"), layout="mistral").name == "bf16-mistral"


def test_cpu_target_prefers_16_bit_when_ram_allows() -> None:
    a = pixtral_args()
    assert choose(a, Target("cpu", None, 64 * 2**30)).name == "bf16-mistral"
    assert choose(a, Target("cpu", None, 24 * 2**30)).name == "w8a16-hf"


@pytest.mark.parametrize("bad", ["int3", "fp4", ""])
def test_unknown_scheme_is_a_usage_error(bad: str) -> None:
    with pytest.raises(UsageError) as e:
        choose(pixtral_args(), parse_target("h100"), bad)
    assert e.value.exit_code == 2


def test_zero_context_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        choose(pixtral_args(), parse_target("h100"), context=0)


def test_candidates_cover_every_scheme_and_say_why_not() -> None:
    rows = candidates(pixtral_args(), parse_target("t4"))
    names = [r.name for r in rows]
    assert names == ["bf16-mistral", "bf16-hf", "fp16-mistral", "fp16-hf", "fp8-hf", "w8a16-hf", "w4a16-hf"]
    why = {r.name: r.why_not for r in rows}
    assert "8.0" in str(why["bf16-mistral"]) and "GiB" in str(why["fp16-mistral"]) and why["w4a16-hf"] is None


def test_plan_prints_every_candidate_profile(tiny_src: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from provision.cli.main import run_cli

    params = tmp_path / "params.json"
    params.write_text(PIXTRAL_12B_PARAMS_JSON)
    code = run_cli(["plan", str(tiny_src / "manifest.toml"), "--offline", "--params", str(params),
                    "--target", "t4", "--json"])
    cap = capsys.readouterr()
    assert code == 0
    doc = json.loads(cap.out)["profiles"]
    assert doc["chosen"] == "w4a16-hf" and len(doc["candidates"]) == 7
    assert "w4a16-hf" in cap.err and "bf16 needs compute capability 8.0" in cap.err


def test_plan_reports_a_scheme_the_target_cannot_run(tiny_src: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from provision.cli.main import run_cli

    params = tmp_path / "params.json"
    params.write_text(PIXTRAL_12B_PARAMS_JSON)
    assert run_cli(["plan", str(tiny_src / "manifest.toml"), "--offline", "--params", str(params),
                    "--target", "t4", "--scheme", "fp8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["profiles"]
    assert doc["chosen"] is None and doc["error"]["exit_code"] == 3


def test_plan_without_params_says_profiles_need_them(tiny_src: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from provision.cli.main import run_cli

    assert run_cli(["plan", str(tiny_src / "manifest.toml"), "--offline", "--target", "h100", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)["profiles"]
    assert doc["candidates"] == [] and "params.json" in doc["note"]
