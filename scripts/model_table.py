"""Writes the tables of docs/models.md: every catalogued model (moesim/catalogue.py) at its publisher's storage
format and as a GGUF Q4_K_M file, with moesim's bytes and parameter counts next to the figures its publishers
and public GGUF repositories state.

    python scripts/model_table.py              # rewrites the block between the markers in docs/models.md
    python scripts/model_table.py --print      # prints the block instead

Bytes come from moesim.whole (weight_bytes, kv_bytes_per_token) on the catalogue's specs; the GGUF rows apply
moesim.formats.recipe("q4_k_m") with moesim.models.with_formats; the KV column is one sequence's cache at
a 1000-token context (sliding-window layers hold at most their window). PUBLISHED holds the published figures, each
with the page or file it was read from; "not found" where none was found. Units: GB = 1e9 bytes, MB = 1e6.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.catalogue import ENTRIES, MODEL_SPECS  # noqa: E402
from moesim.formats import recipe  # noqa: E402
from moesim.models import with_formats  # noqa: E402
from moesim.whole import active_params, kv_bytes_per_token, nonexpert_bytes, weight_bytes, weight_params  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- model_table.py: begin -->", "<!-- model_table.py: end -->"
GGUF = "q4_k_m"

# Published figures: (text, source). Parameter counts as the publisher words them; file sizes of the same
# format. A source that is a copy or a quote of the publisher's says so.
_PADDLE = ("PaddleNLP's mirror of the Hub files, as listed in ZHUI/paddlenlp_model_readme@40a7101e89dcf9a0dedb0e0d"
           "48c8c357fcc95996:{}/index.md (its 'GB' are GiB: the sums match moesim's bytes only so)")
PUBLISHED = {
    "mixtral-8x7b": {
        "params": ("47B total, 13B active (paper); 46.7B / 12.9B (release post)",
                   "arXiv:2401.04088 abstract, read in https://gist.github.com/simonw/023d1cf403c1cd9f41801c85510aef21; "
                   "the release post's 46.7B / 12.9B as quoted at https://centerconsulting.com/ai-library/milestones/"
                   "2023-mixtral (not read on mistral.ai)"),
        "files": ("bf16 safetensors: 18 x 4.6 + 3.9 = 86.7 GiB = 93.1 GB", _PADDLE.format("mistralai/Mixtral-8x7B-v0.1")),
        "gguf": ("Q4_K_M: 28,446,410,112 bytes = 28.45 GB", "https://huggingface.co/Artefact2/Mixtral-8x7B-v0.1-GGUF/"
                 "commit/b9d0f88faadb3aec3fb0ab17fdfe17f48e6e1279 (LFS pointer size)"),
    },
    "mixtral-8x22b": {
        "params": ("141B total, 39B active", "Mistral's post as quoted at https://prompt-engineering-guide-"
                   "ar7flcqp6-dair-ai.vercel.app/models/mixtral-8x22b (not read on mistral.ai)"),
        "files": ("bf16 safetensors (mistral-community conversion): 263.4 GiB = 282.8 GB",
                  _PADDLE.format("mistralai/Mixtral-8x22B-v0.1")),
        "gguf": None,
    },
    "deepseek-v3": {
        "params": ("671B total, 37B active (36.7B incl. 0.9B embedding + 0.9B head); MTP module 11.5B more",
                   "ZHUI/paddlenlp_model_readme@40a7101e:deepseek-ai/DeepSeek-V3/index.md (copy of the Hub README); "
                   "deepseek-ai/DeepSeek-V3@9b4e9788e4a3a731f7567338ed15d3ec549ce03b:README_WEIGHTS.md"),
        "files": None,  # PaddleNLP's DeepSeek-V3 copy is 8 GB shards, a bf16 conversion, not the fp8 release
        # llama-bench prints the file's size in GiB: 376.65 x 2^30 = 404.42e9 bytes. moesim's recipe is 6.5% under
        # it: llama.cpp's Q4_K_M stores ffn_down of the use_more_bits layers in q6_k (moesim/formats.py: RECIPES)
        "gguf": ("Q4_K_M: 376.65 GiB = 404.42 GB (llama-bench)",
                 "ggml-org/llama.cpp issue #10981, RodriMora's comment of 2025-01-03 (llama-bench: \"deepseek2 671B "
                 "Q4_K - Medium | 376.65 GiB | 671.03 B\")"),
    },
    "deepseek-v2-lite": {
        "params": ("15.7B total, 2.4B active (16B in the table)",
                   "ZHUI/paddlenlp_model_readme@40a7101e:deepseek-ai/DeepSeek-V2-Lite/index.md (copy of the Hub README)"),
        "files": ("bf16 safetensors: 3 x 8.0 + 5.2 = 29.2 GiB = 31.4 GB", _PADDLE.format("deepseek-ai/DeepSeek-V2-Lite")),
        "gguf": None,
    },
    "deepseek-v4-flash": {
        "params": ("284B total, 13B activated", "the model card as quoted at https://bittide.aicompass.dev/article/"
                   "70e3d187-644e-40e8-b180-5d65d3c733e3 (not read on huggingface.co)"),
        # the MXFP4 GGUF the SGLang blog runs is 155.10 GB (validation/cases/sglang-ssd-expert-pack.yaml): neither
        # the release's own format nor Q4_K_M, so not a row here
        "files": None, "gguf": None,
    },
    "qwen3-30b-a3b": {
        "params": ("30.5B total, 3.3B activated", "the model card as quoted in https://docs.vllm.ai/projects/ascend/en/"
                   "releases-v0.22.1rc/tutorials/models/Qwen3-30B-A3B.html (not read on huggingface.co)"),
        "files": None, "gguf": None,
    },
    "qwen3-235b-a22b": {
        "params": ("235B total, 22B activated (234B non-embedding)", "the model card as summarised at https://b-lab.team/"
                   "en/content/b76fff15-f533-46f7-828f-0254e65ffc36 (not read on huggingface.co)"),
        "files": None, "gguf": None,
    },
    "qwen1.5-moe-a2.7b": {
        "params": ("14.3B total, 2.7B activated",
                   "ZHUI/paddlenlp_model_readme@40a7101e:Qwen/Qwen1.5-MoE-A2.7B/index.md (copy of the Hub README)"),
        "files": ("bf16 safetensors: 7 x 3.7 GiB + 637.5 MiB = 26.5 GiB = 28.4 GB", _PADDLE.format("Qwen/Qwen1.5-MoE-A2.7B")),
        "gguf": None,
    },
    "olmoe-1b-7b": {
        "params": ("7B total, 1B per token (paper abstract); 6.92B (the Hub's count of the GGUF)",
                   "https://ui.adsabs.harvard.edu/abs/arXiv:2409.02060; https://huggingface.co/allenai/"
                   "OLMoE-1B-7B-0924-Instruct-GGUF"),
        "files": None,
        "gguf": ("Q4_K_M: 4.21 GB", "https://huggingface.co/QuantFactory/OLMoE-1B-7B-0924-GGUF/blob/"
                 "4a4b81d0c33d5b79507b7a83e7ea2f9c7b219fe7/OLMoE-1B-7B-0924.Q4_K_M.gguf"),
    },
    "gpt-oss-20b": {
        "params": ("21B total, 3.6B active", "openai/gpt-oss@0492bd3e037807f434a09583c9ac46d8757b5c4d:README.md"),
        "files": ("mxfp4 + bf16 safetensors: 4.79 + 4.8 + 4.17 = 13.76 GB",
                  "https://huggingface.co/openai/gpt-oss-20b/tree/refs%2Fpr%2F116 (file listing)"),
        "gguf": None,
    },
    "gpt-oss-120b": {
        "params": ("117B total, 5.1B active", "openai/gpt-oss@0492bd3e037807f434a09583c9ac46d8757b5c4d:README.md"),
        "files": None, "gguf": None,
    },
}


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


def _b(n: float) -> str:
    return f"{n / 1e9:.2f}B"


def rows() -> tuple[list[str], list[str], list[str]]:
    """Markdown rows of the bytes table, the parameters table and the sources list."""
    sizes, params, sources = [], [], []
    for name, spec in MODEL_SPECS.items():
        pub = PUBLISHED[name]
        for label, s, published in ((_formats(spec), spec, pub["files"]),
                                    (f"GGUF {GGUF.upper()}", with_formats(spec, **recipe(GGUF)), pub["gguf"])):
            w = weight_bytes(s)
            text = published[0] if published else "not found"
            sizes.append(f"| {name} | {label} | {_gb(sum(w.values()))} | {_gb(nonexpert_bytes(s))} | "
                         f"{s.bytes_per_expert / 1e6:.2f} | {kv_bytes_per_token(s, context=1000) / 1e6:.1f} | {text} |")
        p = weight_params(spec)
        total, active = sum(p.values()), active_params(spec)
        params.append(f"| {name} | {_b(total)} | {_b(active)} | {_b(active - p['embed'])} | {pub['params'][0]} |")
        sources.append(f"- **{name}**: config {ENTRIES[name]['source']}, read {ENTRIES[name]['read_on']}; "
                       f"parameters: {pub['params'][1]}"
                       + (f"; files: {pub['files'][1]}" if pub["files"] else "")
                       + (f"; GGUF: {pub['gguf'][1]}" if pub["gguf"] else ""))
    return sizes, params, sources


def _formats(spec) -> str:
    """The publisher's storage in a few words: experts / the rest."""
    rest = {spec.attention_format, spec.dense_format, spec.embed_format}
    if rest == {spec.dtype}:
        return spec.dtype
    return f"experts {spec.dtype}, " + ", ".join(f"{k} {getattr(spec, f + '_format')}" for k, f in
                                                  (("attention", "attention"), ("dense", "dense"), ("embed", "embed")))


