"""The whole model around the experts (moesim/whole.py): weights per tensor class, the KV cache, a trace's
contexts, the VRAM plan with budget=auto and its refusal, and the dense part in a run's step times."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import moesim
from moesim.errors import MoesimError
from moesim.hardware import load_hardware
from moesim.trace import ModelSpec, from_arrays, save_trace
from moesim.whole import (contexts, dense_times, kv_bytes_per_token, plan_vram, sliding_blocks, ttft_ms,
                          weight_bytes, weight_params)

# Mixtral-8x7B's architecture (mistralai/Mixtral-8x7B-v0.1 config.json), written out here on its own so that
# the test holds moesim's counting against a sum done by hand
MIXTRAL = ModelSpec("mixtral-test", 32, 8, 2, 4096, 14336, attention="gqa", heads=32, kv_heads=8, head_dim=128,
                    vocab=32000)
# DeepSeek-V3's MLA (deepseek-ai/DeepSeek-V3 config.json)
DEEPSEEK = ModelSpec("deepseek-test", 58, 256, 8, 7168, 2048, shared_experts=1, attention="mla", heads=128,
                     head_dim=128, q_lora_rank=1536, kv_lora_rank=512, rope_head_dim=64, nope_head_dim=128,
                     dense_layers=3, dense_ffn=18432, vocab=129280)


def test_mixtral_parameters_by_hand():
    h, f, L = 4096, 14336, 32
    per_layer = 8 * 3 * h * f + h * (32 * 128) * 2 + h * (8 * 128) * 2 + 8 * h + 2 * h  # experts, q+o, k+v, router, norms
    total = L * per_layer + 2 * 32000 * h + h  # embeddings, LM head, final norm
    p = weight_params(MIXTRAL)
    assert sum(p.values()) == total
    assert round(total / 1e9, 1) == 46.7  # Mistral AI's stated total
    assert weight_bytes(MIXTRAL)["experts"] == 256 * MIXTRAL.bytes_per_expert == 2 * 3 * h * f * 256


def test_kv_bytes_gqa_mla_and_sliding_window():
    assert kv_bytes_per_token(MIXTRAL) == 32 * 2 * 8 * 128 * 2  # layers x (k, v) x kv heads x head dim x bf16
    assert kv_bytes_per_token(DEEPSEEK) == 61 * (512 + 64) * 2  # the latent and the rotary key, every layer
    gpt = ModelSpec("slide", 24, 32, 4, 2880, 2880, attention="gqa", heads=64, kv_heads=8, head_dim=64, vocab=1000,
                    sliding_window=128, sliding_layers=12)
    per = 2 * 8 * 64 * 2
    assert kv_bytes_per_token(gpt, context=1000) == per * (12 * 1000 + 12 * 128)
    assert kv_bytes_per_token(gpt, context=100) == per * 24 * 100
    assert sliding_blocks(gpt).tolist() == [True, False] * 12
    fp8 = dataclasses.replace(MIXTRAL, kv_format="fp32")
    assert kv_bytes_per_token(fp8) == 2 * kv_bytes_per_token(MIXTRAL)


def test_an_experts_only_spec_has_only_its_experts():
    spec = ModelSpec("old", 4, 8, 2, 64, 32, shared_experts=1)
    w = weight_bytes(spec)
    assert w["experts"] == 32 * spec.bytes_per_expert and w["shared"] == 4 * spec.bytes_per_shared_expert
    assert sum(w.values()) == w["experts"] + w["shared"]
    assert kv_bytes_per_token(spec) == 0


def _trace(spec):
    """Sequence 0: a 3-token prompt (step 0) and a decode (step 1); sequence 1: a 2-token prompt (step 2); then
    both decode (step 3) and sequence 1 alone (step 4). A step is one phase."""
    seq = [0, 0, 0, 0, 1, 1, 0, 1, 1]
    step = [0, 0, 0, 1, 2, 2, 3, 3, 4]
    phase = [0, 0, 0, 1, 0, 0, 1, 1, 1]
    rng = np.random.default_rng(0)
    T = len(seq)
    experts = np.stack([np.stack([rng.choice(spec.experts, spec.top_k, replace=False) for _ in range(spec.layers)])
                        for _ in range(T)]).astype(np.int16)
    weights = np.full(experts.shape, 1 / spec.top_k, np.float16)
    return from_arrays(spec, experts, weights, step=np.array(step), seq=np.array(seq), phase=np.array(phase))


SMALL = ModelSpec("small-whole", 2, 8, 2, 64, 32, attention="gqa", heads=4, kv_heads=2, head_dim=16, vocab=300)


def test_contexts_of_a_trace():
    c = contexts(_trace(SMALL))
    assert c.tokens.tolist() == [3, 1, 2, 2, 1]
    # each sequence's context at the step's end, summed: seq 0 has 3, 4, 5 tokens; seq 1 has 2, 3, 4
    assert c.kv_reads.tolist() == [3, 4, 2, 5 + 3, 4]
    assert c.attended.tolist() == [1 + 2 + 3, 4, 1 + 2, 5 + 3, 4]
    assert c.logits.tolist() == [1, 1, 1, 2, 1]  # decode tokens + each prompt's last token
    assert (c.max_context, c.max_batch, c.max_tokens) == (5, 2, 3)
    w = contexts(_trace(SMALL), window=2)
    assert w.kv_reads_win.tolist() == [2, 2, 2, 4, 2]
    assert w.attended_win.tolist() == [1 + 2 + 2, 2, 1 + 2, 2 + 2, 2]


def test_ttft_from_the_step_times():
    tr = _trace(SMALL)
    start = np.array([0.0, 10, 20, 35, 50])
    end = np.array([10.0, 20, 35, 50, 60])
    assert ttft_ms(tr, start, end).tolist() == [10.0, 15.0]  # seq 0: step 0; seq 1: step 2


def test_dense_times_grow_with_context_and_tokens():
    tr = _trace(SMALL)
    hw = load_hardware("rtx-4090")
    d = dense_times(SMALL, hw, contexts(tr))
    assert d.attention.shape == (5, 2) and d.cls.tolist() == [0, 0]
    # a weight-bound decode: attention reads its weights at the device's bandwidth, plus two fixed costs
    w = weight_bytes(SMALL)
    kv = kv_bytes_per_token(SMALL) / 2
    want = (w["attention"] / 2 + w["router"] / 2 + (4 + 1) * kv) / (hw.device_mem_gbps * 1e6) \
        + 2 * hw.kernel_overhead_us * 1e-3
    assert d.attention[1, 0] == pytest.approx(want)
    assert d.attention[3, 0] > d.attention[1, 0]  # more context and tokens
    big = dataclasses.replace(MIXTRAL)
    one = contexts(_trace(dataclasses.replace(SMALL, layers=2)))
    assert dense_times(big, hw, one).tail[0] == pytest.approx(
        weight_bytes(big)["lm_head"] / (hw.device_mem_gbps * 1e6) + hw.kernel_overhead_us * 1e-3)


def test_plan_sums_its_parts_and_says_when_it_is_over():
    p = plan_vram(MIXTRAL, 12 * 2**30, 35 * MIXTRAL.bytes_per_expert, 4096, 1, 512, 1, 512 * 2**20)
    assert p.total == p.weights + p.kv_cache + p.workspace + p.reserve + p.experts
    assert p.kv_cache == 4096 * kv_bytes_per_token(MIXTRAL)
    assert not p.fits and "over" in p.lines()[-1]


def _saved(tmp_path, spec, T=None):
    tr = _trace(spec)
    return str(save_trace(tr, tmp_path / "t.moetrace.safetensors"))


WHOLE = ModelSpec("tiny-whole", 2, 8, 2, 1024, 2048, attention="gqa", heads=8, kv_heads=2, head_dim=128, vocab=32000)


def test_budget_auto_fills_the_card_and_the_summary_has_the_plan(tmp_path):
    path = _saved(tmp_path, WHOLE)
    hw = dataclasses.replace(load_hardware("rtx-4090"), name="small-card", vram_gib=0.3)
    r = moesim.simulate(path, budget="auto", hardware=hw_file(tmp_path, hw), scope="global",
                        overrides=["vram.reserve=64MiB"])
    s = r.summary
    plan = s["vram_plan"]
    parts = sum(plan[k] for k in ("weights", "kv_cache", "workspace", "reserve", "experts"))
    assert parts == plan["total"] <= plan["card"] == int(0.3 * 2**30)
    assert plan["card"] - plan["total"] < WHOLE.bytes_per_expert  # not one more expert fits
    assert 2 <= s["budget"]["slots"] < 16 and s["budget"]["requested"] == "auto" and s["budget"]["slots"] == plan["experts"] // WHOLE.bytes_per_expert
    assert s["whole_model"] and s["ttft_ms"]["sequences"] == 2
    split = s["step_ms_split"]
    assert split["dense"] > 0
    total = split["dense"] + split["expert_compute"] + split["stall"] + split["other"]
    assert total == pytest.approx(s["step_latency_ms_mean"])
    off = moesim.simulate(path, budget="auto", hardware=hw_file(tmp_path, hw), scope="global",
                          overrides=["vram.reserve=64MiB", "whole_model=false"])
    assert off.summary["hit_rate"] == s["hit_rate"] and off.summary["tokens_per_s"] > s["tokens_per_s"]


def hw_file(tmp_path, hw):
    from moesim.hardware import save_hardware

    return str(save_hardware(hw, tmp_path / f"{hw.name}.yaml"))


def test_a_budget_over_the_card_is_refused_with_the_plan(tmp_path):
    """The issue's case: budget=30GiB on a 16 GiB T4 used to report 21 GiB of device memory without a word."""
    with pytest.raises(MoesimError) as e:
        moesim.simulate("mixtral-like", budget="30GiB", hardware="t4")  # 2 of 8 experts per layer: 21 GiB
    text = str(e.value)
    assert "expert cache" in text and "of 16.00 GiB on the card" in text and "vram.force=true" in text
    r = moesim.simulate(moesim.load_trace("mixtral-like").slice_tokens(0, 200), budget="30GiB", hardware="t4",
                        overrides=["vram.force=true"])
    assert r.summary["notes"] and r.summary["notes"][0].startswith("warning: the VRAM plan")
    assert r.summary["vram_plan"]["total"] > r.summary["vram_plan"]["card"]


