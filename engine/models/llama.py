"""Llama-shaped dense families: RMSNorm, SwiGLU, rotate-half RoPE, GQA, no MLP/output biases.

- llama: Llama 2 and 3 (Touvron et al. 2023; Meta Llama 3, 2024), HF `LlamaForCausalLM`, with
  Llama-3 RoPE scaling. Its HF `attention_bias` would also bias o_proj, which megatron's layer
  has no slot for: such checkpoints are refused, not silently truncated.
- mistral: Mistral 7B (Jiang et al. 2023), the Llama layout plus sliding-window attention.
- qwen2: Qwen2 (Yang et al. 2024), the Llama layout with QKV bias always on; small sizes tie
  the output layer to the embedding.
- aquila: BAAI Aquila-style, Llama-like with QKV bias (the AquilaMoE base, arXiv 2408.06567).
- mixtral: Mixtral (Jiang et al. 2024), the Mistral layout with every MLP a mixture of SwiGLU
  experts; top-k, then softmax over the chosen.
- qwen2_moe: Qwen2-MoE (Qwen1.5-MoE), Qwen2 attention with routed experts plus a gated shared
  expert; softmax over all experts, then top-k, renormalized only with norm_topk_prob.
"""

from engine.models.family import Family, HFMoEKeys
from engine.models.weights import LLAMA_DROPPED, llama_weights, mixtral_weights, qwen2_moe_weights

LLAMA = Family(name="llama", hf_architectures=("LlamaForCausalLM",), hf_model_type="llama",
               weights=llama_weights(), dropped=LLAMA_DROPPED, moe_family="mixtral")

MISTRAL = Family(name="mistral", hf_architectures=("MistralForCausalLM",),
                 hf_model_type="mistral", weights=llama_weights(), dropped=LLAMA_DROPPED,
                 moe_family="mixtral")

QWEN2 = Family(name="qwen2", hf_architectures=("Qwen2ForCausalLM",), hf_model_type="qwen2",
               weights=llama_weights(), dropped=LLAMA_DROPPED, qkv_bias=True,
               hf_extra=(("use_sliding_window", False),))

AQUILA = Family(name="aquila", hf_architectures=("AquilaForCausalLM",), hf_model_type="aquila",
                weights=llama_weights(), dropped=LLAMA_DROPPED, qkv_bias=True)

MIXTRAL = Family(name="mixtral", hf_architectures=("MixtralForCausalLM",),
                 hf_model_type="mixtral", weights=mixtral_weights(), dropped=LLAMA_DROPPED,
                 hf_moe=HFMoEKeys(num_experts="num_local_experts",
                                  expert_width="intermediate_size"))

QWEN2_MOE = Family(name="qwen2_moe", hf_architectures=("Qwen2MoeForCausalLM",),
                   hf_model_type="qwen2_moe", weights=qwen2_moe_weights(), dropped=LLAMA_DROPPED,
                   qkv_bias=True, hf_extra=(("use_sliding_window", False),
                                            ("mlp_only_layers", [])),
                   hf_moe=HFMoEKeys(num_experts="num_experts",
                                    expert_width="moe_intermediate_size",
                                    renormalize="norm_topk_prob",
                                    shared_expert_width="shared_expert_intermediate_size",
                                    shared_expert_gate=True, sparse_step="decoder_sparse_step"))
