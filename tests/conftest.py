"""Fixtures shared by the integration and distributed tests: real text, a real tokenizer, a tiny
Llama recipe, and a torchrun launcher with a timeout."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Python stdlib sources as a corpus (real text on every machine): a 512-piece sentencepiece
    BPE and megatron .bin/.idx for train and valid."""
    from engine.data.corpus import build_stdlib_corpus
    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer, train_sentencepiece

    out = tmp_path_factory.mktemp("tiny_data")
    build_stdlib_corpus(out, max_bytes=600_000)
    model = train_sentencepiece([str(out / "code-train.jsonl")], str(out / "tok"), 512)
    tok = load_tokenizer("sentencepiece", model)
    for split in ("train", "valid"):
        preprocess(
            [str(out / f"code-{split}.jsonl")], str(out / f"code-{split}"), tok, progress=False
        )
    return {
        "dir": out,
        "tokenizer": model,
        "train": str(out / "code-train"),
        "valid": str(out / "code-valid"),
    }


def tiny_recipe(tiny_data, **sections) -> dict:
    """A 4-layer GQA Llama on the stdlib corpus; `sections` replace or extend recipe sections."""
    recipe = {
        "model": {
            "num_layers": 4,
            "hidden_size": 64,
            "ffn_hidden_size": 128,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "max_position_embeddings": 64,
        },
        "parallel": {},
        "data": {
            "blend": [{"path": tiny_data["train"], "weight": 1.0}],
            "valid": {"code": tiny_data["valid"]},
            "seq_length": 32,
        },
        "tokenizer": {"type": "sentencepiece", "path": tiny_data["tokenizer"]},
        "train": {
            "steps": 3,
            "micro_batch_size": 2,
            "global_batch_size": 8,
            "seed": 7,
            "schedule": {"style": "cosine", "warmup_steps": 1, "min_lr": 1e-4},
        },
        "optim": {"lr": 3e-3},
        "logging": {"log_interval": 1},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    return recipe


@pytest.fixture(scope="session")
def make_recipe(tiny_data):
    return lambda **sections: tiny_recipe(tiny_data, **sections)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def torchrun():
    """`torchrun(nproc, script, *args, timeout=...)`: run a script under torchrun (gloo, one thread
    per process); raises with the output tail if it fails or times out."""

    def run(nproc: int, script: Path, *args: str, timeout: int = 600) -> str:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(_free_port()),
            str(script),
            *args,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                start_new_session=True,
            )
        except subprocess.TimeoutExpired as e:
            raise AssertionError(
                f"torchrun timed out after {timeout}s:\n{(e.stdout or '')[-3000:]}"
                f"\n{(e.stderr or '')[-3000:]}"
            ) from None
        if proc.returncode != 0:
            raise AssertionError(
                f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-5000:]}"
            )
        return proc.stdout

    return run


def read_json(path) -> dict:
    return json.loads(Path(path).read_text())


# --- tiny random-init transformers models of every dense family, saved as HF directories -------

