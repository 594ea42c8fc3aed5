"""The Llama family: RMSNorm, SwiGLU, RoPE, GQA, no linear biases (Llama 2/3).

QKV bias (Qwen2, Aquila-style) and tied embeddings are recipe keys on top of this family.
Reference: Touvron et al. 2023 (Llama 2), Meta Llama 3 (2024); HF `LlamaForCausalLM`.
"""

from engine.models.family import Family

LLAMA = Family(name="llama", hf_architectures=("LlamaForCausalLM",))
