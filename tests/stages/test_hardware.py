"""GPU detection on recorded NVML / nvidia-smi answers, and --target parsing."""

from __future__ import annotations

import pytest

from provision.errors import UsageError
from provision.hardware import (
    CARDS,
    Hardware,
    detect,
    detect_nvml,
    parse_nvidia_smi_q,
    parse_target,
    target_from_hardware,
)
from tests.support.nvml import CARDS as RECORDED
from tests.support.nvml import FakeNVML, smi_text

# Each card's facts, written here from public sources, never read from ``hardware.CARDS``:
# (name as NVML / nvidia-smi print it, CUDA compute capability from NVIDIA's "CUDA GPUs" table,
#  memory in the maker's spec sheet in GB (HBM/GDDR sizes are binary: 16 GB = 16 * 1024 MiB),
#  total MiB as the driver reports it, or None where it varies with the driver version).
SPEC: dict[str, tuple[str, tuple[int, int], int, int | None]] = {
    "t4": ("Tesla T4", (7, 5), 16, 15360),
    "v100": ("Tesla V100-SXM2-16GB", (7, 0), 16, None),  # 16160 MiB on older drivers
    "v100-32gb": ("Tesla V100-SXM2-32GB", (7, 0), 32, None),
    "a10g": ("NVIDIA A10G", (8, 6), 24, 23028),
    "l4": ("NVIDIA L4", (8, 9), 24, 23034),
    "a100-40gb": ("NVIDIA A100-SXM4-40GB", (8, 0), 40, 40960),
    "a100-80gb": ("NVIDIA A100-SXM4-80GB", (8, 0), 80, 81920),
    "h100": ("NVIDIA H100 80GB HBM3", (9, 0), 80, 81559),  # H100 SXM5
    "h200": ("NVIDIA H200", (9, 0), 141, 143771),
    # NVIDIA GH200 datasheet: 96 GB HBM3 per Grace Hopper superchip's GPU; sm_90 (CUDA GPUs table)
    "gh200": ("NVIDIA GH200 480GB", (9, 0), 96, None),
    # NVIDIA DGX B200 datasheet: 1,440 GB HBM3e over 8 GPUs = 180 GB each; compute capability 10.0
    "b200": ("NVIDIA B200", (10, 0), 180, None),
    # NVIDIA L40S datasheet: 48 GB GDDR6 with ECC; Ada Lovelace, compute capability 8.9
    "l40s": ("NVIDIA L40S", (8, 9), 48, None),
    # NVIDIA RTX A6000 datasheet: 48 GB GDDR6; Ampere GA102, compute capability 8.6
    "a6000": ("NVIDIA RTX A6000", (8, 6), 48, None),
    # GeForce RTX 3090 specifications: 24 GB GDDR6X; GA102, compute capability 8.6
    "rtx3090": ("NVIDIA GeForce RTX 3090", (8, 6), 24, None),
    # GeForce RTX 4090 specifications: 24 GB GDDR6X; AD102, compute capability 8.9
    "rtx4090": ("NVIDIA GeForce RTX 4090", (8, 9), 24, None),
}
MIB = 2**20


def spec_mib(card: str) -> int:
    """The card's total in MiB as its driver reports it (the recordings carry the same figures)."""
    mib = SPEC[card][3]
    assert mib is not None, f"no driver figure written for {card}"
    return mib


def test_every_named_card_has_its_facts_written_in_this_test() -> None:
    assert sorted(CARDS) == sorted(SPEC)


@pytest.mark.parametrize("card", list(SPEC))
def test_card_table_agrees_with_the_published_name_capability_and_memory(card: str) -> None:
    name, cc, spec_gb, mib = SPEC[card]
    c = CARDS[card]
    assert (c.name, c.compute_capability) == (name, cc)
    # the driver reports a little less than the spec sheet (ECC, reserved memory), never more
    assert 0.9 * spec_gb * 1024 <= c.memory_mib <= spec_gb * 1024
    if mib is not None:
        assert c.memory_mib == mib


@pytest.mark.parametrize("card", RECORDED)
def test_nvml_recording_gives_name_capability_and_memory(card: str) -> None:
    gpus = detect_nvml(FakeNVML.card(card))
    assert gpus is not None and len(gpus) == 1
    g = gpus[0]
    assert g.compute_capability == SPEC[card][1]
    assert g.name == SPEC[card][0]
    assert g.total_bytes == spec_mib(card) * MIB
    assert 0 < g.free_bytes < g.total_bytes


@pytest.mark.parametrize("card", RECORDED)
def test_nvidia_smi_q_parse_agrees_with_nvml(card: str) -> None:
    smi = parse_nvidia_smi_q(smi_text(card))
    nv = detect_nvml(FakeNVML.card(card))
    assert nv is not None
    assert len(smi) == 1
    assert (smi[0].name, smi[0].compute_capability, smi[0].total_bytes, smi[0].free_bytes) == \
        (nv[0].name, nv[0].compute_capability, nv[0].total_bytes, nv[0].free_bytes)


