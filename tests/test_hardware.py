"""Hardware profiles: presets, YAML round trip, bad files, cost formulas on a toy spec."""
import dataclasses

import pytest
import yaml

from moesim.errors import MoesimError
from moesim import hardware as H
from moesim.hardware import PRESETS, Cost, HardwareProfile, Host, load_hardware, save_hardware
from moesim.trace import ModelSpec, model_spec

# 3 * 1000 * 1000 weights at 8 bits: 3e6 bytes per expert; 6e6 flops per token
TOY = ModelSpec("toy", layers=2, experts=4, top_k=1, hidden=1000, ffn=1000, bits_per_weight=8,
                shared_experts=1, shared_ffn=2000)
# round numbers: GB/s x 1e6 = bytes per ms; TFLOP/s x 1e9 and GFLOP/s x 1e6 = flops per ms
HW = HardwareProfile("toy", h2d_pinned_gbps=3, h2d_pageable_gbps=1.5, copy_latency_us=500, device_mem_gbps=1.5,
                     device_tflops=0.006, host_mem_gbps=1, host_gflops=3, vram_gib=1, kernel_overhead_us=250,
                     host_overhead_us=100)


def test_presets_load_and_are_sane():
    assert set(PRESETS) == {"h200", "h100-pcie", "a100-pcie", "rtx-4090", "rtx-3060-12gb", "t4", "rtx-4090d", "rtx-3090",
                            "a100-sxm-80gb", "rtx-3080-mobile", "rtx-3060-12gb-pcie3", "rtx-6000-ada", "l4", "rtx-a6000",
                            "rtx-5090"}
    for name in PRESETS:
        hw = load_hardware(name)
        assert hw.name == name
        assert hw.h2d_pageable_gbps < hw.h2d_pinned_gbps < hw.device_mem_gbps
        assert hw.host_mem_gbps < hw.device_mem_gbps and hw.host_gflops < hw.device_tflops * 1e3
        assert hw.vram_gib > 0 and hw.source
    # the rule: 80% of PCIe Gen5 x16 (63.0 GB/s per direction)
    assert load_hardware("h200").h2d_pinned_gbps == pytest.approx(50.4)
    assert load_hardware("t4").h2d_pinned_gbps == pytest.approx(12.6)


def test_host_rates_are_channels_x_rate_and_cores_x_clock_x_flops():
    host = Host("toy", cores=((2, 3.0, 32), (4, 2.0, 16)), channels=2, mts=5600)
    assert host.peak_mem_gbps == pytest.approx(89.6)  # 2 x 5600 MT/s x 8 bytes
    assert host.peak_gflops == pytest.approx(2 * 3.0 * 32 + 4 * 2.0 * 16)
    assert host.profile_fields() == {"host_mem_gbps": 62.7, "host_gflops": 160.0, "host_overhead_us": 30.0}
    # the formula gives the vendors' own totals: ark's max memory bandwidth of the i9-13900K and i5-12400,
    # AMD's per-socket bandwidth of the EPYC 7742
    assert H.DESKTOP_I9_13900K_HOST.peak_mem_gbps == pytest.approx(89.6)
    assert H.DESKTOP_I5_12400_HOST.peak_mem_gbps == pytest.approx(76.8)
    assert H.G482_EPYC_7742_HOST.peak_mem_gbps == pytest.approx(204.8)


@pytest.mark.parametrize("name, host, mem_gbps, gflops", [
    # one socket: 8 channels at 4400 MT/s (2 DIMMs per channel), 56 cores x 2.0 GHz x 1024 (AMX bf16)
    ("h200", "Xeon Platinum 8480C", 197.1, 57344.0),
    ("h100-pcie", "Xeon Platinum 8480C", 197.1, 57344.0),
    ("a100-pcie", "EPYC 7742", 143.4, 2304.0),  # 8 x 3200; 64 x 2.25 x 32
    ("t4", "Xeon Platinum 8280", 98.5, 2419.2),  # 6 x 2933; 28 x 2.7 x 64
    ("rtx-4090", "Core i9-13900K", 62.7, 665.6),  # 2 x 5600; 8 x 3.0 x 32 + 16 x 2.2 x 16
    ("rtx-3060-12gb", "Core i5-12400", 53.8, 240.0),  # 2 x 4800; 6 x 2.5 x 32
])
def test_presets_name_their_host(name, host, mem_gbps, gflops):
    hw = load_hardware(name)
    assert host in hw.source
    # 70% of peak bandwidth, 50% of peak flops (moesim's assumptions)
    assert (hw.host_mem_gbps, hw.host_gflops, hw.host_overhead_us) == (mem_gbps, gflops, 30.0)


