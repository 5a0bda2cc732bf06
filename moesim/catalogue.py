"""The model catalogue: named models (`model=NAME`, synthetic presets, a trace's model) as ModelSpecs.

    from moesim.catalogue import MODEL_SPECS
    MODEL_SPECS["gpt-oss-20b"].bytes_per_expert
"""
from __future__ import annotations

from .models import ModelSpec

# Numbers from each model's config.json on the Hugging Face Hub (the repository named in the comment).
MODEL_SPECS: dict[str, ModelSpec] = {
    # mistralai/Mixtral-8x7B-v0.1: num_hidden_layers 32, num_local_experts 8, num_experts_per_tok 2,
    # hidden_size 4096, intermediate_size 14336, torch_dtype bfloat16.
    "mixtral-8x7b": ModelSpec("mixtral-8x7b", 32, 8, 2, 4096, 14336),
    # deepseek-ai/DeepSeek-V3: num_hidden_layers 61 with first_k_dense_replace 3 -> 58 MoE layers;
    # n_routed_experts 256, num_experts_per_tok 8, n_shared_experts 1, hidden_size 7168,
    # moe_intermediate_size 2048; weights FP8 e4m3 with one fp32 scale per 128x128 block (+0.002 bit).
    "deepseek-v3": ModelSpec("deepseek-v3", 58, 256, 8, 7168, 2048, shared_experts=1,
                             dtype="fp8", bits_per_weight=8 + 32 / (128 * 128)),
    # deepseek-ai/DeepSeek-V2-Lite: num_hidden_layers 27, first_k_dense_replace 1 -> 26 MoE layers;
    # n_routed_experts 64, num_experts_per_tok 6, n_shared_experts 2, hidden_size 2048,
    # moe_intermediate_size 1408, torch_dtype bfloat16.
    "deepseek-v2-lite": ModelSpec("deepseek-v2-lite", 26, 64, 6, 2048, 1408, shared_experts=2),
    # Qwen/Qwen3-30B-A3B: num_hidden_layers 48 (decoder_sparse_step 1: all MoE), num_experts 128,
    # num_experts_per_tok 8, hidden_size 2048, moe_intermediate_size 768, torch_dtype bfloat16.
    "qwen3-30b-a3b": ModelSpec("qwen3-30b-a3b", 48, 128, 8, 2048, 768),
    # Qwen/Qwen1.5-MoE-A2.7B: num_hidden_layers 24, num_experts 60, num_experts_per_tok 4,
    # hidden_size 2048, moe_intermediate_size 1408, one shared expert of shared_expert_intermediate_size 5632.
    "qwen1.5-moe-a2.7b": ModelSpec("qwen1.5-moe-a2.7b", 24, 60, 4, 2048, 1408,
                                   shared_experts=1, shared_ffn=5632),
    # allenai/OLMoE-1B-7B-0924: num_hidden_layers 16, num_experts 64, num_experts_per_tok 8,
    # hidden_size 2048, intermediate_size 1024, bf16 weights.
    "olmoe-1b-7b": ModelSpec("olmoe-1b-7b", 16, 64, 8, 2048, 1024),
    # openai/gpt-oss-20b: num_hidden_layers 24, num_local_experts 32, experts_per_token 4,
    # hidden_size 2880, intermediate_size 2880; experts stored as MXFP4 (4-bit values + one 8-bit scale
    # per 32 weights = 4.25 bits): 3*2880*2880*4.25/8 = 13.2 MB per expert (../shared/traces/README.md).
    "gpt-oss-20b": ModelSpec("gpt-oss-20b", 24, 32, 4, 2880, 2880, dtype="mxfp4", bits_per_weight=4.25),
}


