"""`python -m moesim plan` and moesim.plan: the search, its answer, its files, and its refusals.

    python -m pytest tests/test_plan.py -q
"""
from __future__ import annotations

import dataclasses
import json

import pytest

import moesim
from moesim.errors import MoesimError
from moesim.models import model_spec
from moesim.plan import equivalent, sizes_between
from moesim.synthetic import PRESETS, generate
from moesim.trace import save_trace

DEPLOYABLE = ["lru", "lfu", "class_lru", "fiddler", "llama_cpp_ncmoe", "llama_cpp_fork_moe_cache", "class_lru_host",
              "moe_infinity", "mixtral_offloading_paper"]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """gpt-oss-like routing, 4 sequences of 40-80 decode tokens, saved under a directory whose name needs
    escaping in HTML."""
    cfg, model = PRESETS["gpt-oss-like"]
    tr = generate(dataclasses.replace(cfg, sequences=4, decode_tokens=(40, 80)), model_spec(model))
    folder = tmp_path_factory.mktemp("plan") / "<b>&traces"
    folder.mkdir()
    return save_trace(tr, folder / "small.moetrace.safetensors")


@pytest.fixture(scope="module")
def planned(small):
    return moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=DEPLOYABLE, target=20)


def test_the_recommendation_is_what_separate_runs_give(small, planned):
    """No deployable strategy run on its own at the recommended size gives more tokens/s than the recommendation,
    and the recommendation's own run gives exactly its figure (the plan replays what `run` replays)."""
    rec = planned.recommendation
    assert rec is not None and rec["strategy"] in DEPLOYABLE
    size = planned.sizes[-1]
    runs = {}
    for row in planned.rows:
        if row.size != size or row.bound or row.status != "ok":
            continue
        s = moesim.simulate(str(small), strategy=row.strategy, budget=str(row.slots), hardware="rtx-4090").summary
        runs[row.strategy] = s["decode_tokens_per_s"]
        assert s["decode_tokens_per_s"] == pytest.approx(row.tokens_per_s, rel=1e-9), row.strategy
    assert len(runs) >= 6
    assert max(runs.values()) == pytest.approx(rec["tokens_per_s"], rel=1e-9)
    assert runs[rec["strategy"]] == max(runs.values())


def test_sizes_rows_bound_and_answers(planned):
    p = planned
    assert p.sizes == sorted(p.sizes) and len(p.sizes) == 3 and p.sizes[0] == 4 * 24  # top-k per layer first
    assert p.sizes[-1] == p.max_slots  # all that fits in 8 GiB beside the rest of the plan
    assert all(r.vram_gib is None or r.vram_gib <= 8.0 + 1e-9 for r in p.rows)  # within the usable VRAM
    assert {r.size for r in p.rows if r.bound and r.status == "ok"} == set(p.sizes)
    na = [r for r in p.rows if r.strategy == "mixtral_offloading_paper"]
    assert na and all(r.status.startswith("not applicable") for r in na)  # no recorded guesses: reported, not fatal
    for size in p.sizes:  # the bound is above every deployable row of its size
        bound = p.bound_at(size)
        assert all(r.tokens_per_s <= bound * 1.0001 for r in p.ranked(size) if r.strategy != "llama_cpp_fork_moe_cache"
                   and "host" not in r.strategy and r.strategy not in ("fiddler", "llama_cpp_ncmoe"))
    t = p.least_for_target
    assert t is not None and t["tokens_per_s"] >= 20
    cheaper = [r for r in p.rows if not r.bound and r.status == "ok" and r.vram_gib < t["vram_gib"]]
    assert all(r.tokens_per_s < 20 for r in cheaper)


def test_the_command_prints_the_answer_and_writes_plan_json(small, tmp_path, capsys):
    from moesim.__main__ import main

    plain = tmp_path / "small.moetrace.safetensors"  # Hydra's override grammar needs quotes for '<' and '&'
    plain.write_bytes(small.read_bytes())
    out = tmp_path / "plan"
    code = main(["plan", f"trace={plain}", "hardware=rtx-4090", "vram=8", "sizes=2", "strategies=[lru,fiddler]",
                 f"out={out}", "progress=false", "overrides=['model.experts_format=q8_0']"])
    printed = capsys.readouterr().out
    assert code == 0 and "recommendation:" in printed and "tokens/s" in printed
    data = json.loads((out / "plan.json").read_text())
    assert data["format"] == "moesim-plan" and data["recommendation"]["strategy"] in ("lru", "fiddler")
    mxfp4 = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=2, strategies=["lru"])
    assert data["max_slots"] < mxfp4.max_slots  # q8_0 experts take about twice mxfp4's bytes: fewer fit in 8 GiB
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_the_report_escapes_what_it_is_given(planned, tmp_path):
    from moesim.plan import write

    html = write(planned, tmp_path / "p").read_text()  # the trace's folder is named <b>&traces
    assert "&lt;b&gt;&amp;traces" in html and "<b>&traces" not in html