def test_unknown_preset_names_the_value_and_lists_presets():
    with pytest.raises(MoesimError, match=r"'h300'.*h200"):
        load_hardware("h300")
    with pytest.raises(MoesimError, match="no such file"):
        load_hardware("nowhere/mine.yaml")


def test_yaml_round_trip(tmp_path):
    table = [{"where": "device", "tokens": 1, "expert_bytes": 3_000_000, "ms": 0.5},
             {"where": "device", "tokens": 8, "expert_bytes": 3_000_000, "ms": 0.9}]
    hw = dataclasses.replace(HW, name="measured", source="calibrate on box", ffn_table=table)
    path = save_hardware(hw, tmp_path / "sub" / "mine.yaml")
    assert [p.name for p in path.parent.iterdir()] == ["mine.yaml"]  # no temp file left
    back = load_hardware(str(path))
    assert back == hw
    assert back.expert_ms(1, TOY) == 0.5
    for preset in PRESETS.values():
        assert load_hardware(str(save_hardware(preset, tmp_path / f"{preset.name}.yaml"))) == preset


def test_dict_and_omegaconf_values():
    from omegaconf import OmegaConf

    d = HW.to_dict()
    assert load_hardware(d) == HW
    assert load_hardware(OmegaConf.create(d)) == HW
    assert load_hardware(HW) is HW


@pytest.mark.parametrize("change, field", [
    ({"bogus": 1}, "bogus"),
    ({"h2d_pinned_gbps": None}, "h2d_pinned_gbps"),
    ({"device_tflops": "fast"}, "device_tflops"),
    ({"vram_gib": True}, "vram_gib"),
    ({"host_gflops": -3}, "host_gflops"),
    ({"device_mem_gbps": 0}, "device_mem_gbps"),
    ({"copy_latency_us": -1}, "copy_latency_us"),
    ({"name": 5}, "name"),
    ({"ffn_table": {"a": 1}}, "ffn_table"),
    ({"ffn_table": [{"where": "gpu", "tokens": 1, "expert_bytes": 1, "ms": 1}]}, r"ffn_table\[0\]\.where"),
    ({"ffn_table": [{"where": "host", "tokens": 0, "expert_bytes": 1, "ms": 1}]}, r"ffn_table\[0\]\.tokens"),
    ({"ffn_table": [{"where": "host", "tokens": 1, "expert_bytes": 1, "ms": -1}]}, r"ffn_table\[0\]\.ms"),
    ({"ffn_table": [{"where": "host", "tokens": 1}]}, r"ffn_table\[0\]"),
    ({"copy_table": 3}, "copy_table"),
    ({"copy_table": [{"pinned": "yes", "bytes": 1, "ms": 1}]}, r"copy_table\[0\]\.pinned"),
    ({"copy_table": [{"pinned": True, "bytes": 0, "ms": 1}]}, r"copy_table\[0\]\.bytes"),
    ({"copy_table": [{"pinned": True, "bytes": 1, "ms": 0}]}, r"copy_table\[0\]\.ms"),
    ({"copy_table": [{"pinned": True, "ms": 1}]}, r"copy_table\[0\]"),
    ({"layer_overhead_us": -1}, "layer_overhead_us"),
    ({"writeback_us_per_mib": "x"}, "writeback_us_per_mib"),
])
def test_bad_field_names_file_and_field(tmp_path, change, field):
    d = HW.to_dict()
    d.update(change)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(MoesimError, match=rf"bad\.yaml.*{field}"):
        load_hardware(str(path))