def test_budget_auto_refuses_a_card_too_small_for_one_layer(tmp_path):
    path = _saved(tmp_path, WHOLE)
    hw = dataclasses.replace(load_hardware("rtx-4090"), name="tiny-card", vram_gib=0.2)
    with pytest.raises(MoesimError, match="budget=auto: the card has no room"):
        moesim.simulate(path, budget="auto", hardware=hw_file(tmp_path, hw))


@pytest.mark.parametrize("bad, match", [("vram.context=0", "vram.context"), ("vram.reserve=lots", "vram.reserve")])
def test_bad_vram_options_are_named(bad, match):
    with pytest.raises(MoesimError, match=match):
        moesim.simulate("gpt-oss-like", overrides=[bad])


def test_model_config_gives_the_architecture_and_must_match_the_trace(tmp_path):
    """model.config=config.json: the whole model from a Hugging Face config (here the catalogue's own copy of
    Mixtral-8x7B's, so the plan equals the catalogue's); a config of another model is refused, naming both."""
    import json

    from moesim.catalogue import MODEL_SPECS

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(_catalogue_config("mixtral-8x7b")))
    trace = moesim.load_trace("mixtral-like").slice_tokens(0, 300)
    bare = from_arrays(dataclasses.replace(trace.spec, **{k: getattr(ModelSpec("x", 1, 1, 1, 1, 1), k)
                                                         for k in ("attention", "heads", "kv_heads", "head_dim",
                                                                   "vocab")}, name="my-mixtral"),
                       trace.experts, trace.weights, step=trace.step, seq=trace.seq, phase=trace.phase)
    path = str(save_trace(bare, tmp_path / "bare.moetrace.safetensors"))
    alone = moesim.simulate(path, budget="25%", hardware="h200", scope="global")
    assert not alone.summary["whole_model"] and alone.summary["vram_plan"]["weights"] == 0
    r = moesim.simulate(path, budget="25%", hardware="h200", scope="global", overrides=[f"model.config={cfg}"])
    assert r.summary["whole_model"]
    assert r.summary["vram_plan"]["weights"] == sum(v for k, v in weight_bytes(MODEL_SPECS["mixtral-8x7b"]).items()
                                                    if k != "experts")
    other = tmp_path / "olmoe.json"
    other.write_text(json.dumps(_catalogue_config("olmoe-1b-7b")))
    with pytest.raises(MoesimError, match="differ from the trace's model 'my-mixtral'"):
        moesim.simulate(path, budget="25%", hardware="h200", overrides=[f"model.config={other}"])


