"""The recorder (moesim/record.py) on tiny models of every supported architecture, built from configs
with random weights (nothing is downloaded).

    pytest tests/test_record.py -q

Each architecture's routing is recomputed here, independently, from its router's logits with that
architecture's rule (numpy, one token at a time), and compared with what the recorder wrote.
"""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never download

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moesim import record as rec  # noqa: E402
from moesim.__main__ import compose  # noqa: E402
from moesim.engine import hit_counts  # noqa: E402
from moesim.errors import MoesimError  # noqa: E402
from moesim.trace import DECODE, PREFILL, load_trace  # noqa: E402
from strategies.lru import LRU  # noqa: E402

VOCAB = 48
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0)
MLA = dict(num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
           v_head_dim=8, first_k_dense_replace=1)  # DeepSeek attention; layer 0 dense
CONFIGS = {
    "mixtral": dict(intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=40,
                      num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=48, moe_intermediate_size=16, num_experts=6, num_experts_per_tok=3,
                      norm_topk_prob=True, head_dim=8),
    "olmoe": dict(intermediate_size=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "deepseek_v2": dict(**MLA, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=2, n_shared_experts=2, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, routed_scaling_factor=1.5),
    "deepseek_v3": dict(**MLA, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
                        num_experts_per_tok=3, n_shared_experts=1, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, norm_topk_prob=True),
    "gpt_oss": dict(intermediate_size=16, num_local_experts=8, num_experts_per_tok=2, head_dim=8, sliding_window=16,
                    max_position_embeddings=131072),  # = 32 x the YaRN original 4096, as gpt-oss's config has it
}
ARCHS = list(CONFIGS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and leave the other core to the rest of the machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny_model(arch: str, seed: int = 0, eos=None):
    """A tiny model of `arch` with random weights; routers scaled up so routing is decisive (no near-ties);
    random norm weights, DeepSeek-V3's selection bias and GPT-OSS's router bias (so each of them matters)."""
    config = transformers.AutoConfig.for_model(arch, **{**COMMON, **CONFIGS[arch]})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    adapter = rec.ADAPTERS[arch]
    with torch.no_grad():
        model.model.embed_tokens.weight[0].normal_()  # the pad id's row is zero: its guess would be all ties
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight.uniform_(-1.5, 1.5)  # a norm left out changes the guess
            router = rec._get(layer, adapter.router)
            if router is None:
                continue
            router.weight.normal_(0, 1.0)
            if hasattr(router, "e_score_correction_bias"):
                router.e_score_correction_bias.uniform_(-0.3, 0.3)
            if getattr(router, "bias", None) is not None:
                router.bias.normal_(0, 1.0)
    model.generation_config.eos_token_id = eos
    return model


PROMPTS = [[1, 5, 9, 13, 2, 7], [1, 30, 31], [1, 40, 3, 3, 22, 17, 8, 11], [1, 6], [1, 44, 12, 19, 25]]


# ------------------------------------------------------------------ independent routing, one token at a time
def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def route(arch: str, config, logits: np.ndarray, bias: np.ndarray | None) -> tuple[list[int], list[float]]:
    """(ids, weights) of one token from its router logits [E], by `arch`'s rule as published."""
    k = config.num_experts_per_tok
    order = lambda v: list(np.argsort(-v, kind="stable")[:k])  # noqa: E731
    if arch == "mixtral":  # softmax, top-k, renormalise
        p = softmax(logits)
        ids = order(p)
        return ids, list(p[ids] / p[ids].sum())
    if arch in ("qwen2_moe", "qwen3_moe", "olmoe"):  # softmax, top-k, renormalise only if norm_topk_prob
        p = softmax(logits)
        ids = order(p)
        w = p[ids] / p[ids].sum() if config.norm_topk_prob else p[ids]
        return ids, list(w)
    if arch == "gpt_oss":  # top-k of the logits (bias included), softmax over the k
        ids = order(logits)
        return ids, list(softmax(logits[ids]))
    E, G = len(logits), config.n_group
    if arch == "deepseek_v2":  # softmax; keep the topk_group groups with the largest max; top-k; scale
        p = softmax(logits)
        groups = np.argsort(-p.reshape(G, E // G).max(1), kind="stable")[:config.topk_group]
        masked = np.where(np.isin(np.arange(E) // (E // G), groups), p, 0.0)
        ids = order(masked)
        return ids, list(p[ids] * config.routed_scaling_factor)
    if arch == "deepseek_v3":  # sigmoid; biased scores choose (groups by sum of their top 2); unbiased weigh
        s = 1 / (1 + np.exp(-logits))
        choice = s + bias
        group_score = np.sort(choice.reshape(G, E // G), axis=1)[:, -2:].sum(1)
        groups = np.argsort(-group_score, kind="stable")[:config.topk_group]
        masked = np.where(np.isin(np.arange(E) // (E // G), groups), choice, -np.inf)
        ids = order(masked)
        w = s[ids] / (s[ids].sum() + 1e-20) if config.norm_topk_prob else s[ids]
        return ids, list(w * config.routed_scaling_factor)
    raise AssertionError(arch)


def expected_rows(arch, model, router_inputs: list[np.ndarray], layer_index: int):
    """(ids [R, K], weights [R, K]) for one MoE layer from the inputs its router saw, best first."""
    router = rec._get(model.model.layers[layer_index], rec.ADAPTERS[arch].router)
    W = router.weight.detach().double().numpy()
    b = router.bias.detach().double().numpy() if getattr(router, "bias", None) is not None else 0.0
    corr = getattr(router, "e_score_correction_bias", None)
    corr = corr.detach().double().numpy() if corr is not None else None
    ids, weights = [], []
    for x in np.concatenate(router_inputs):
        i, w = route(arch, model.config, W @ x + b, corr)
        o = np.argsort(-np.asarray(w), kind="stable")  # best first
        ids.append(np.asarray(i)[o])
        weights.append(np.asarray(w)[o])
    return np.asarray(ids), np.asarray(weights)


class Capture:
    """Test-side hooks: what each router and each decoder layer received, per forward pass (float64)."""

    def __init__(self, model, arch):
        adapter = rec.ADAPTERS[arch]
        self.moe = [d for d, layer in enumerate(model.model.layers) if rec._get(layer, adapter.router) is not None]
        self.router_in = {d: [] for d in self.moe}
        self.layer_in = {d: [] for d in range(len(model.model.layers))}
        self.handles = []
        for d, layer in enumerate(model.model.layers):
            if d in self.moe:
                r = rec._get(layer, adapter.router)
                self.handles.append(r.register_forward_pre_hook(
                    lambda m, a, d=d: self.router_in[d].append(a[0].reshape(-1, a[0].shape[-1]).double().numpy())))
            self.handles.append(layer.register_forward_pre_hook(
                lambda m, a, k, d=d: self.layer_in[d].append((a[0] if a else k["hidden_states"]).detach().clone()),
                with_kwargs=True))

    def remove(self):
        for h in self.handles:
            h.remove()


def hooked(model) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def guess_inputs(model, arch, cap: Capture, l: int) -> list[np.ndarray]:
    """What layer l's router is given for `predicted`: the hidden state entering MoE layer l-1's decoder
    layer, through MoE layer l's post-attention norm."""
    norm = model.model.layers[cap.moe[l]].post_attention_layernorm
    with torch.no_grad():
        return [norm(h).reshape(-1, h.shape[-1]).double().numpy() for h in cap.layer_in[cap.moe[l - 1]]]


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("arch", ARCHS)
def test_routing_equals_independent_recomputation(arch, tmp_path):
    model = tiny_model(arch)
    cap = Capture(model, arch)
    trace = rec.record(model, PROMPTS[:2], tmp_path / "t.moetrace.safetensors", max_new_tokens=5, progress=False)
    cap.remove()
    assert not hooked(model)
    L, K = trace.n_layers, trace.top_k
    assert L == len(cap.moe) and K == model.config.num_experts_per_tok
    assert trace.n_tokens == sum(len(p) + 4 for p in PROMPTS[:2])  # prompt + 4 decode steps (5 forward passes)
    for l, d in enumerate(cap.moe):
        ids, weights = expected_rows(arch, model, cap.router_in[d], d)
        np.testing.assert_array_equal(trace.experts[:, l], ids, err_msg=f"{arch} layer {l} ids")
        np.testing.assert_allclose(trace.weights[:, l].astype(np.float64), weights, rtol=2e-3, atol=1e-4,
                                   err_msg=f"{arch} layer {l} weights")
        if l == 0:
            assert (trace.predicted[:, 0] == -1).all()
        else:
            guess, _ = expected_rows(arch, model, guess_inputs(model, arch, cap, l), d)
            np.testing.assert_array_equal(trace.predicted[:, l], guess, err_msg=f"{arch} layer {l} predicted")


def test_guess_in_small_chunks_equals_guess_at_the_end(tmp_path, monkeypatch):
    """`predicted` is computed GUESS_ROWS tokens at a time during generation: the chunking changes nothing."""
    monkeypatch.setattr(rec, "GUESS_ROWS", 3)  # flushes inside prefill and every few decode steps
    model = tiny_model("qwen3_moe")
    cap = Capture(model, "qwen3_moe")
    trace = rec.record(model, PROMPTS[:2], tmp_path / "t.moetrace.safetensors", max_new_tokens=7, progress=False)
    cap.remove()
    for l in range(1, trace.n_layers):
        guess, _ = expected_rows("qwen3_moe", model, guess_inputs(model, "qwen3_moe", cap, l), cap.moe[l])
        np.testing.assert_array_equal(trace.predicted[:, l], guess)


def test_deepseek_v3_selects_with_bias_but_weighs_without():
    """Guard on the test itself: the random bias changes some choices, so the test above can tell."""
    model = tiny_model("deepseek_v3")
    cap = Capture(model, "deepseek_v3")
    with torch.no_grad():
        model(torch.tensor([PROMPTS[2]]))
    cap.remove()
    d = cap.moe[0]
    router = model.model.layers[d].mlp.gate
    x = np.concatenate(cap.router_in[d])
    s = 1 / (1 + np.exp(-(x @ router.weight.detach().double().numpy().T)))
    unbiased_top = np.sort(np.argsort(-s, axis=1)[:, :3], axis=1)
    with_bias = np.sort(expected_rows("deepseek_v3", model, cap.router_in[d], d)[0], axis=1)
    assert (unbiased_top != with_bias).any()


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen2_moe", "gpt_oss"])
def test_spec_is_read_from_the_model(arch):
    model = tiny_model(arch)
    adapter = rec.ADAPTERS[arch]
    spec = rec.spec_of(model, adapter, "tiny")
    c = model.config
    layers = [layer for layer in model.model.layers if rec._get(layer, adapter.router) is not None]
    assert spec.layers == len(layers) == (2 if arch.startswith("deepseek") else 3)
    assert (spec.experts, spec.top_k, spec.hidden) == (8, c.num_experts_per_tok, 32)
    experts = rec._get(layers[0], adapter.experts)
    assert spec.bytes_per_expert == sum(p.numel() * 4 for p in experts.parameters()) // 8  # fp32
    assert spec.dtype == "fp32"
    if arch == "deepseek_v3":
        assert (spec.ffn, spec.shared_experts, spec.shared_ffn) == (16, 1, 16)
    elif arch == "qwen2_moe":
        assert (spec.ffn, spec.shared_experts, spec.shared_ffn) == (16, 1, 40)
    else:  # gpt-oss: biases make an expert a little more than 3 * hidden * ffn weights
        assert spec.shared_experts == 0 and spec.bits_per_weight > 32
        assert spec.bytes_per_expert == 4 * (32 * 32 + 32 + 16 * 32 + 32)
    # the rest of the architecture, from the model's config: the trace describes the whole model
    assert spec.whole and spec.vocab == VOCAB and spec.heads == c.num_attention_heads
    assert spec.attention == ("mla" if arch == "deepseek_v3" else "gqa")
    assert spec.dense_layers == (1 if arch == "deepseek_v3" else 0)


def generate_spy(model):
    """Wrap model.generate to keep what each call returned."""
    outputs = []
    plain = model.generate

    def spy(*a, **k):
        out = plain(*a, **k)
        outputs.append((k["attention_mask"].clone(), out.clone()))
        return out

    model.generate = spy
    return outputs


def pick_eos(model, prompts):
    """(token, i): a token that the second prompt first generates at position i in 1..4 (so it stops early)."""
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen = out[0, len(prompts[1]):].tolist()
    for i in range(1, 5):
        if gen[i] not in gen[:i]:
            return gen[i], i
    pytest.skip("greedy generation repeats one token; no early-stopping token to pick")


@pytest.mark.parametrize("batch_size", [1, 3])
def test_steps_sequences_padding_and_eos(batch_size, tmp_path):
    arch = "mixtral"
    model = tiny_model(arch, seed=1)
    eos, stop = pick_eos(model, PROMPTS)
    model.generation_config.eos_token_id = eos
    outputs = generate_spy(model)
    cap = Capture(model, arch)
    trace = rec.record(model, PROMPTS, tmp_path / "t.moetrace.safetensors", max_new_tokens=6,
                       batch_size=batch_size, progress=False)
    cap.remove()
    batches = [list(range(i, min(i + batch_size, len(PROMPTS)))) for i in range(0, len(PROMPTS), batch_size)]
    assert len(outputs) == len(batches)
    # expected (step, seq, phase) of every row the routers saw, and whether it is a real token
    rows_step, rows_seq, rows_phase, rows_keep, step = [], [], [], [], 0
    for seqs, (mask, out) in zip(batches, outputs):
        B, S = mask.shape
        gen = out[:, S:].tolist()
        n = len(gen[0])
        assert n <= 6
        for b in range(B):  # prefill: every position of the padded batch, real where the mask is 1
            for s in range(S):
                rows_step.append(step), rows_seq.append(seqs[b]), rows_phase.append(PREFILL)
                rows_keep.append(bool(mask[b, s]))
        for i in range(1, n):  # decode: sequence b is fed token i-1; real until it has produced EOS
            for b in range(B):
                rows_step.append(step + i), rows_seq.append(seqs[b]), rows_phase.append(DECODE)
                rows_keep.append(eos not in gen[b][:i])
        step += n
    keep = np.asarray(rows_keep)
    np.testing.assert_array_equal(trace.step - trace.step[0], np.asarray(rows_step)[keep])
    np.testing.assert_array_equal(trace.seq, np.asarray(rows_seq)[keep])
    np.testing.assert_array_equal(trace.phase, np.asarray(rows_phase)[keep])
    for l, d in enumerate(cap.moe):  # and the rows are those real tokens' routing
        ids, _ = expected_rows(arch, model, cap.router_in[d], d)
        np.testing.assert_array_equal(trace.experts[:, l], ids[keep])
    # every prompt's tokens are in its prefill step, the padding is not
    for i, p in enumerate(PROMPTS):
        assert ((trace.seq == i) & (trace.phase == PREFILL)).sum() == len(p)
    # the second prompt produces EOS in forward pass `stop`: it is in decode steps 1..stop only
    assert ((trace.seq == 1) & (trace.phase == DECODE)).sum() == stop
    if batch_size == 3:  # a batch's tokens lie together: one prefill step, decode steps of up to 3 tokens
        assert trace.n_steps == sum(len(out[1][0]) - out[0].shape[1] for out in outputs)
        first_decode = trace.step_starts[1]
        assert set(trace.seq[:first_decode]) == {0, 1, 2}
        assert 2 <= trace.step_starts[2] - first_decode <= 3

    # the written trace loads, validates and replays through the engine
    loaded = load_trace(tmp_path / "t.moetrace.safetensors")
    np.testing.assert_array_equal(loaded.experts, trace.experts)
    assert loaded.spec == trace.spec and loaded.source["recorder"] == "moesim.record"
    # (all experts fit: a prefill step can need every expert of a layer at once)
    counters = hit_counts(loaded, LRU, "100%", "per_layer")
    requests = sum(len(set(r[r >= 0].tolist())) for s in loaded.steps() for r in np.moveaxis(s.experts, 1, 0))
    keys = {(l, e) for l in range(loaded.n_layers) for e in loaded.experts[:, l].ravel().tolist()}
    assert counters.requests == requests == counters.hits + counters.misses
    assert counters.misses == len(keys) and counters.evictions == 0


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    full = rec.record(tiny_model("olmoe"), PROMPTS[:3], tmp_path / "full.moetrace.safetensors",
                      max_new_tokens=4, progress=False)
    out = tmp_path / "resumed.moetrace.safetensors"
    plain, calls = rec.record_batch, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return plain(*a, **k)

    monkeypatch.setattr(rec, "record_batch", interrupted)
    model = tiny_model("olmoe")
    with pytest.raises(KeyboardInterrupt):
        rec.record(model, PROMPTS[:3], out, max_new_tokens=4, progress=False)
    assert not hooked(model)  # the recorder's hooks are gone after an interruption too
    partial = tmp_path / "resumed.moetrace.safetensors.partial"
    assert not out.exists() and sorted(p.name for p in partial.iterdir()) == ["args.json", "batch-000000.safetensors"]

    # other arguments: refused, naming what differs, and nothing is removed
    with pytest.raises(MoesimError, match="max_new_tokens"):
        rec.record(tiny_model("olmoe"), PROMPTS[:3], out, max_new_tokens=5, progress=False)
    assert (partial / "batch-000000.safetensors").exists()

    calls.clear()
    monkeypatch.setattr(rec, "record_batch", lambda *a, **k: (calls.append(1), plain(*a, **k))[1])
    resumed = rec.record(tiny_model("olmoe"), PROMPTS[:3], out, max_new_tokens=4, progress=False)
    assert len(calls) == 2  # the first prompt was not recorded again
    assert not partial.exists()
    loaded = load_trace(out)
    for name in ("experts", "weights", "step", "seq", "phase", "predicted"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(full, name), err_msg=name)
        np.testing.assert_array_equal(getattr(resumed, name), getattr(full, name), err_msg=name)


# ---------------------------------------------------------------------------------- text path and the CLI
def char_tokenizer():
    """A character-level tokenizer built offline, with a chat template."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = "abcdefghijklmnopqrstuvwxyz ?.,:!'"
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>", pad_token="<pad>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}assistant: {% endif %}")
    return fast


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-gpt-oss")
    model = tiny_model("gpt_oss", eos=2)
    model.save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    return d


def run_record(overrides):
    return rec.record_command(compose("record", overrides))


def test_command_records_text_and_chat_prompts(model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    chat = [{"role": "user", "content": "hi, who are you?"}]
    prompts.write_text(json.dumps({"prompt": "the cat sat"}) + "\n\n" + json.dumps({"messages": chat}) + "\n")
    out = tmp_path / "t.moetrace.safetensors"
    run_record([f"model={model_dir}", f"prompts={prompts}", f"out={out}", "max_new_tokens=3", "batch_size=2",
                "progress=false"])
    assert str(out) in capsys.readouterr().out
    trace = load_trace(out)
    tok = char_tokenizer()
    n_chat = len(tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)["input_ids"])
    assert ((trace.seq == 0) & (trace.phase == PREFILL)).sum() == len(tok("the cat sat")["input_ids"]) == 11
    assert ((trace.seq == 1) & (trace.phase == PREFILL)).sum() == n_chat == len("user: hi, who are you?\nassistant: ")
    assert trace.spec.name == str(model_dir) and trace.spec.layers == 3 and trace.predicted is not None
    assert trace.source["prompts"] == str(prompts) and trace.source["device"] == "cpu"
    assert not (tmp_path / "t.moetrace.safetensors.partial").exists()

    # a plain text file: one prompt a line
    txt = tmp_path / "p.txt"
    txt.write_text("hello there\nhow are you\n")
    run_record([f"model={model_dir}", f"prompts={txt}", f"out={out}", "max_new_tokens=2", "predict=false",
                "progress=false"])
    trace = load_trace(out)
    assert trace.n_seqs == 2 and trace.predicted is None


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p\.jsonl:2: not JSON"),
    ('{"text": "x"}', r"p\.jsonl:2: expected an object with a 'prompt' string or a 'messages' list"),
    ('{"messages": [{"role": "user"}]}', r"p\.jsonl:2: expected an object"),
])
def test_bad_jsonl_line_names_file_and_line(tmp_path, line, message):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "ok"}\n' + line + "\n")
    with pytest.raises(MoesimError, match=message):
        rec.read_prompts(p)


def test_command_errors_are_one_line(model_dir, tmp_path):
    good = tmp_path / "p.txt"
    good.write_text("hello\n")
    out = f"out={tmp_path / 't.moetrace.safetensors'}"
    cases = [
        ([f"model={model_dir}", f"prompts={tmp_path / 'missing.txt'}", out], r"prompts=.*missing\.txt: cannot read"),
        ([f"model={tmp_path / 'no-model'}", f"prompts={good}", out], r"model=.*no-model: no such directory"),
        ([f"prompts={good}", out], r"model= is required"),
        ([f"model={model_dir}", f"prompts={good}", f"out={tmp_path / 't.npz'}"], r"out=.*t\.npz: expected a file name"),
        ([f"model={model_dir}", f"prompts={good}", out, "batch_size=0"], r"batch_size=0: expected an integer >= 1"),
        ([f"model={model_dir}", f"prompts={good}", out, "dtype=int8"], r"dtype='int8': expected one of"),
    ]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases.append(([f"model={model_dir}", f"prompts={empty}", out], r"empty\.txt: no prompts"))
    for overrides, message in cases:
        with pytest.raises(MoesimError, match=message) as e:
            run_record(overrides + ["progress=false"])
        assert "\n" not in str(e.value)


def test_unsupported_model_lists_supported_ones(tmp_path):
    d = tmp_path / "llama"
    transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                             intermediate_size=32).save_pretrained(d)
    with pytest.raises(MoesimError) as e:
        rec.load_model(str(d), "cpu", "auto")
    msg = str(e.value)
    assert "'llama' is not supported" in msg and "to add one" in msg and "\n" not in msg
    for arch in ARCHS:
        assert arch in msg


def test_help_lists_the_options(capsys, monkeypatch):
    from moesim import __main__ as cli

    monkeypatch.setitem(cli.COMMANDS, "record", ("moesim.record:record_command", "record routing traces"))
    assert cli.main(["record", "--help"]) == 0
    text = capsys.readouterr().out
    for key in ("model:", "prompts:", "out:", "max_new_tokens: 256", "batch_size: 1", "device: auto",
                "dtype: auto", "predict: true"):
        assert key in text
