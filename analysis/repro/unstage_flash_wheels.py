"""On the GPU machine (no network): put together the parts that ``stage_flash_wheels.py`` made and install
FlexAttention's FLASH backend from them. Standard library and pip only. Run from the repo root, one call per part, each call carrying
its part and ``.flash/parts/SHA256SUMS``:

    python3 analysis/repro/unstage_flash_wheels.py park       # copy the parts carried now to /tmp, where they stay
    python3 analysis/repro/unstage_flash_wheels.py install    # park, then: every part there? join, check, install

``install`` checks each part and the joined archive against SHA256SUMS, unpacks the wheels, runs
``pip install --no-index --no-deps --target SITE`` (default /tmp/flash_site; the image's torch is not touched), and
writes a one-line ``.pth`` hook into the interpreter's site-packages that calls ``site.addsitedir(SITE)``: the
CuTe-DSL package ships a ``.pth`` file of its own, which only a site directory processes (PYTHONPATH does not). Then it
imports ``flash_attn.cute`` in a fresh interpreter and prints its version. Parts outlive calls only while the machine
stays warm: a fresh machine needs every part again.
"""

from __future__ import annotations

import argparse
import lzma
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stage_flash_wheels import ARCHIVE, MIB, sha256  # noqa: E402  (its imports are the standard library's)

HOOK = "flexgen_flash_site.pth"


def sums(folder: Path) -> dict[str, str]:
    path = folder / "SHA256SUMS"
    if not path.exists():
        raise SystemExit(f"error: {path} is missing (carry .flash/parts/SHA256SUMS with the part)")
    return {name: digest for digest, name in (line.split() for line in path.read_text().splitlines() if line)}


def park(parts: Path, parked: Path) -> dict[str, str]:
    parked.mkdir(parents=True, exist_ok=True)
    if (parts / "SHA256SUMS").exists():
        shutil.copy2(parts / "SHA256SUMS", parked / "SHA256SUMS")
    want = sums(parked)
    for p in sorted(parts.glob(f"{ARCHIVE}.part*")):
        if want.get(p.name) != sha256(p):
            raise SystemExit(f"error: {p} does not match SHA256SUMS (a different staging?)")
        shutil.copy2(p, parked / p.name)
    names = sorted(n for n in want if n != ARCHIVE)
    have = [n for n in names if (parked / n).exists() and sha256(parked / n) == want[n]]
    print(f"parked in {parked}: {len(have)} of {len(names)} parts ({', '.join(have) or 'none'})")
    return want


def install(parked: Path, want: dict[str, str], site: Path) -> None:
    names = sorted(n for n in want if n != ARCHIVE)
    missing = [n for n in names if not (parked / n).exists() or sha256(parked / n) != want[n]]
    if missing:
        raise SystemExit(f"error: parts not parked yet: {missing} (run 'park' in a call that carries each; the "
                         "machine must stay warm between the calls)")
    archive = parked / ARCHIVE
    with open(archive, "wb") as out:
        for n in names:
            with open(parked / n, "rb") as f:
                shutil.copyfileobj(f, out, MIB)
    if sha256(archive) != want[ARCHIVE]:
        raise SystemExit(f"error: the joined {archive} does not match SHA256SUMS")
    wheels = parked / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}  # Python >= 3.12 and recent 3.8-3.11
    with lzma.open(archive) as xz, tarfile.open(fileobj=xz, mode="r|") as tar:
        tar.extractall(wheels, **safe)
    archive.unlink()
    files = sorted(str(w) for w in wheels.glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(site), *files], check=True)
    line = f"import site; site.addsitedir({str(site)!r})\n"
    for folder in (sysconfig.get_paths()["purelib"], __import__("site").getusersitepackages()):
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            (Path(folder) / HOOK).write_text(line)
            break
        except OSError as e:
            print(f"cannot write the hook into {folder}: {e}")
    else:
        raise SystemExit(f"error: no site-packages folder takes {HOOK}; call site.addsitedir({str(site)!r}) "
                         "yourself before importing flash_attn")
    check = ("import importlib.metadata as m, torch, flash_attn.cute, cutlass.cute; "
             "print(f'flash_attn.cute {m.version(\"flash-attn-4\")}, cutlass-dsl {m.version(\"nvidia-cutlass-dsl\")}, "
             "torch {torch.__version__}')")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    print(f"installed {len(files)} wheels into {site} (hook {Path(folder) / HOOK}): "
          f"{done.stdout.strip() or done.stderr.strip().splitlines()[-1:]}")
    if done.returncode:
        raise SystemExit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("park", "install"))
    ap.add_argument("--parts", default=".flash/parts", help="where this call's part arrives (default .flash/parts)")
    ap.add_argument("--park", default="/tmp/flash_parts", help="where parts wait between calls (default "
                                                              "/tmp/flash_parts)")
    ap.add_argument("--site", default="/tmp/flash_site", help="pip's --target (default /tmp/flash_site)")
    args = ap.parse_args()
    want = park(Path(args.parts), Path(args.park))
    if args.action == "install":
        install(Path(args.park), want, Path(args.site))


if __name__ == "__main__":
    main()