def test_missing_field_and_malformed_yaml(tmp_path):
    d = HW.to_dict()
    del d["host_mem_gbps"]
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(MoesimError, match=r"short\.yaml.*missing.*host_mem_gbps"):
        load_hardware(str(path))
    path.write_text("name: [unclosed\n")
    with pytest.raises(MoesimError, match=r"short\.yaml.*not a YAML"):
        load_hardware(str(path))
    path.write_text("- 1\n- 2\n")
    with pytest.raises(MoesimError, match=r"short\.yaml.*mapping"):
        load_hardware(str(path))
    path.write_text("!!python/object/apply:os.system ['true']\n")  # safe_load refuses python tags
    with pytest.raises(MoesimError, match=r"short\.yaml"):
        load_hardware(str(path))


def test_copy_ms():
    assert HW.copy_ms(3_000_000) == pytest.approx(0.5 + 1.0)  # latency + 3e6 B / 3e6 B/ms
    assert HW.copy_ms(3_000_000, pinned=False) == pytest.approx(0.5 + 2.0)


def test_copy_ms_interpolates_the_copy_table_and_falls_back_to_the_line():
    table = [{"pinned": True, "bytes": 1_000_000, "ms": 0.2}, {"pinned": True, "bytes": 3_000_000, "ms": 1.0},
             {"pinned": False, "bytes": 3_000_000, "ms": 4.0}]
    hw = dataclasses.replace(HW, copy_table=table)
    assert hw.copy_ms(1_000_000) == pytest.approx(0.2)
    assert hw.copy_ms(2_000_000) == pytest.approx(0.6)  # halfway between the two measured sizes
    assert hw.copy_ms(3_000_000) == pytest.approx(1.0)
    assert hw.copy_ms(6_000_000) == pytest.approx(0.5 + 2.0)  # outside the table: latency + bytes / rate
    assert hw.copy_ms(3_000_000, pinned=False) == pytest.approx(4.0)  # a single point, at its own size
    assert hw.copy_ms(1_000_000, pinned=False) == pytest.approx(0.5 + 1 / 1.5)


def test_profiles_without_the_replay_fields_load_with_zeros(tmp_path):
    d = HW.to_dict()
    for k in ("copy_table", "layer_overhead_us", "expert_overhead_us", "load_overhead_us", "writeback_us_per_mib"):
        del d[k]
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(d))
    hw = load_hardware(str(path))
    assert hw == HW and hw.replay_overhead_ms(4, 2) == 0.0 and hw.writeback_ms(2**20) == 0.0
    full = dataclasses.replace(HW, layer_overhead_us=50, expert_overhead_us=10, load_overhead_us=20,
                               writeback_us_per_mib=30, copy_table=[{"pinned": True, "bytes": 9, "ms": 0.1}])
    assert full.replay_overhead_ms(4, 2) == pytest.approx((50 + 40 + 40) / 1e3)
    assert full.writeback_ms(2 * 2**20) == pytest.approx(0.06)
    assert load_hardware(str(save_hardware(full, tmp_path / "full.yaml"))) == full


def test_expert_ms_roofline():
    # device: weights 3e6 B / 1.5e6 B/ms = 2 ms; flops 6e6 * n / 6e6 flop/ms = n ms; + 0.25 ms
    assert HW.expert_ms(1, TOY) == pytest.approx(2.25)  # memory-bound
    assert HW.expert_ms(2, TOY) == pytest.approx(2.25)  # the crossing point
    assert HW.expert_ms(8, TOY) == pytest.approx(8.25)  # compute-bound
    assert HW.expert_ms(0, TOY) == 0.0
    # host: 3e6 B / 1e6 B/ms = 3 ms; 6e6 * n / 3e6 flop/ms = 2n ms; + 0.1 ms
    assert HW.expert_ms(1, TOY, "host") == pytest.approx(3.1)
    assert HW.expert_ms(4, TOY, "host") == pytest.approx(8.1)
    # shared expert: ffn 2000 -> 6e6 B (4 ms on device), 1.2e7 flops per token
    assert HW.expert_ms(1, TOY, shared=True) == pytest.approx(4.25)
    assert HW.expert_ms(3, TOY, shared=True) == pytest.approx(6.25)
    with pytest.raises(ValueError):
        HW.expert_ms(1, TOY, "tpu")