def test_bad_input_is_named():
    with pytest.raises(MoesimError, match="model='nope'"):
        moesim.plan(model="nope")
    with pytest.raises(MoesimError, match="more than rtx-4090's 24.0 GiB"):
        moesim.plan(model="gpt-oss-20b", vram=100)
    with pytest.raises(MoesimError, match=r"VRAM \+ RAM = 8.0 \+ 2 GiB"):
        moesim.plan(model="gpt-oss-20b", vram=8, ram=2)
    with pytest.raises(MoesimError, match="vram=-1"):
        moesim.plan(model="gpt-oss-20b", vram=-1)


def test_settings_of_the_real_systems():
    spec = model_spec("gpt-oss-20b")  # 24 layers x 32 experts
    assert equivalent("llama_cpp_ncmoe", 20 * 32, spec).endswith("--n-cpu-moe 4")
    assert "offload_per_layer=24" in equivalent("mixtral_offloading", 8 * 24, spec)
    assert equivalent("lru", 100, spec) is None
    assert sizes_between(96, 768, 8, 24) == sorted(set(sizes_between(96, 768, 8, 24)))
    assert sizes_between(96, 768, 8, 24)[0] == 96 and sizes_between(96, 768, 8, 24)[-1] == 768


def test_replays_in_several_processes_give_the_same_plan(small):
    """The same rows, statuses and answer with jobs=2 (the processes read the trace from a copy; what they say
    names the trace the user gave)."""
    names = ["lru", "fiddler", "ktransformers", "mixtral_offloading_paper"]
    one = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=names)
    two = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=names, jobs=2)
    assert [(r.strategy, r.size, r.tokens_per_s, r.status) for r in one.rows] == [
        (r.strategy, r.size, r.tokens_per_s, r.status) for r in two.rows]
    assert one.recommendation == two.recommendation
    bad = [r.status for r in two.rows if r.strategy == "mixtral_offloading_paper"]
    assert bad and all(str(small) in b and "has no 'predicted' tensor" in b for b in bad)


