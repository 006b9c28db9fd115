"""Published GPU training measurements of MoE transformers, to put the performance model's prediction beside.

Each `PublishedRun` is one measurement a framework's maintainers (or a model's authors) published: the model as this
project's recipe `model:` section states it, the layout in this project's terms, the batch, and what was measured
(TFLOPS per GPU, tokens per second per GPU, seconds per optimizer step: only what the source states; everything
derived is said in `inferred`). Nothing here is measured by this project.

Conventions
    gpu       "h100_sxm" (H100 80 GB SXM), "h800", "gb200" ...; the project has no named hardware classes, so the
              benchmark maps these to its own hardware figures.
    tp pp ep  the source's tensor, pipeline and expert parallel sizes. `dp` = gpus / (tp * pp * cp): the
              data-parallel size of the dense (attention) part. Megatron-Core's MoE Parallel Folding carves its
              expert groups out of tp x cp x dp, so a source's ep may exceed dp (this project needs ep | dp, and its
              expert-data-parallel group is dp / ep).
    vpp       virtual pipeline stages per pipeline rank (1: none); etp: expert tensor parallel size; cp: context
              parallel size.
    recompute "none", "full", "selective: <modules>", or "not stated" where the source does not say.
    precision "bf16" or "fp8" (the source's compute precision for the GEMMs).
    model     ModelSection fields (moe_model/recipe.py) from the model's Hugging Face config.json; the comment above
              each model says where the values were taken from. router_aux_loss_coef is in this project's convention
              (the Hub's value times num_experts_per_tok, as moe_model/formats.py imports it); it does not affect speed.
    not_expressible  None where this project's recipe can state the run's layout and model (world = tp * pp * dp, ep
              divides dp, no vpp, cp 1, etp 1, bf16, DeepSpeed's uniform pipeline split, MTP layers not trained);
              else the reason in one line.

Megatron-Core and Megatron-Bridge count model FLOPs with their own formula (`num_floating_point_operations`); where a
step time is derived from TFLOPS in `inferred`, the FLOPs per token are the causal-attention count of that formula,
which reproduces the TFLOPS / tokens-per-second ratio of the Megatron-Bridge cards below (23.0 GFLOP/token for
Qwen3-30B-A3B at 4096 tokens, 148.0 for Qwen3-235B-A22B). Most NVIDIA benchmarks force balanced routing
(`moe_router_force_load_balancing`) on mock data; `inferred` says which.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRun:
    name: str
    source: str  # repository + path + commit (or URL / paper), and what in it
    date: str  # YYYY-MM or YYYY-MM-DD of the source (or of the release it names; `inferred` says which)
    framework: str
    gpu: str
    gpus: int
    model: dict  # ModelSection fields
    tp: int
    pp: int
    ep: int
    dp: int
    micro_batch: int
    global_batch: int  # sequences per optimizer step
    seq_len: int
    recompute: str
    precision: str
    vpp: int = 1
    etp: int = 1
    cp: int = 1
    measured_tflops_per_gpu: float | None = None
    measured_tokens_per_s_per_gpu: float | None = None
    measured_step_s: float | None = None
    inferred: str = ""
    not_expressible: str | None = None


# mistralai/Mixtral-8x7B-v0.1 config.json (from memory of the Hub file, not fetched in this session; the shape
# numbers agree with Megatron-LM's Mixtral 8x7B example arguments in the MoE README: 32 layers, hidden 4096, FFN 14336,
# 32 heads, 8 query groups, max positions 32768). Hub router_aux_loss_coef 0.02, times k = 2.
MIXTRAL_8X7B = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
    "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "router_aux_loss_coef": 0.04,
}

# mistralai/Mixtral-8x22B-v0.1 config.json (from memory of the Hub file, not fetched in this session; the shape
# numbers agree with the NVIDIA MoE model zoo's model_configs/benchmarking/Mixtral-8x22B.yaml: 56 layers, hidden 6144,
# FFN 16384, 48 heads, 8 query groups; that run used the 32000-token Llama-2 tokenizer). Hub aux 0.001, times k = 2.
MIXTRAL_8X22B = {
    "vocab_size": 32000, "hidden_size": 6144, "intermediate_size": 16384, "num_hidden_layers": 56,
    "num_attention_heads": 48, "num_key_value_heads": 8, "head_dim": 128, "num_local_experts": 8,
    "num_experts_per_tok": 2, "hidden_act": "silu", "max_position_embeddings": 65536, "rms_norm_eps": 1e-5,
    "rope_theta": 1000000.0, "tie_word_embeddings": False, "router_aux_loss_coef": 0.002,
}

# Qwen/Qwen3-30B-A3B config.json, as recipes/qwen3_30b_a3b.yaml states it (that recipe cites the Hub file); the
# Megatron recipes below use the same shape (48 layers, hidden 2048, FFN 6144, 128 experts of 768, top-8, 32 heads,
# 4 query groups of 128, qk layernorm, RoPE base 1e6, vocabulary padded to 1187 x 128 = 151936).
QWEN3_30B_A3B = {
    "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
    "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
    "num_local_experts": 128, "num_experts_per_tok": 8, "hidden_act": "silu", "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "qk_norm": "head", "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.008,
}

# Qwen/Qwen3-235B-A22B config.json, as recipes/qwen3_235b_a22b.yaml states it; Megatron-LM's
# examples/moe_recipes/qwen3_235b/h100/bf16_256GPU_TP2PP8EP32.yaml has the same shape (94 layers, hidden 4096,
# 128 experts of 1536, top-8, 64 heads, 4 query groups of 128).
QWEN3_235B_A22B = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "moe_intermediate_size": 1536,
    "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
    "num_local_experts": 128, "num_experts_per_tok": 8, "hidden_act": "silu", "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "qk_norm": "head", "tie_word_embeddings": False,
    "router_aux_loss_coef": 0.008,
}

# moonshotai/Moonlight-16B-A3B config.json, as recipes/moonlight_16b_a3b.yaml states it (DeepSeek-V3 blocks: 27
# layers, the first dense, MLA without a q rank, 64 routed experts of 1408 and 2 shared, top-6 sigmoid x 2.446).
MOONLIGHT_16B_A3B = {
    "vocab_size": 163840, "hidden_size": 2048, "intermediate_size": 11264, "moe_intermediate_size": 1408,
    "num_hidden_layers": 27, "dense_layers": [0], "num_attention_heads": 16, "num_key_value_heads": 16,
    "num_local_experts": 64, "num_experts_per_tok": 6, "num_shared_experts": 2, "hidden_act": "silu",
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-6, "rope_theta": 50000.0, "router_scoring": "sigmoid",
    "router_score_bias": True, "router_bias_update_rate": 0.001, "routed_scaling_factor": 2.446, "n_group": 1,
    "topk_group": 1, "router_aux_loss_coef": 0.0, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True,
}

# deepseek-ai/DeepSeek-V3 config.json, as recipes/deepseek_v3.yaml states it (61 layers, the first 3 dense, MLA,
# 256 routed experts of 2048 + 1 shared, sigmoid top-8 from 4 of 8 groups x 2.5, YaRN x40); its one MTP module is not
# part of the model here.
DEEPSEEK_V3 = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "dense_layers": [0, 1, 2], "num_attention_heads": 128, "num_key_value_heads": 128,
    "num_local_experts": 256, "num_experts_per_tok": 8, "num_shared_experts": 1, "hidden_act": "silu",
    "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "router_scoring": "sigmoid", "router_score_bias": True,
    "router_bias_update_rate": 0.001, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
    "router_aux_loss_coef": 0.0, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True,
    "rope_parameters": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
}

_MEGATRON_MOE_README = "NVIDIA/Megatron-LM megatron/core/transformer/moe/README.md"
_MOE_RECIPES = "NVIDIA/Megatron-LM examples/moe_recipes"
_BRIDGE_CARDS = "NVIDIA-NeMo/Megatron-Bridge docs/model-verification/models"

RUNS: tuple[PublishedRun, ...] = (
    PublishedRun(
        name="Mixtral-8x7B, Megatron-Core v0.9",
        source=f"{_MEGATRON_MOE_README} @ 022bcb5afe888664d3fb61adacea6e6c887a97f8: introduction ('With MCore v0.9, "
               "we've achieved ... 468 TFLOPS for Mixtral 8X7B bf16 training') and the 'Reference Best Parallel "
               "Mapping' table (Mixtral 8x7B dropless: 32K vocab, all-to-all, BF16, 64 GPUs, seq 4096, TP1 EP8 PP4 "
               "VP8 MBS1 GBS256; 8xH100 80GB HBM3 nodes, NVLink 4, InfiniBand 8x400 Gbit/s; PyTorch 24.09, TE v1.11)",
        date="2024-10",
        framework="Megatron-Core v0.9 (NGC PyTorch 24.09, TransformerEngine v1.11)",
        gpu="h100_sxm", gpus=64, model=MIXTRAL_8X7B,
        tp=1, pp=4, ep=8, dp=16, micro_batch=1, global_batch=256, seq_len=4096,
        recompute="none", precision="bf16", vpp=8,
        measured_tflops_per_gpu=468.0,
        inferred="The README states the 468 TFLOPS/GPU in its introduction and the layout in its mapping table (headed "
                 "'reference parallel mappings of MCore v0.8'); pairing the figure with that row is inferred. dp = "
                 "64 / (tp * pp) = 16. VP 8 read as 8 virtual stages of one layer (the NVIDIA MoE model zoo's "
                 "runtime.conf gives Mixtral-8x7B 'TP1 PP4 EP8 CP1 VPP8' and sets layers per virtual stage = layers / "
                 "PP / VPP). Recompute not stated (the README's Mixtral example script has no recompute flags): taken "
                 "as none. Date: the v0.9 release the figure names (the stored README commit is a 2025 revision still "
                 "quoting it). Step time not stated: 468 TFLOPS x 64 GPUs gives ~2.90 s/step with Megatron's "
                 "non-causal FLOP count of 2024 (82.9 GFLOP/token), ~2.79 s with the later causal count (79.7).",
        not_expressible="interleaved virtual pipeline (VP 8); tp1 pp4 ep8 dp16 itself is a legal layout here",
    ),
    PublishedRun(
        name="Mixtral-8x7B, Megatron-Core v0.8",
        source=f"{_MEGATRON_MOE_README} @ 0b4c4cfced47cffad4cec8c4047986bfa60e7f10: introduction ('This boosts "
               "Mixtral 8X7B bf16 training to achieve 438 TFLOPS as of MCore v0.8') and the same 'Reference Best "
               "Parallel Mapping' table (TP1 EP8 PP4 VP8 MBS1 GBS256, 64 GPUs, seq 4096; PyTorch 24.04, TE v1.9)",
        date="2024-08",
        framework="Megatron-Core v0.8 (NGC PyTorch 24.04, TransformerEngine v1.9)",
        gpu="h100_sxm", gpus=64, model=MIXTRAL_8X7B,
        tp=1, pp=4, ep=8, dp=16, micro_batch=1, global_batch=256, seq_len=4096,
        recompute="none", precision="bf16", vpp=8,
        measured_tflops_per_gpu=438.0,
        inferred="As the v0.9 row: the figure is paired with the mapping table by placement, VP 8 = 8 virtual stages "
                 "of one layer, recompute not stated (taken as none), date = the v0.8 release the README names. "
                 "Step time not stated: ~3.10 s with the non-causal FLOP count (82.9 GFLOP/token), ~2.98 s causal.",
        not_expressible="interleaved virtual pipeline (VP 8); tp1 pp4 ep8 dp16 itself is a legal layout here",
    ),
    PublishedRun(
        name="Mixtral-8x22B, NVIDIA MoE model zoo (Megatron-Core dev)",
        source="yanring/Megatron-MoE-ModelZoo best_practice/Mixtral/run_mixtral_8x22B.sh @ "
               "0993e667ef2183563fdb238acba1df94b93744e5 ('Dropless training, stable performance should be around "
               "455TFLOPS for H100'); layout from runtime_configs/benchmarking/runtime.conf @ "
               "30631ea5a4aa6a5328be4e81466ac0d7e9fc438f (Mixtral-8x22B: TP2 PP8 EP8 CP1 VPP1 MBS1 GBS256, 56 layers, "
               "16 nodes, seq 4096) and model_configs/benchmarking/Mixtral-8x22B.yaml @ 0993e66 (ETP1, sequence "
               "parallel, tp-comm-overlap, grouped GEMM, permute and router fusion, distributed optimizer, BF16)",
        date="2025-09",
        framework="Megatron-Core dev branch (the model zoo's container)",
        gpu="h100_sxm", gpus=128, model=MIXTRAL_8X22B,
        tp=2, pp=8, ep=8, dp=8, micro_batch=1, global_batch=256, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=455.0,
        inferred="The script states 'around 455' TFLOPS, an approximate figure. gpus = 16 nodes x 8; dp = 128 / (2 x "
                 "8) = 8. The script uses the runtime.conf defaults (read at a later commit of that file; the "
                 "Mixtral-8x22B entry matches the model zoo's earlier README table). No recompute flags in the YAML. "
                 "ETP1 with TP2 (MoE Parallel Folding): Megatron's expert-data-parallel group is 128 / (8 x 8) = 2. "
                 "Date inferred: the YAML uses --moe-router-fusion, which the MCore MoE README lists under v0.14 "
                 "(2025/09); the commit's own date was not retrievable. With tp 2 this project would run DeepSpeed's "
                 "legacy MoE (AutoEP refuses tp > 1), a fixed-capacity dispatch where the source is dropless. Step "
                 "time not stated: ~4.36 s with the causal FLOP count (242.2 GFLOP/token), ~4.51 s non-causal.",
        not_expressible=None,
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, Megatron-Core MoE recipe (2026-06)",
        source=f"{_MOE_RECIPES}/README.md, 'Median TFLOP/s/GPU' column added by NVIDIA/Megatron-LM PR #5289 (merged, "
               "2026-06-11) for the recipe qwen3_30b/h100/bf16_32GPU_TP1PP1EP8.yaml (added by PR #5012, 2026-05-27; "
               "read @ 256f60650736aebd8fa7b943d36bd73544495191): 32 GPUs, TP/PP/EP/CP/ETP 1/1/8/1/1, MBS/GBS/SL "
               "1/256/4096, 'BF16 baseline'. The 234.1 cell is quoted as the table's previous value in PR #5728",
        date="2026-06-11",
        framework="Megatron-Core dev (NGC PyTorch 26.03, TransformerEngine release_v2.14, HybridEP dispatcher)",
        gpu="h100_sxm", gpus=32, model=QWEN3_30B_A3B,
        tp=1, pp=1, ep=8, dp=32, micro_batch=1, global_batch=256, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=234.1,
        inferred="Median model TFLOP/s/GPU. The stored versions of the README lack the performance column, so the "
                 "value was read from PR #5728's 'Previous' column, which PR #5289 had filled. dp = 32; 8 "
                 "micro-batches per step. The recipe runs mock data with forced balanced routing "
                 "(moe_router_force_load_balancing), HybridEP flex dispatcher, grouped GEMM, permute and router "
                 "fusion, distributed optimizer with overlapped grad reduce and param gather, no recompute, no CUDA "
                 "graphs. Step time not stated: ~3.22 s with the causal FLOP count (23.0 GFLOP/token), i.e. ~10,180 "
                 "tokens/s/GPU.",
        not_expressible=None,
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, Megatron-Core MoE recipe re-measured through Megatron-Bridge (2026-07)",
        source="NVIDIA/Megatron-LM PR #5728 'docs: refresh Qwen3 MoE recipe performance' (open, 2026-07-09): "
               "'Qwen3-30B-A3B H100 BF16 | 234.1 | 240.5', the median model TFLOP/s/GPU over steady-state iterations "
               "30-45 measured with the matching Megatron-Bridge recipe (NVIDIA-NeMo/Megatron-Bridge #4469) at the "
               f"same GPUs, parallelism, batch, sequence length and precision as {_MOE_RECIPES}/qwen3_30b/h100/"
               "bf16_32GPU_TP1PP1EP8.yaml",
        date="2026-07-09",
        framework="Megatron-Bridge on Megatron-Core",
        gpu="h100_sxm", gpus=32, model=QWEN3_30B_A3B,
        tp=1, pp=1, ep=8, dp=32, micro_batch=1, global_batch=256, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=240.5,
        inferred="From an unmerged documentation PR (16 steady-state samples, no skipped or NaN iterations). Layout "
                 "and forced balanced routing as the 2026-06 row. Step time not stated: ~3.14 s with the causal FLOP "
                 "count (23.0 GFLOP/token).",
        not_expressible=None,
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, Megatron-Bridge H100 performance recipe (16 GPUs, forced balance)",
        source=f"{_BRIDGE_CARDS}/qwen3-30b-a3b.md @ d5d8c1925dc67b77d219581af82f8cb2750a9824, item "
               "pretrain_performance.H100 (recipe qwen3_30b_a3b_pretrain_16gpu_h100_bf16_config, Bridge commit "
               "3a9559f01283190bf16a7a592c1e2c35d908c496, last verified 2026-07-27; Megatron-Bridge PR #5123); "
               "layout from src/megatron/bridge/recipes/qwen/h100/qwen3_moe.py @ "
               "04eb4f8d6045526331113ba3f0d39b7a4d22bb85 (TP1 PP1 CP1 EP16 ETP1, GBS 1024, MBS 1, seq 4096, no "
               "recompute)",
        date="2026-07-27",
        framework="Megatron-Bridge (NeMo 26.08.rc2 container, Megatron-Core cd4afffa)",
        gpu="h100_sxm", gpus=16, model=QWEN3_30B_A3B,
        tp=1, pp=1, ep=16, dp=16, micro_batch=1, global_batch=1024, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=299.352, measured_tokens_per_s_per_gpu=13011.378, measured_step_s=20.14729,
        inferred="Averages over steps 41-50 of a 50-step mock-data run. The performance recipe forces balanced "
                 "routing; HybridEP (32 SMs) with permute fusion, expert-parallel communication overlap, Transformer "
                 "Engine CUDA graphs on moe_router and moe_preprocess, bf16 gradient reduction; peak allocated memory "
                 "62.2 GiB/GPU (PR #5123). dp = 16, 64 micro-batches per step. The three figures agree: 1024 x 4096 "
                 "tokens / (13011.378 x 16) = 20.147 s, and 299.352 TFLOPS / 13011.378 tokens/s = 23.0 GFLOP/token.",
        not_expressible=None,
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, Megatron-Bridge H100 pretraining check (16 GPUs, natural routing)",
        source=f"{_BRIDGE_CARDS}/qwen3-30b-a3b.md @ d5d8c1925dc67b77d219581af82f8cb2750a9824, item pretrain.H100 "
               "(recipe alias qwen3_30b_a3b_pretrain_config resolving to the 16-GPU recipe, Bridge commit "
               "5b9d9cf501193277e1ca47a99b97c640b8f39f90, last verified 2026-07-19): TP1/PP1/CP1/EP16/ETP1, DP16, "
               "GBS/MBS 1024/1, seq 4096, natural routing, HybridEP",
        date="2026-07-19",
        framework="Megatron-Bridge (NeMo 26.06 base container)",
        gpu="h100_sxm", gpus=16, model=QWEN3_30B_A3B,
        tp=1, pp=1, ep=16, dp=16, micro_batch=1, global_batch=1024, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=199.12, measured_tokens_per_s_per_gpu=8654.602, measured_step_s=30.28955,
        inferred="Last-10-step averages of a 100-step run from scratch on real RedPajama-2 data with natural "
                 "(unforced) routing, so the imbalance of early training is in the figure; the card calls "
                 "functional-run timings sanity checks. Recompute none per the 16-GPU recipe. The run swapped in "
                 "the RP2 SentencePiece tokenizer, but 199.12 TFLOPS / 8654.602 tokens/s = 23.0 GFLOP/token, the "
                 "count for the 151936 vocabulary, so the model as listed is the one counted.",
        not_expressible=None,
    ),
    PublishedRun(
        name="Moonlight-16B-A3B, Megatron-Bridge H100 pretraining check (16 GPUs)",
        source=f"{_BRIDGE_CARDS}/moonlight-16b-a3b.md @ d5d8c1925dc67b77d219581af82f8cb2750a9824, item pretrain.H100 "
               "(recipe moonlight_16b_pretrain_16gpu_h100_bf16_config, Bridge commit "
               "411c6b1dc26eef50124843fbf9b6253b7b6c43cb, last verified 2026-07-22): TP1/PP1/CP1/EP8/ETP1, DP16, "
               "GBS/MBS 1024/2, seq 4096, natural routing, HybridEP; recipe read in "
               "src/megatron/bridge/recipes/moonlight/h100/moonlight_16b.py (a stored version holding that function)",
        date="2026-07-22",
        framework="Megatron-Bridge (NGC PyTorch 26.04 base container)",
        gpu="h100_sxm", gpus=16, model=MOONLIGHT_16B_A3B,
        tp=1, pp=1, ep=8, dp=16, micro_batch=2, global_batch=1024, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=386.59, measured_tokens_per_s_per_gpu=22528.026, measured_step_s=11.63635,
        inferred="Last-10-step averages of a 100-step run from scratch on real RP2 data with natural routing; the card "
                 "says the model is not performance-tuned. The recipe: no recompute at MBS 2, HybridEP (32 SMs) with "
                 "expert-parallel communication overlap and delayed weight-gradient compute, router fusion, "
                 "precision-aware optimizer (fp32 main parameters, bf16 gradients and Adam moments). dp = 16, expert "
                 "data parallel 2, 32 micro-batches per step. 386.59 TFLOPS / 22528 tokens/s = 17.2 GFLOP/token, "
                 "consistent with the 163840-token vocabulary (the recipe sizes it from the tokenizer).",
        not_expressible=None,
    ),
    PublishedRun(
        name="Qwen3-235B-A22B, Megatron-Core MoE recipe (2026-06)",
        source=f"{_MOE_RECIPES}/README.md 'Median TFLOP/s/GPU' column (PR #5289, merged 2026-06-11) for "
               "qwen3_235b/h100/bf16_256GPU_TP2PP8EP32.yaml (read @ 256f60650736aebd8fa7b943d36bd73544495191: "
               "TP2 PP8 EP32 CP1 ETP1, 3 layers per virtual stage, embedding and loss counted in the pipeline split, "
               "MBS1 GBS2048 seq 4096, selective recompute moe_act layernorm, HybridEP, EP-A2A overlap, CUDA graphs "
               "on moe_router/moe_preprocess); the 214.3 cell is quoted as the previous value in PR #5728",
        date="2026-06-11",
        framework="Megatron-Core dev (NGC PyTorch 26.03, TransformerEngine release_v2.14, HybridEP dispatcher)",
        gpu="h100_sxm", gpus=256, model=QWEN3_235B_A22B,
        tp=2, pp=8, ep=32, dp=16, micro_batch=1, global_batch=2048, seq_len=4096,
        recompute="selective: moe_act, layernorm", precision="bf16", vpp=4, etp=1,
        measured_tflops_per_gpu=214.3,
        inferred="dp = 256 / (2 x 8) = 16; vpp = (94 layers + embedding + loss) / 8 stages / 3 layers = 4. Forced "
                 "balanced routing on mock data. PR #5728 (open) proposes 302.0 measured through Megatron-Bridge. "
                 "Step time not stated: ~22.6 s with the causal FLOP count (148.0 GFLOP/token).",
        not_expressible="ep 32 > dp 16 (expert groups folded over tp x dp), interleaved virtual pipeline (vpp 4) with "
                        "an uneven split (embedding and loss counted as layers), etp 1 under tp 2",
    ),
    PublishedRun(
        name="Qwen3-235B-A22B, NVIDIA MoE model zoo, intra-node EP with Megatron-FSDP",
        source="yanring/Megatron-MoE-ModelZoo best_practice/Qwen3/readme.md @ c1ad0b5c89f425d60febddc38e7f741a16f08bd1 "
               "(same table in best_practice/qwen3/readme.md @ 020b8136b3bc6f47e4143849f54e400cf0f71e8a), 'Intra-node "
               "EP strategy' row: 235B, DeepEP, H100, BF16, 256 GPUs, seq 4096, TP2 CP1 EP8 PP1 EDP32 ETP1 VPP1 DP128, "
               "FSDP on, MBS4 GBS2048 GA4, recompute full, 17.6 s, 276 TF, code main(1e057005)",
        date="2025-05",
        framework="Megatron-Core main (1e057005), DeepEP dispatcher",
        gpu="h100_sxm", gpus=256, model=QWEN3_235B_A22B,
        tp=2, pp=1, ep=8, dp=128, micro_batch=4, global_batch=2048, seq_len=4096,
        recompute="full", precision="bf16", etp=1,
        measured_tflops_per_gpu=276.0, measured_step_s=17.6,
        inferred="Date from the model zoo PR #2 'Add Qwen3 moe models' (2025-05-26, 256 H100, TE v2.4, PyTorch 25.04), "
                 "which added the Qwen3 performance table; the text table's own commit date was not retrievable. "
                 "Note 'disable log para norm'. tokens/s/GPU = 2048 x 4096 / (17.6 x 256) = ~1862 (derived). "
                 "276 TFLOPS x 256 x 17.6 s / (2048 x 4096) = 148.2 GFLOP/token, Megatron's causal count. Megatron's "
                 "expert data parallel is 256 / 8 = 32 (ETP1 folds the expert groups over tp x dp).",
        not_expressible="Megatron-FSDP with tp 2 and ep 8: this project's ZeRO-3 with ep > 1 needs AutoEP, which "
                        "refuses tp > 1 (with ZeRO-1 the tp2 pp1 ep8 dp128 layout would be legal)",
    ),
    PublishedRun(
        name="DeepSeek-V3 pre-training, DeepSeek (H800)",
        source="DeepSeek-V3 Technical Report, arXiv:2412.19437: Section 1 and Table 1 ('training DeepSeek-V3 on each "
               "trillion tokens requires only 180K H800 GPU hours, i.e., 3.7 days on our cluster with 2048 H800 "
               "GPUs'), Sections 3.1-3.3 (2048 H800, 8 per node; 16-way PP with DualPipe, 64-way EP over 8 nodes, "
               "ZeRO-1 DP, no TP; FP8 GEMMs; recomputation of RMSNorm and MLA up-projections), Section 4.2 (sequence "
               "4K; batch ramped from 3072 to 15360 sequences over the first 469B tokens, then 15360)",
        date="2024-12",
        framework="DeepSeek HAI-LLM (in-house)",
        gpu="h800", gpus=2048, model=DEEPSEEK_V3,
        tp=1, pp=16, ep=64, dp=128, micro_batch=1, global_batch=15360, seq_len=4096,
        recompute="selective: RMSNorm, MLA up-projection", precision="fp8",
        measured_tokens_per_s_per_gpu=1543.2,
        inferred="tokens/s/GPU = 1e12 tokens / (180,000 GPU-hours x 3600 s): a whole-pretraining average, including "
                 "the batch ramp, data stalls and everything else the GPU hours cover. dp = 2048 / 16 = 128. "
                 "micro_batch is NOT stated by the report: 1 is a placeholder. global_batch is the post-ramp 15360; "
                 "at that batch the average throughput means ~19.9 s per step (derived). One MTP module was trained "
                 "alongside (its FLOPs are in the GPU hours, not in the model here); node-limited routing (at most 4 "
                 "nodes per token).",
        not_expressible="FP8 training with DualPipe and a trained MTP module, on H800 (no named class); pp16 ep64 "
                        "dp128 alone would be legal, though 61 layers do not split evenly over 16 stages",
    ),
    PublishedRun(
        name="DeepSeek-V3 (without MTP), Megatron-Bridge 25.11 on GB200, BF16",
        source="NVIDIA-NeMo/Megatron-Bridge docs/performance-summary.md @ df0289c180dd20ff26933455c7a0a11084f6a36f, "
               "section '25.11 NeMo Container', System DGX-GB200, row 'DeepSeekV3 (w/o MTP) | 256 | BF16 | 4096 | 1 | "
               "4096 | 0 | 1 | 4 | 1 | 4 | 64 | 64 | 3139 | 782' (#GPUs, precision, GBS, MBS, seq, FSDP, TP, PP, CP, "
               "VP, EP, GA, tokens/s/GPU, model TFLOP/s/GPU)",
        date="2025-11",
        framework="Megatron-Bridge (NeMo 25.11 container)",
        gpu="gb200", gpus=256, model=DEEPSEEK_V3,
        tp=1, pp=4, ep=64, dp=64, micro_batch=1, global_batch=4096, seq_len=4096,
        recompute="not stated", precision="bf16", vpp=4,
        measured_tflops_per_gpu=782.0, measured_tokens_per_s_per_gpu=3139.0,
        inferred="The page: 'we force-balance the token distribution among experts and all benchmarks are "
                 "token-dropless'. dp = 256 / 4 = 64; GA 64 = 4096 / 64. Step time not stated: 4096 x 4096 / (3139 "
                 "x 256) = ~20.9 s (derived). 782 / 3139 = 249 GFLOP/token in Bridge's count.",
        not_expressible="GB200 (no named hardware class); interleaved virtual pipeline (VP 4) with 61 layers over 16 "
                        "virtual stages",
    ),
    PublishedRun(
        name="Qwen3-30B-A3B, Megatron-Core MoE recipe on GB200, BF16 (2026-06)",
        source=f"{_MOE_RECIPES}/README.md 'Median TFLOP/s/GPU' column (PR #5289, merged 2026-06-11) for "
               "qwen3_30b/gb200/bf16_16GPU_TP1PP1EP16.yaml (read @ 8a2ac1fdc74bb9499de816603e1e3d00369f287b: TP1 "
               "PP1 EP16 CP1 ETP1, MBS4 GBS512 seq 4096, forced balance, HybridEP, no recompute); the 528.0 cell is "
               "quoted as the previous value in PR #5728",
        date="2026-06-11",
        framework="Megatron-Core dev (HybridEP dispatcher)",
        gpu="gb200", gpus=16, model=QWEN3_30B_A3B,
        tp=1, pp=1, ep=16, dp=16, micro_batch=4, global_batch=512, seq_len=4096,
        recompute="none", precision="bf16", etp=1,
        measured_tflops_per_gpu=528.0,
        inferred="Median TFLOP/s/GPU, forced balanced routing on mock data; dp = 16, 8 micro-batches per step. PR "
                 "#5728 (open) proposes 504.2 re-measured through Megatron-Bridge. Step time not stated: ~5.71 s "
                 "with the causal FLOP count (23.0 GFLOP/token).",
        not_expressible="GB200 (no named hardware class); the tp1 pp1 ep16 dp16 layout itself is legal here",
    ),
)