# DeepSeek-V3 as people run it (issue 19): GGUF file types, (moesim's formats per tensor class, the published size,
# where it was read). bartowski's sizes are of DeepSeek-V3-0324, the same architecture; unsloth's 1.58-bit file and
# the Q2_K file llama-bench measured are of DeepSeek-R1 (the same architecture; 671.03 B parameters in llama-bench
# for both), the 1.58-bit one's routed experts in IQ1_S and "attention and other layers in 4 or 6bit"
_BARTOWSKI = ("bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF model card, its file table (read in a copy at "
              "voozh.deno.dev/url/https://huggingface.co/bartowski/deepseek-ai_DeepSeek-V3-0324-GGUF)")
DEEPSEEK_GGUF = [
    ("Q8_0", recipe("q8_0"), "713.29 GB", _BARTOWSKI),
    ("Q6_K", recipe("q6_k"), "550.80 GB", _BARTOWSKI),
    ("Q5_K_M", recipe("q5_k_m"), "475.40 GB", _BARTOWSKI),
    ("Q4_K_M", recipe("q4_k_m"), "404.43 GB", _BARTOWSKI),
    ("Q2_K", recipe("q2_k"), "211.03 GiB = 226.59 GB (DeepSeek-R1)",
     "llama-bench's `deepseek2 671B Q2_K - Medium | 211.03 GiB | 671.03 B` line for DeepSeek R1 in Jeff Geerling's "
     "post on a cluster of four Framework mainboards, geerlingguy/jeffgeerling-com@19afb210b8a7d3cd897cced24caa2cffa94e1c66:"
     "content/blog/2025/08/i-clustered-four-framework-mainboards-test-huge-llms/index.md"),
    ("1.58-bit dynamic (UD-IQ1_S)", {"experts": "iq1_s", "attention": "q4_k", "dense": "q4_k", "embed": "q6_k"},
     "131 GB (DeepSeek-R1)", "unsloth's r/LocalLLaMA post \"1.58bit DeepSeek R1 - 131GB Dynamic GGUF\" (read in a copy at "
     "monstersandmenfilm.com/p/LocalLLaMA/comments/1ibbloy)"),
]