def test_several_processes_from_a_program_read_from_standard_input(small):
    """`python -` has no main file a spawned worker could import: every worker would fail to start and the pool
    wait forever. The plan says so and replays in its own process."""
    import subprocess
    import sys

    code = (f"import moesim; p = moesim.plan(trace={str(small)!r}, hardware='rtx-4090', vram=8, sizes=2, "
            f"strategies=['lru'], jobs=2); print(p.recommendation['strategy'])")
    r = subprocess.run([sys.executable, "-"], input=code, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "lru", r.stderr
    assert "read from standard input" in r.stderr and "the replays run in this process" in r.stderr


def test_a_script_without_a_main_guard_gets_an_error_not_a_hang(small, tmp_path):
    """Each replay process imports the calling script again; one that calls plan at its top level makes every
    worker fail to start. The plan ends with an error that says what to do, instead of waiting forever."""
    import subprocess
    import sys

    script = tmp_path / "plan_it.py"
    script.write_text(f"import moesim\nmoesim.plan(trace={str(small)!r}, hardware='rtx-4090', vram=8, sizes=2, "
                      f"strategies=['lru', 'fifo'], jobs=2)\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and 'if __name__ == "__main__":' in r.stderr and "jobs=1" in r.stderr, r.stderr[-2000:]


def test_a_model_that_fits_whole_says_so(small):
    p = moesim.plan(trace=str(small), hardware="rtx-4090", sizes=2, strategies=["lru"])  # 24 GiB: all 768 fit
    assert p.max_slots == 24 * 32 and any("no offloading is needed" in n for n in p.notes)
    assert p.near_best is not None and p.near_best["vram_gib"] <= p.recommendation["vram_gib"]


def test_a_preset_that_is_another_s_configuration_replays_once(small):
    """mixtral_offloading is lru under its system's name (the same cache, no prefetch, no offload): one replay
    per size serves both, with a note; layer_offload (a fixed-budget baseline) is searched only when named."""
    p = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=2, strategies=["lru", "mixtral_offloading"])
    by = {(r.strategy, r.size): r for r in p.rows if not r.bound}
    assert len(by) == 4
    for size in p.sizes:
        a, b = by[("lru", size)], by[("mixtral_offloading", size)]
        assert a.tokens_per_s == b.tokens_per_s and a.hit_rate == b.hit_rate and b.seconds == 0.0 < a.seconds
    assert any("mixtral_offloading runs the same" in n and "as lru" in n for n in p.notes)
    from moesim.plan import default_strategies

    assert "layer_offload" not in default_strategies() and "mixtral_offloading" in default_strategies()


def test_where_every_expert_fits_the_demand_caches_replay_once(small):
    """At a size that holds every expert no demand cache evicts, so one replay serves them all (with a note); each
    one run on its own there gives exactly that replay's figures. A strategy with an offload policy still replays."""
    names = ["lru", "lfru", "static", "fifo", "visit_count", "fiddler"]
    p = moesim.plan(trace=str(small), hardware="rtx-4090", sizes=2, strategies=names)  # 24 GiB: all 768 fit
    full = p.sizes[-1]
    assert full == 24 * 32 and any("every expert fits" in n for n in p.notes)
    at = {r.strategy: r for r in p.rows if r.size == full and not r.bound}
    assert at["lru"].seconds > 0 and at["fiddler"].seconds > 0
    for name in ("lfru", "static", "fifo", "visit_count"):
        assert at[name].seconds == 0.0 and at[name].tokens_per_s == at["lru"].tokens_per_s, name
        s = moesim.simulate(str(small), strategy=name, budget=str(full), hardware="rtx-4090").summary
        assert s["decode_tokens_per_s"] == pytest.approx(at[name].tokens_per_s, rel=1e-12), name
        assert s["hit_rate"] == pytest.approx(at[name].hit_rate, rel=1e-12), name
    small_size = {r.strategy: r for r in p.rows if r.size == p.sizes[0] and not r.bound}
    assert all(small_size[n].seconds > 0 for n in names)  # below it each replays (two sizes: none is shared)


def test_at_top_k_per_layer_the_per_layer_demand_caches_replay_once(small):
    """At top-k slots per layer, where every request of the trace names top-k experts (decode, one token a
    step), a per-layer demand cache evicts every expert the latest request did not name, whatever its policy: one
    replay serves them all, and each run on its own gives exactly its figures. A cache in one pool (visit_count),
    one that offloads (class_lru_host) and every cache at the larger sizes replay on their own."""
    names = ["lru", "lfu", "class_lru", "static", "fifo", "lfru", "activation_aware", "visit_count", "class_lru_host"]
    p = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=names)
    least = p.sizes[0]
    assert least == 4 * 24 and any("evict every expert the latest request did not name" in n for n in p.notes)
    at = {r.strategy: r for r in p.rows if r.size == least and not r.bound}
    assert at["lru"].seconds > 0 and at["visit_count"].seconds > 0 and at["class_lru_host"].seconds > 0
    for name in ("lfu", "class_lru", "static", "fifo", "lfru", "activation_aware"):
        assert at[name].seconds == 0.0 and at[name].tokens_per_s == at["lru"].tokens_per_s, name
        s = moesim.simulate(str(small), strategy=name, budget=str(least), hardware="rtx-4090").summary
        assert s["decode_tokens_per_s"] == pytest.approx(at[name].tokens_per_s, rel=1e-12), name
        assert s["hit_rate"] == pytest.approx(at[name].hit_rate, rel=1e-12), name
    assert all(r.seconds > 0 for r in p.rows if r.size == p.sizes[1] and not r.bound)
    # requests of several tokens name more experts than top-k (or fewer): the policy has a choice, nothing is shared
    batch = generate(dataclasses.replace(PRESETS["gpt-oss-like-batch8"][0], sequences=8, decode_tokens=(8, 16),
                                         prompt_tokens=(4, 8)), model_spec("gpt-oss-20b"))
    q = moesim.plan(trace=batch, hardware="rtx-4090", vram=8, sizes=3, strategies=["lru", "lfu"])
    assert all(r.seconds > 0 for r in q.rows if not r.bound and r.status == "ok")