def test_expert_ms_uses_ffn_table_when_present():
    b = TOY.bytes_per_expert  # 3e6
    table = [{"where": "device", "tokens": 1, "expert_bytes": b, "ms": 1.0},
             {"where": "device", "tokens": 5, "expert_bytes": b, "ms": 3.0},
             {"where": "device", "tokens": 1, "expert_bytes": 2 * b, "ms": 2.0},
             {"where": "device", "tokens": 5, "expert_bytes": 2 * b, "ms": 6.0}]
    hw = dataclasses.replace(HW, ffn_table=table)
    assert hw.expert_ms(1, TOY) == 1.0  # a measured point
    assert hw.expert_ms(3, TOY) == pytest.approx(2.0)  # between tokens
    assert hw.expert_ms(9, TOY) == pytest.approx(5.0)  # beyond: last slope 0.5 ms/token
    # shared expert of ffn 2000 = 2b bytes: the other measured size
    assert hw.expert_ms(5, TOY, shared=True) == pytest.approx(6.0)
    # between sizes: 1.5b is halfway between b and 2b
    mid = ModelSpec("mid", 2, 4, 1, 1000, 1500, bits_per_weight=8)
    assert hw.expert_ms(1, mid) == pytest.approx(1.5)
    # outside the sizes: scaled by bytes from the nearest
    small = ModelSpec("small", 2, 4, 1, 1000, 500, bits_per_weight=8)
    assert hw.expert_ms(5, small) == pytest.approx(1.5)
    # no host points: the host still uses the roofline
    assert hw.expert_ms(1, TOY, "host") == pytest.approx(3.1)


def test_cost_for_offload_policies():
    cost = Cost(HW, TOY)
    assert cost.fetch_ms((0, 1)) == pytest.approx(1.5)
    assert cost.device_ms((0, 1), 8) == pytest.approx(8.25)
    # host expert + activations round trip: 2 copies of 1 token x 1000 x 2 bytes
    assert cost.host_ms((1, 3), 1) == pytest.approx(3.1 + 2 * (0.5 + 2000 / 3e6))
    assert Cost(HW, TOY, pinned=False).fetch_ms((0, 0)) == pytest.approx(2.5)


def test_real_model_numbers_are_plausible():
    # gpt-oss-20b on an H200 preset: 13.2 MB expert over 50.4 GB/s ~ 0.27 ms; decode FFN memory-bound, ~us
    spec, hw = model_spec("gpt-oss-20b"), load_hardware("h200")
    assert 0.25 < hw.copy_ms(spec.bytes_per_expert) < 0.3
    assert hw.expert_ms(1, spec) < 0.02 < hw.copy_ms(spec.bytes_per_expert)


def test_a_gpu_preset_on_another_host():
    """`gpu+host`: the GPU's device side, the host's CPU side, the link at the older PCIe generation."""
    from moesim.hardware import HOSTS

    gpu, both = load_hardware("rtx-4090d"), load_hardware("rtx-4090d+xeon-6454s-2s")
    one = load_hardware("rtx-4090d+xeon-6454s")
    assert (both.device_mem_gbps, both.device_tflops, both.vram_gib) == (gpu.device_mem_gbps, gpu.device_tflops,
                                                                         gpu.vram_gib)
    assert both.host_mem_gbps == pytest.approx(2 * one.host_mem_gbps, rel=1e-3)  # 16 channels, not 8
    assert one.host_mem_gbps == pytest.approx(8 * 4800 * 8 / 1e3 * 0.7, abs=0.1)
    assert "Xeon Gold 6454S" in both.source and both.name == "rtx-4090d+xeon-6454s-2s"
    # a Gen5 GPU on the Gen4 EPYC 7343 links at Gen4
    assert load_hardware("h100-pcie+epyc-7343").h2d_pinned_gbps == load_hardware("a100-pcie").h2d_pinned_gbps
    for host in HOSTS:
        assert load_hardware(f"t4+{host}").host_mem_gbps > 0
    with pytest.raises(MoesimError, match="unknown host 'nope'; hosts: "):
        load_hardware("t4+nope")
    with pytest.raises(MoesimError, match="unknown GPU preset 'gtx'"):
        load_hardware("gtx+epyc-7343")
