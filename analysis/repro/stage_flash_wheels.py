"""Stage FlexAttention's FLASH backend (the ``flash`` extra: flash-attn-4 and its CuTe-DSL libraries) for a GPU
machine without network whose command calls carry at most 64 MiB each.

Run here (with network), from the repo root:

    python analysis/repro/stage_flash_wheels.py            # -> .flash/parts/flash_wheels.tar.xz.partNN + SHA256SUMS

It downloads the exact wheels below for CPython 3.12 on x86-64 Linux (``pip download --no-deps``), stores each one
uncompressed (the same files, so the same wheel: its RECORD hashes file contents), tars them and compresses the tar
with xz -9e, which packs the two large shared libraries of nvidia-cutlass-dsl-libs-cu13 far better than the wheel's
zip does, then cuts it into parts of at most ``--part-mib`` MiB (default 40, leaving room beside the working tree in a
call). ``.flash/`` is ignored by git. On the GPU machine, one call per part, each carrying that part and SHA256SUMS:

    python3 analysis/repro/unstage_flash_wheels.py park       # every call but the last: the part waits in /tmp
    python3 analysis/repro/unstage_flash_wheels.py install    # the last: check, join, pip install --target, hook

The set is what flash-attn-4[cu13] 4.0.0b36 needs beside torch and typing_extensions (the GPU image has both),
closed over each wheel's Requires-Dist, minus nvidia-cutlass-dsl-libs-cu12: nvidia-cutlass-dsl lists it always, but
with the cu13 libraries present it is not loaded on a CUDA 13 torch.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

WHEELS = ["flash-attn-4==4.0.0b36", "nvidia-cutlass-dsl==4.8.1", "nvidia-cutlass-dsl-libs-base==4.8.1",
          "nvidia-cutlass-dsl-libs-core==4.8.1", "nvidia-cutlass-dsl-libs-cu13==4.8.1", "cuda-bindings==13.5.0",
          "cuda-pathfinder==1.9.1", "apache-tvm-ffi==0.1.15.post2", "torch-c-dlpack-ext==0.1.5",
          "quack-kernels==0.6.5", "einops==0.8.2", "protobuf==7.36.2"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux_2_34_x86_64"]
ARCHIVE = "flash_wheels.tar.xz"
MIB = 1 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def download(dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", *[a for p in PLATFORMS for a in ("--platform", p)], "-d", str(dest),
           *WHEELS]
    subprocess.run(cmd, check=True)
    wanted = {w.split("==")[0].replace("-", "_").lower(): w.split("==")[1] for w in WHEELS}
    found = {}
    for p in sorted(dest.glob("*.whl")):
        name, version = p.name.split("-")[:2]
        if wanted.get(name.lower()) == version:
            found[name.lower()] = p
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"error: pip download gave no wheel for {missing}")
    return [found[n] for n in sorted(found)]


def stored(wheel: Path) -> bytes:
    """The wheel as a zip of the same entries without compression."""
    out = io.BytesIO()
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr, copy.compress_type = info.external_attr, zipfile.ZIP_STORED
            dst.writestr(copy, src.read(info))
    return out.getvalue()


def pack(wheels: list[Path], archive: Path) -> None:
    tar_path = archive.with_suffix("")  # .tar
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tar:
        for w in wheels:
            data = stored(w)
            info = tarfile.TarInfo(w.name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    archive.unlink(missing_ok=True)
    if shutil.which("xz"):
        subprocess.run(["xz", "-9e", "-T2", "-f", str(tar_path)], check=True)  # -> archive
    else:
        import lzma
        with open(tar_path, "rb") as f, lzma.open(archive, "wb", preset=9 | lzma.PRESET_EXTREME) as out:
            shutil.copyfileobj(f, out, MIB)
        tar_path.unlink()


def split(archive: Path, parts_dir: Path, part_mib: int) -> list[Path]:
    if parts_dir.exists():
        shutil.rmtree(parts_dir)
    parts_dir.mkdir(parents=True)
    parts = []
    with open(archive, "rb") as f:
        while block := f.read(part_mib * MIB):
            parts.append(parts_dir / f"{ARCHIVE}.part{len(parts):02d}")
            parts[-1].write_bytes(block)
    lines = [f"{sha256(p)}  {p.name}" for p in parts] + [f"{sha256(archive)}  {ARCHIVE}"]
    (parts_dir / "SHA256SUMS").write_text("\n".join(lines) + "\n")
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=".flash", help="the folder (ignored by git) for wheels/, the archive and parts/")
    ap.add_argument("--part-mib", type=int, default=40, help="largest part, MiB (default 40)")
    args = ap.parse_args()
    out = Path(args.out)
    wheels = download(out / "wheels")
    print(f"{len(wheels)} wheels, {sum(w.stat().st_size for w in wheels) / MIB:.1f} MiB")
    archive = out / ARCHIVE
    pack(wheels, archive)
    parts = split(archive, out / "parts", args.part_mib)
    print(f"{ARCHIVE}: {archive.stat().st_size / MIB:.1f} MiB in {len(parts)} parts "
          f"({', '.join(f'{p.stat().st_size / MIB:.1f}' for p in parts)} MiB): {len(parts)} GPU calls")
    for i, p in enumerate(parts):
        verb = "install" if i == len(parts) - 1 else "park"
        print(f"  call {i + 1}: carry {p} {out / 'parts' / 'SHA256SUMS'}; "
              f"python3 analysis/repro/unstage_flash_wheels.py {verb}")


if __name__ == "__main__":
    main()
