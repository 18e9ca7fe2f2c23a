"""Build llama.cpp's own `llama-server` once, from the llama-cpp-python sdist, into `.cache/`.

We take llama.cpp from the llama-cpp-python sdist (it vendors a pinned llama.cpp under
`vendor/llama.cpp`) because the sandbox can reach package registries but not GitHub. The
binary is cached, so only the first benchmark run pays the ~5-6 minute build.

    .venv/bin/python bench/llama_server.py        # build (or report the cached binary)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache"
SRC = CACHE / "llama.cpp"  # the extracted vendor/llama.cpp tree
BUILD = SRC / "build"
BINARY = BUILD / "bin" / "llama-server"
VERSION_FILE = SRC / "SOURCE_VERSION"  # which llama-cpp-python sdist the tree came from

CMAKE_FLAGS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON",  # the benchmark runs on the machine that built it: use every SIMD extension
    # Only the server: tests/examples/tools roughly triple the build time, curl is not installed.
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_CURL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",  # a self-contained binary that survives moving the cache
]


class BuildError(RuntimeError):
    """llama-server could not be built; the message says which step failed."""


def _log(msg: str) -> None:
    print(f"[llama-server] {msg}", file=sys.stderr, flush=True)


def _download_sdist() -> Path:
    """The newest llama-cpp-python sdist pip can find, downloaded into .cache/ (reused if present)."""
    found = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if found:
        return found[-1]
    _log("downloading the llama-cpp-python sdist (vendors llama.cpp)...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "-d",
        str(CACHE),
        "llama-cpp-python",
    ]
    if subprocess.run(cmd).returncode != 0:
        raise BuildError("pip download of llama-cpp-python failed (is the package registry reachable?)")
    found = sorted(CACHE.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise BuildError("pip download succeeded but no llama_cpp_python-*.tar.gz in .cache/")
    return found[-1]


def _extract(sdist: Path) -> None:
    """Copy only vendor/llama.cpp out of the sdist into .cache/llama.cpp."""
    top = sdist.name.removesuffix(".tar.gz")
    prefix = f"{top}/vendor/llama.cpp/"
    tmp = CACHE / "llama.cpp.extracting"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist.name} has no vendor/llama.cpp")
        tar.extractall(tmp, members=members, filter="data")
    shutil.rmtree(SRC, ignore_errors=True)
    (tmp / prefix).rename(SRC)
    shutil.rmtree(tmp, ignore_errors=True)
    VERSION_FILE.write_text(top.removeprefix("llama_cpp_python-") + "\n")


def source_version() -> str | None:
    """The llama-cpp-python version whose vendored llama.cpp was built, if known."""
    return VERSION_FILE.read_text().strip() if VERSION_FILE.exists() else None


def ensure_llama_server(jobs: int = 2) -> Path:
    """Path to a built llama-server, building it first if needed. Raises BuildError on failure."""
    if BINARY.exists():
        return BINARY
    if shutil.which("cmake") is None:
        raise BuildError("cmake is not installed (apt-get install cmake build-essential)")
    CACHE.mkdir(exist_ok=True)
    sdist = _download_sdist()
    if not (SRC / "CMakeLists.txt").exists():
        _log(f"extracting vendor/llama.cpp from {sdist.name}")
        _extract(sdist)
    started = time.monotonic()
    _log(f"building llama-server from {sdist.name} with -j{jobs} (takes ~5-6 min on 2 cores)")
    steps = [
        ["cmake", "-S", str(SRC), "-B", str(BUILD), *CMAKE_FLAGS],
        ["cmake", "--build", str(BUILD), "--target", "llama-server", f"-j{jobs}"],
    ]
    for cmd in steps:
        if subprocess.run(cmd).returncode != 0:
            raise BuildError(f"llama-server build failed at: {' '.join(cmd)}")
    if not BINARY.exists():
        raise BuildError(f"build finished but {BINARY} is missing")
    _log(f"built {BINARY} in {time.monotonic() - started:.0f}s")
    return BINARY


if __name__ == "__main__":
    try:
        print(ensure_llama_server())
    except BuildError as err:
        _log(f"ERROR: {err}")
        sys.exit(1)