def deepseek_rows() -> tuple[list[str], list[str]]:
    """Markdown rows of the DeepSeek-V3 GGUF table and its sources."""
    spec = MODEL_SPECS["deepseek-v3"]
    out, by_source = [], {}
    for name, formats, published, source in DEEPSEEK_GGUF:
        total = sum(weight_bytes(with_formats(spec, **formats)).values())
        mix = ", ".join(f"{k} {v}" for k, v in formats.items())
        out.append(f"| {name} | {mix} | {_gb(total)} | {published} |")
        if source:
            by_source.setdefault(source, []).append(name)
    return out, [f"- **{', '.join(names)}**: {source}" for source, names in by_source.items()]


def block() -> str:
    sizes, params, sources = rows()
    ds_rows, ds_sources = deepseek_rows()
    return "\n".join([
        BEGIN,
        "### Bytes",
        "",
        "| model | format | total GB | non-expert GB | MB per expert | KV MB, 1k-token context | published file size |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        *sizes,
        "",
        "### Parameters",
        "",
        "| model | moesim total | moesim active | active without the embedding matrix | published |",
        "| --- | ---: | ---: | ---: | --- |",
        *params,
        "",
        "### Sources",
        "",
        *sources,
        "",
        "### DeepSeek-V3 at the GGUF file types people run it in",
        "",
        "For the disk tier (`docs/disk.md`). The formats are per tensor class, as `model.recipe` or "
        "`model.experts_format=...` give them. moesim leaves out llama.cpp's per-layer bumps (for example, Q4_K_M's "
        "q6_k `ffn_down` in some layers) and any per-tensor mix a quantizer chose beyond these four classes.",
        "",
        "| file type | moesim's formats | moesim GB | published |",
        "| --- | --- | ---: | --- |",
        *ds_rows,
        "",
        *ds_sources,
        END,
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--print", action="store_true", help="print the block instead of writing docs/models.md")
    args = ap.parse_args(argv)
    text = block()
    if args.print:
        print(text)
        return 0
    doc = DOC.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{DOC}: the markers {BEGIN} and {END} are missing")
    head, rest = doc.split(BEGIN, 1)
    DOC.write_text(head + text + rest.split(END, 1)[1])
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