def _hf_families():
    import transformers

    common = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512)
    return {
        # Llama 2: multi-head attention
        "llama2": (transformers.LlamaForCausalLM,
                   transformers.LlamaConfig(vocab_size=1000, num_key_value_heads=4, **common)),
        # Llama 3: GQA, rope theta 500k with llama3 scaling, head_dim != hidden/heads
        "llama3": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
            vocab_size=1024, num_key_value_heads=2, head_dim=32, rope_theta=500000.0,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            **{**common, "max_position_embeddings": 16384})),
        # Mistral: GQA and a sliding window shorter than the 256-token test batch
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(
            vocab_size=1000, num_key_value_heads=2, sliding_window=64, head_dim=16, **common)),
        # Qwen2: QKV bias, tied embeddings, an odd vocabulary (padded at tp=2)
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            vocab_size=1001, num_key_value_heads=2, tie_word_embeddings=True, **common)),
        # Mixtral: 4 experts, top-2, renormalized
        "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig(
            vocab_size=1000, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=None, **common)),
        # Qwen2-MoE: softmax over all experts then top-2 (no renormalization), a gated shared
        # expert, fine-grained experts narrower than the shared one
        "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
            vocab_size=1000, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
            moe_intermediate_size=48, shared_expert_intermediate_size=96, norm_topk_prob=False,
            **common)),
    }


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """{name: (directory, model)}: tiny random-init HF models in fp32, plus "aquila": a Qwen2
    model relabeled AquilaForCausalLM (Llama-like with QKV bias; transformers has no class)."""
    import torch

    out = tmp_path_factory.mktemp("hf")
    models = {}
    for i, (name, (cls, config)) in enumerate(_hf_families().items()):
        torch.manual_seed(100 + i)
        model = cls(config).eval()
        with torch.no_grad():  # norms start at 1.0: randomize them, a swapped norm must show
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(out / name)
        models[name] = (out / name, model)
    aquila = out / "aquila"
    import shutil

    shutil.copytree(out / "qwen2", aquila)
    config = json.loads((aquila / "config.json").read_text())
    config.update(architectures=["AquilaForCausalLM"], model_type="aquila",
                  tie_word_embeddings=False)
    qwen_dir, qwen = models["qwen2"]
    (aquila / "config.json").write_text(json.dumps(config))
    # untied: add lm_head as its own tensor
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(aquila / "model.safetensors"))
    tensors["lm_head.weight"] = qwen.lm_head.weight.detach().clone()
    save_file(tensors, str(aquila / "model.safetensors"), metadata={"format": "pt"})
    models["aquila"] = (aquila, qwen)
    return models


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory):
    """{name: engine checkpoint}: each HF model imported with `engine convert hf-to-engine`
    (the odd 1001-token vocabularies at --tp 2, so they are padded to split in two)."""
    from engine.convert.importer import hf_to_engine

    out = tmp_path_factory.mktemp("engine")
    return {name: hf_to_engine(d, out / name, tp=2 if name in ("qwen2", "aquila") else 1,
                               progress=False)
            for name, (d, _) in hf_models.items()}


# --- an HF-format tokenizer (tokenizer.json) for the evaluation oracle ------------------------