def _catalogue_config(name: str) -> dict:
    """The config.json keys the catalogue stores for `name` (moesim/data/models/)."""
    import json
    from pathlib import Path

    return json.loads((Path(moesim.__file__).parent / "data" / "models" / f"{name}.json").read_text())["config"]


def test_format_options_change_the_bytes_moved_not_the_decisions():
    """model.experts_format / model.recipe: the same hits, loads in the format's bytes; unknown names refused."""
    from moesim.formats import get_format

    trace = moesim.load_trace("gpt-oss-like").slice_tokens(0, 300)
    base = moesim.simulate(trace, budget="25%").summary
    q8 = moesim.simulate(trace, budget="25%", overrides=["model.experts_format=q8_0"]).summary
    assert (q8["hits"], q8["loads"]) == (base["hits"], base["loads"])
    per = 3 * get_format("q8_0").tensor_bytes(2880, 2880)
    assert q8["model"]["bytes_per_expert"] == per and q8["bytes_h2d"] == q8["loads"] * per
    assert base["bytes_h2d"] == base["loads"] * 3 * 2880 * 90 * 17  # mxfp4, the model's own
    gguf = moesim.simulate(trace, budget="25%", overrides=["model.recipe=q4_k_m"]).summary
    assert gguf["model"]["attention_format"] == "q4_k" and gguf["vram_plan"]["weights"] < base["vram_plan"]["weights"]
    for bad, match in (("model.experts_format=q9_k", "model.experts_format='q9_k'"),
                       ("model.recipe=q9", "model.recipe='q9'")):
        with pytest.raises(MoesimError, match=match):
            moesim.simulate(trace, overrides=[bad])


def test_a_torch_run_times_the_experts_only():
    """The torch backend runs no attention: its runs say whole_model false and put nothing in the dense part."""
    pytest.importorskip("torch")
    trace = moesim.load_trace("gpt-oss-like").slice_tokens(0, 40)
    r = moesim.simulate(trace, backend="torch", overrides=["model.scale=0.03125", "backend.device=cpu",
                                                          "progress=false"]).summary
    assert r["whole_model"] is False and r["step_ms_split"]["dense"] == 0.0
    assert moesim.simulate(trace, overrides=["model.scale=0.03125"]).summary["whole_model"] is True