def test_a_static_split_replays_once_per_placement(small):
    """ktransformers keeps every layer's experts on the host at any size, and llama_cpp_ncmoe keeps L - slots // E:
    where the host layers are the same and the other layers' experts all fit, the replay is the same, so it runs
    once; each size's row has its own VRAM, and a run on its own there gives exactly its figures."""
    from moesim.api import compose_run, resolve_strategy
    from moesim.plan import _placement

    p = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, sizes=3, strategies=["ktransformers", "lru"])
    kt = sorted((r for r in p.rows if r.strategy == "ktransformers"), key=lambda r: r.size)
    assert [r.seconds > 0 for r in kt] == [True, False, False]
    assert any(n.startswith("ktransformers keeps the same layers on the host") and
               f"{p.sizes[1]}, {p.sizes[2]} slots as at {p.sizes[0]}: replayed once" in n for n in p.notes), p.notes
    assert kt[0].vram_gib < kt[1].vram_gib < kt[2].vram_gib  # the plan reserves each size's slots
    for r in kt:
        s = moesim.simulate(str(small), strategy="ktransformers", budget=str(r.slots), hardware="rtx-4090").summary
        assert s["decode_tokens_per_s"] == pytest.approx(r.tokens_per_s, rel=1e-12)
        assert s["vram_plan"]["total"] / 2**30 == pytest.approx(r.vram_gib, rel=1e-12)
    assert all(r.seconds > 0 for r in p.rows if r.strategy == "lru")  # an LRU cache evicts: every size replays
    tr = moesim.load_trace(str(small))
    cfg = resolve_strategy(compose_run(str(small), "llama_cpp_ncmoe", "auto", "rtx-4090"))
    assert _placement(cfg, tr, 96) == _placement(cfg, tr, 127) == frozenset(range(21))  # 3 layers' experts fit
    assert _placement(cfg, tr, 128) == frozenset(range(20))
    lru = resolve_strategy(compose_run(str(small), "lru", "auto", "rtx-4090"))
    assert _placement(lru, tr, 96) is None


def test_the_default_trace_is_the_shipped_real_one_where_there_is_one():
    from moesim.plan import default_trace

    assert default_trace("gpt-oss-20b") == "gpt-oss-20b"  # traces/gpt-oss-20b.moetrace.safetensors.xz
    assert default_trace("mixtral-8x7b") in PRESETS


def test_a_model_larger_than_vram_and_ram_is_read_from_disk(small, capsys):
    """gpt-oss-20b (12.8 GiB as stored) with 8 GiB of VRAM and 2 GiB of RAM: refused without a disk; with one,
    every replay has the disk tier: 2 GiB of experts in RAM, the rest read from nvme-pcie4; the bound's host
    cache is Belady's. The terminal names where the experts are."""
    from moesim.plan import answer_lines, table_lines

    with pytest.raises(MoesimError, match="disk=nvme-pcie4 needs ram="):
        moesim.plan(trace=str(small), vram=8, disk="nvme-pcie4")
    p = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, ram=2, disk="nvme-pcie4", sizes=2,
                    strategies=["lru", "llama_cpp_ncmoe"])
    assert p.disk == {"storage": "nvme-pcie4", "ram_gib": 2.0, "policy": "lru",
                      "host_slots": int(2 * 2**30 // model_spec("gpt-oss-20b").bytes_per_expert)}
    ok = [r for r in p.rows if r.status == "ok"]
    assert ok and all(r.host_hit_rate is not None and r.disk_mib_per_token > 0 for r in ok)
    bound = [r for r in ok if r.bound]
    lru = [r for r in ok if r.strategy == "lru" and r.size == bound[0].size]
    assert bound[0].host_hit_rate >= lru[0].host_hit_rate  # Belady on both tiers keeps more in RAM than LRU
    text = "\n".join(table_lines(p) + answer_lines(p))
    assert "host hit" in text and "where the experts are:" in text and "all on nvme-pcie4" in text
    # a model that fits in VRAM + RAM reads nothing from disk
    fits = moesim.plan(trace=str(small), hardware="rtx-4090", vram=8, ram=64, disk="nvme-pcie4", sizes=2,
                       strategies=["lru"])
    assert fits.disk is None and any("nothing is read from disk" in n for n in fits.notes)
    assert all(r.host_hit_rate is None for r in fits.rows)