def train_bpe_tokenizer(jsonl: Path, out: Path, vocab_size: int = 512) -> Path:
    """A byte-level BPE `tokenizer.json` (+ tokenizer_config.json naming <|endoftext|> as EOS and
    BOS) trained with the `tokenizers` library: what transformers' AutoTokenizer and the engine's
    `--tokenizer-type hf` both read, with the same ids."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((json.loads(line)["text"] for line in open(jsonl)), trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
        "bos_token": "<|endoftext|>"}))
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer():
    """`train_bpe_tokenizer(jsonl, out, vocab_size)`."""
    return train_bpe_tokenizer


@pytest.fixture(scope="session")
def hf_tiny_data(tiny_data):
    """The stdlib corpus with a 512-token HF tokenizer: .bin/.idx for train and valid, and three
    lm-eval tasks on the held-out modules in tasks/: next-line multiple choice (loglikelihood),
    rolling perplexity (loglikelihood_rolling) and line completion (generate_until)."""
    import yaml

    from engine.data.preprocess import preprocess
    from engine.data.tokenizer import load_tokenizer
    from engine.eval.tasks import NextLineSpec, next_line_docs, write_task

    base = tiny_data["dir"]
    out = base / "hf"
    tok_dir = train_bpe_tokenizer(base / "code-train.jsonl", out / "tokenizer")
    tok = load_tokenizer("hf", tok_dir)
    for split in ("train", "valid"):
        preprocess([str(base / f"code-{split}.jsonl")], str(out / f"code-{split}"), tok,
                   progress=False)
    texts = [json.loads(line)["text"] for line in open(base / "code-valid.jsonl")]
    tasks = out / "tasks"
    spec = NextLineSpec(samples=24, seed=1)
    write_task("tiny_next_line", tasks, next_line_docs(texts, spec), spec, source="code-valid")
    snippets = [t[:300] for t in texts[:6]]
    (tasks / "snippets.jsonl").write_text("".join(json.dumps({"text": s}) + "\n"
                                                  for s in snippets))
    (tasks / "tiny_rolling.yaml").write_text(yaml.safe_dump({
        "task": "tiny_rolling", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "snippets.jsonl"}}, "test_split": "test",
        "output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
        "metric_list": [{"metric": "word_perplexity"}, {"metric": "bits_per_byte"}]}))
    lines = [{"context": d["context"], "target": d["choices"][d["label"]]}
             for d in next_line_docs(texts, NextLineSpec(samples=6, seed=2))]
    (tasks / "complete.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (tasks / "tiny_complete.yaml").write_text(yaml.safe_dump({
        "task": "tiny_complete", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": "complete.jsonl"}}, "test_split": "test",
        "output_type": "generate_until", "doc_to_text": "{{context}}\n",
        "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["\n"], "max_gen_toks": 8, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}]}))
    return {"dir": out, "tokenizer": str(tok_dir), "train": str(out / "code-train"),
            "valid": str(out / "code-valid"), "tasks": str(tasks)}


@pytest.fixture(scope="session")
def hf_recipe(make_recipe, hf_tiny_data):
    """`hf_recipe(save_dir, **model_keys)`: the tiny recipe on the HF-tokenized corpus, 4 steps."""
    def build(save, **model):
        r = make_recipe(tokenizer={"type": "hf", "path": hf_tiny_data["tokenizer"]},
                        data={"blend": [{"path": hf_tiny_data["train"], "weight": 1.0}],
                              "valid": {"code": hf_tiny_data["valid"]}},
                        train={"steps": 4}, checkpoint={"save": str(save)})
        r["model"].update(max_position_embeddings=512, **model)
        return r

    return build


@pytest.fixture(scope="session")
def eval_models(hf_recipe, tmp_path_factory):
    """{kind: (checkpoint, exported HF directory)}: a dense Llama and a 4-expert Mixtral trained
    4 steps on the HF-tokenized corpus, exported in fp32."""
    from engine.config.loader import recipe_from_dict
    from engine.convert.exporter import engine_to_hf
    from engine.train.loop import train

    tmp = tmp_path_factory.mktemp("eval_models")
    out = {}
    for kind, model in (("dense", {}), ("moe", {"family": "mixtral",
                                                "moe": {"num_experts": 4, "topk": 2}})):
        result = train(recipe_from_dict(hf_recipe(tmp / kind, **model)))
        hf = engine_to_hf(result.checkpoint, tmp / f"{kind}-hf", dtype="fp32",
                          progress=False).path
        out[kind] = (result.checkpoint, hf)
    return out


@pytest.fixture(scope="session")
def short_docs(tiny_data):
    """Packed short documents for document masking: the held-out stdlib text cut into pieces of
    1-4 lines (each its own document, ending in eod), preprocessed with the tiny tokenizer; a
    32-token sample then mostly holds two or more documents. {"prefix", "tokenizer"}."""
    import random

    from engine.data.preprocess import preprocess

    rng = random.Random(0)
    docs = []
    for line in (tiny_data["dir"] / "code-valid.jsonl").read_text().splitlines():
        lines = [x for x in json.loads(line)["text"].split("\n") if x.strip()]
        while lines and len(docs) < 400:
            n = rng.randint(1, 4)
            docs.append("\n".join(lines[:n]))
            lines = lines[n:]
    out = tiny_data["dir"] / "short-docs"
    out.mkdir(exist_ok=True)
    (out / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([str(out / "docs.jsonl")], str(out / "docs"), ("sentencepiece",
               tiny_data["tokenizer"]), progress=False)
    return {"prefix": str(out / "docs"), "tokenizer": tiny_data["tokenizer"]}