def test_nvidia_smi_q_reads_fb_memory_not_bar1() -> None:
    g = parse_nvidia_smi_q(smi_text("h100"))[0]
    assert g.total_bytes == 81559 * MIB  # BAR1's 256 MiB "Total" must not be taken


def test_nvidia_smi_q_with_two_gpus_lists_both() -> None:
    text = smi_text("l4")
    second = text[text.index("GPU 0000"):].replace("00000000:00:03.0", "00000000:00:04.0")
    gpus = parse_nvidia_smi_q(text + second)
    assert [g.index for g in gpus] == [0, 1]


def test_detect_falls_back_to_nvidia_smi_when_nvml_fails() -> None:
    fake = FakeNVML.card("a10g")
    fake.fail_init = True
    hw = detect(fake, smi_text=smi_text("a10g"))
    assert hw.source == "nvidia-smi" and hw.gpus[0].compute_capability == (8, 6)


def test_detect_without_any_gpu_is_a_cpu_host() -> None:
    fake = FakeNVML({"devices": []})
    hw = detect(fake, use_smi=False)
    assert not hw.has_gpu and hw.source == "none"
    assert target_from_hardware(hw).is_cpu


def test_detect_nvml_calls_shutdown() -> None:
    fake = FakeNVML.card("t4")
    detect_nvml(fake)
    assert fake.shutdown_called


def test_detected_multi_gpu_host_becomes_a_counted_target() -> None:
    hw = detect(FakeNVML.card("h100", count=2), use_smi=False)
    t = target_from_hardware(hw)
    assert (t.count, t.compute_capability, t.source) == (2, (9, 0), "detected")
    assert t.memory_bytes == 81559 * MIB  # what the recording's NVML reports per H100


@pytest.mark.parametrize("name", list(SPEC))
def test_every_card_name_is_a_target_with_the_published_capability(name: str) -> None:
    t = parse_target(name)
    assert t.compute_capability == SPEC[name][1] and t.count == 1
    assert 0.9 * SPEC[name][2] * 2**30 <= t.memory_bytes <= SPEC[name][2] * 2**30


def test_card_name_with_count() -> None:
    t = parse_target("a100-80gbx4")
    assert t.count == 4 and t.compute_capability == (8, 0) and t.memory_bytes == 81920 * MIB


@pytest.mark.parametrize("spec,cc,gib,count", [("sm_89:24", (8, 9), 24, 1), ("sm_75:16GB", (7, 5), 16, 1),
                                               ("SM_90:80x8", (9, 0), 80, 8), ("sm_120:32gib", (12, 0), 32, 1)])
def test_sm_spec_targets(spec: str, cc: tuple[int, int], gib: int, count: int) -> None:
    t = parse_target(spec)
    assert (t.compute_capability, t.memory_bytes, t.count) == (cc, gib * 2**30, count)


def test_cpu_target_uses_ram() -> None:
    t = parse_target("cpu", hardware=Hardware(ram_bytes=24 * 2**30))
    assert t.is_cpu and t.memory_bytes == 24 * 2**30 and t.sm == "cpu"


def test_auto_target_uses_detected_hardware() -> None:
    hw = detect(FakeNVML.card("l4"), use_smi=False)
    assert parse_target("auto", hardware=hw).compute_capability == (8, 9)


def test_an_empty_target_means_auto() -> None:
    hw = detect(FakeNVML.card("l4"), use_smi=False)
    assert parse_target("", hardware=hw) == parse_target("auto", hardware=hw)
    assert parse_target("", hardware=hw).compute_capability == (8, 9)


@pytest.mark.parametrize(("typed", "key"), [("RTX 4090", "rtx4090"), ("rtx-3090", "rtx3090"), ("L40S", "l40s"),
                                            ("A100 80GB", "a100-80gb"), ("a100_40gb", "a100-40gb"),
                                            ("GH200", "gh200"), ("B200", "b200"), ("RTX A6000", "a6000"),
                                            ("NVIDIA GeForce RTX 4090", "rtx4090"), ("Tesla T4", "t4")])
def test_card_names_ignore_case_spaces_and_dashes(typed: str, key: str) -> None:
    t = parse_target(typed)
    assert (t.compute_capability, t.name) == (SPEC[key][1], key)


def test_rtx4090_pair_counts_two_cards() -> None:
    t = parse_target("RTX 4090x2")
    assert t.count == 2 and t.compute_capability == (8, 9)


def test_unknown_target_error_lists_every_card_with_capability_and_memory() -> None:
    with pytest.raises(UsageError) as e:
        parse_target("gtx1080")
    msg = str(e.value)
    for key, (_, cc, _, _) in SPEC.items():
        assert f"{key} (sm_{cc[0]}{cc[1]}, " in msg, key


@pytest.mark.parametrize("bad", ["gtx1080", "sm_89", "sm_89:", "sm_89:0", "sm_89:24x0", "h100x0", "sm_x9:24"])
def test_bad_targets_are_usage_errors(bad: str) -> None:
    with pytest.raises(UsageError) as e:
        parse_target(bad)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
