"""Build (JIT or ahead of time) the CUDA extension of ``csrc/ms_deform_attn``.

One function, :func:`build_extension`, is used by the lazy loader, by
``python -m dino_scale.ops build`` and by the CI compile test. The shared library lands in a
cache directory keyed by torch/CUDA versions, target architectures and a hash of the sources;
an ``fcntl`` lock on that directory makes concurrent processes on a node build it once (the
others wait, then load the finished library). The compile runs in ``<dir>/build`` and the
library is renamed into place when complete, so a killed build leaves no library behind and a
loader never sees a half-written one. A finished library is loaded without a toolkit.

Cache root: ``$DINO_SCALE_EXT_DIR`` if set, else ``~/.cache/dino_scale/ext``.

Sources (:func:`source_dir`): the copy an installed package carries
(``dino_scale/ops/csrc/ms_deform_attn``, put there by setup.py's build_py when a wheel is
built), else ``csrc/ms_deform_attn`` of the source checkout this module sits in (an editable
install). Both hold the same files, so the cache key (:func:`sources_hash`) is the same.
"""
from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import shutil
import struct
import sys
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

import torch

from dino_scale.ops._arch import arch_list_runs_on, arch_targets, default_arch_list, visible_capabilities

EXT_PREFIX = "dino_scale_msda"
# where a wheel's build_py copies csrc/ms_deform_attn (setup.py), and where a checkout has it
PACKAGED_SOURCE_DIR = Path(__file__).resolve().parent / "csrc" / "ms_deform_attn"
CHECKOUT_SOURCE_DIR = Path(__file__).resolve().parents[2] / "csrc" / "ms_deform_attn"
SOURCE_DIR: Optional[Path] = None  # set to use other sources (tests); None: source_dir() looks
_SOURCE_SUFFIXES = (".cpp", ".cu")
_HEADER_SUFFIXES = (".h", ".cuh")  # setup.py ships the same four suffixes
# No -std flag: torch.utils.cpp_extension adds the C++ standard torch itself was built with
# (C++17 for torch 2.11, C++20 for 2.14); the sources are valid in both.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr"]


class BuildError(RuntimeError):
    """The extension could not be built or loaded."""


def _has_sources(directory: Path) -> bool:
    return directory.is_dir() and any(directory.glob("*.cu"))


def source_dir() -> Path:
    """The folder of the extension's sources: :data:`SOURCE_DIR` when set, else the copy inside
    the installed package (:data:`PACKAGED_SOURCE_DIR`, a wheel or ``pip install .``), else the
    source checkout's ``csrc/ms_deform_attn`` (:data:`CHECKOUT_SOURCE_DIR`, an editable install
    or a plain checkout on ``sys.path``). A folder counts when it holds ``.cu`` files. Raises
    :class:`BuildError` naming every place looked in when none does."""
    if SOURCE_DIR is not None:
        return Path(SOURCE_DIR)
    for candidate in (PACKAGED_SOURCE_DIR, CHECKOUT_SOURCE_DIR):
        if _has_sources(candidate):
            return candidate
    raise BuildError(f"CUDA sources of the ms_deform_attn extension not found: looked in "
                     f"{PACKAGED_SOURCE_DIR} (installed package) and {CHECKOUT_SOURCE_DIR} (source "
                     "checkout); reinstall dino-scale from a wheel or source tree that has csrc/")


def source_files() -> list[Path]:
    """The extension's sources and headers (sorted by name) in :func:`source_dir`."""
    src = source_dir()
    if not src.is_dir():
        raise BuildError(f"CUDA sources not found at {src}")
    files = sorted(p for p in src.iterdir() if p.suffix in _SOURCE_SUFFIXES + _HEADER_SUFFIXES)
    if not any(p.suffix == ".cu" for p in files):
        raise BuildError(f"no .cu sources in {src}")
    return files


def find_cuda_home() -> Optional[str]:
    """$CUDA_HOME / $CUDA_PATH, else the toolkit owning ``nvcc`` on PATH (following symlinks and
    one-line wrapper scripts), else /usr/local/cuda, else the newest /usr/local/cuda-*."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(str(Path(real).parents[1]))
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = Path(real).read_text()[:4096] if os.path.getsize(real) < 4096 else ""
            for tok in text.split():
                if tok.endswith("/bin/nvcc") and os.path.isfile(tok):
                    candidates.append(str(Path(tok).parents[1]))
    candidates.append("/usr/local/cuda")
    candidates += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "bin", "nvcc")) and \
                os.path.isfile(os.path.join(c, "include", "cuda_runtime.h")):
            return c
    return None


def extra_system_includes(cuda_home: str) -> list[str]:
    """Header dirs of the pip CUDA wheels (``site-packages/nvidia/cu13/include`` etc.) for the
    headers torch includes but a minimal toolkit lacks (cusparse.h, cublas_v2.h, ...). Added with
    ``-isystem`` so the toolkit's own headers keep precedence."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    major = (torch.version.cuda or "").split(".")[0]
    roots = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *sys.path}
    found: list[str] = []
    for root in sorted(r for r in roots if r and os.path.isdir(os.path.join(r, "nvidia"))):
        nv = os.path.join(root, "nvidia")
        for inc in [os.path.join(nv, f"cu{major}", "include")] + sorted(glob.glob(os.path.join(nv, "*", "include"))):
            if os.path.isfile(os.path.join(inc, "cusparse.h")) or os.path.isfile(os.path.join(inc, "cublas_v2.h")):
                if inc not in found:
                    found.append(inc)
    return found


def sources_hash(arch_list: str) -> str:
    h = hashlib.sha256()
    for p in source_files():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    h.update(" ".join(CXX_FLAGS + NVCC_FLAGS + [arch_list]).encode())
    # the ABI it links against: a --build-dir kept across a torch upgrade is stale (the cache
    # folder's name carries the versions; an explicit folder has only this stamp)
    h.update(f"torch {torch.__version__} cuda {torch.version.cuda}".encode())
    return h.hexdigest()[:12]


def cache_root() -> Path:
    env = os.environ.get("DINO_SCALE_EXT_DIR")
    return Path(env) if env else Path.home() / ".cache" / "dino_scale" / "ext"


def build_dir_for(arch_list: str, root: Optional[Path] = None) -> Path:
    tag = f"torch{torch.__version__.split('+')[0]}-cu{torch.version.cuda or 'none'}"
    arch_tag = arch_list.replace(";", "_").replace(" ", "_").replace("+", "")
    return Path(root or cache_root()) / f"{tag}-sm{arch_tag}-{sources_hash(arch_list)}"


def library_path(build_dir: Path) -> Path:
    return build_dir / f"{EXT_PREFIX}.so"


ARCH_FILE = "arch_list"  # beside the library: the arch list it was built for
STAMP_FILE = "sources_hash"  # beside the library: sources_hash(arch list) of its build


def library_complete(lib: Path) -> bool:
    """Whether ``lib`` is a whole ELF shared object: every loadable segment and the section header
    table (the linker writes it last) lie within the file. A truncated library (a node crash
    before the renamed file reached the disk, an interrupted copy of a cache folder) must never
    reach the dynamic loader: it maps the segments past the end of the file and the process dies
    of SIGBUS, with no exception to fall back on. 64-bit ELF only (32-bit: header present)."""
    try:
        with open(lib, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(64)
            if len(head) < 52 or head[:4] != b"\x7fELF" or head[5] not in (1, 2):
                return False
            if head[4] != 2:
                return True
            if len(head) < 64:  # a 64-bit ELF header is 64 bytes (struct.error read past a shorter one)
                return False
            e = "<" if head[5] == 1 else ">"
            (phoff,) = struct.unpack_from(e + "Q", head, 0x20)
            (shoff,) = struct.unpack_from(e + "Q", head, 0x28)
            phentsize, phnum, shentsize, shnum = struct.unpack_from(e + "HHHH", head, 0x36)
            if shoff + shentsize * shnum > size or phoff + phentsize * phnum > size:
                return False
            if phnum and phentsize != 56:  # an ELF64 program header entry is 56 bytes (a damaged header:
                return False  # a smaller size raised struct.error reading the entries below)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):  # (p_type, p_flags, p_offset, p_vaddr, p_paddr, p_filesz)
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(e + "IIQQQQ", table, i * phentsize)
        if p_type == 1 and p_offset + p_filesz > size:  # PT_LOAD past the end
            return False
    return True


def _up_to_date(build_dir: Path, arch_list: str) -> bool:
    """The library in ``build_dir`` exists and was built from these sources for ``arch_list``
    (its stamp says so; a cache folder is named by that hash, which serves for one built before
    stamps were written). A ``--build-dir`` folder is not named by it: without the stamp, a
    library for another arch list or older sources was taken for the requested build."""
    if not library_complete(library_path(build_dir)):
        return False
    want = sources_hash(arch_list)
    try:
        return (build_dir / STAMP_FILE).read_text().strip() == want
    except OSError:
        return build_dir.name.endswith("-" + want)


def check_runs_on_visible_gpus(lib: Path, arch_list: str) -> None:
    """Raise :class:`BuildError` when the library ``lib`` (built, or about to be built, for
    ``arch_list``; a built one's own list is read beside it) has no code for a visible GPU: its
    kernels would fail at the first call with "no kernel image is available"."""
    try:
        built_for = (lib.parent / ARCH_FILE).read_text().strip() if lib.is_file() else arch_list
    except OSError:
        built_for = arch_list
    missing = sorted(c for c in visible_capabilities() if not arch_list_runs_on(built_for, c))
    if missing:
        need = ";".join(f"{a}.{b}" for a, b in missing)
        where = f"built at {lib}" if lib.is_file() else "not built yet"
        raise BuildError(f"CUDA arch list {built_for!r} has no code for this GPU (compute capability "
                         f"{need}): set TORCH_CUDA_ARCH_LIST to include {need}, or unset it to build "
                         f"for the visible GPUs (ms_deform_attn extension {where})")


def find_library(arch_list: str, root: Optional[Path] = None) -> Path:
    """The library the loader uses: the build for ``arch_list`` when it exists, else a finished
    build of the same torch/CUDA/sources whose arch list has code for every visible GPU (e.g.
    one made by ``python -m dino_scale.ops build --arch "8.0;9.0"`` while this process, without
    TORCH_CUDA_ARCH_LIST, asks for its GPU's "9.0", or for an A10G's "8.6", which sm_80 code
    runs: :func:`arch_list_runs_on`), one with machine code for exactly these GPUs first, else
    the path for ``arch_list`` (missing, or without code for these GPUs:
    :func:`check_runs_on_visible_gpus` tells). A build whose list has an entry this does not
    parse is taken only when asked for by name."""
    lib = library_path(build_dir_for(arch_list, root))
    caps = visible_capabilities()
    if not caps or (library_complete(lib) and all(arch_list_runs_on(arch_list, c) for c in caps)):
        return lib
    tag = lib.parent.name.split("-sm", 1)[0]
    runnable: Optional[Path] = None
    for cand in sorted(Path(root or cache_root()).glob(f"{tag}-sm*")):
        try:
            built_for = (cand / ARCH_FILE).read_text().strip()
        except OSError:
            continue
        entries = built_for.replace(";", " ").split()
        if not entries or not all(arch_targets(e) for e in entries):
            continue
        if build_dir_for(built_for, root) != cand or not library_complete(library_path(cand)):
            continue
        if caps <= arch_targets(built_for):
            return library_path(cand)
        if runnable is None and all(arch_list_runs_on(built_for, c) for c in caps):
            runnable = library_path(cand)
    return runnable or lib


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the build lock of ``directory`` (an fcntl lock: a killed holder frees it). The lock
    file its maker creates is made writable by all (a shared cache folder); one another user
    made (mode 0644) is opened read-only, which locks as well (opened for writing, it refused
    that user's ``build`` of a library already up to date)."""
    path = directory / ".lock"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                os.fchmod(fd, 0o666)  # the umask took the group/other write bits
            except OSError:  # another user's file, opened for writing all the same
                pass
        except OSError:  # another user's lock file (0644), or a read-only file system (EROFS)
            fd = os.open(path, os.O_RDONLY)
    except OSError as exc:  # was the raw error of the fallback: "No such file or directory: .../.lock"
        raise BuildError(f"the build folder {directory} cannot be written ({exc.strerror or exc}): point "
                         f"DINO_SCALE_EXT_DIR (or `build --build-dir`) at a folder this user can write") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _env(updates: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def ops_registered() -> bool:
    """Whether this process has the ``dino_scale`` ops registered (a library of them loaded)."""
    try:
        torch.ops.dino_scale.ms_deform_attn_forward.default  # noqa: B018
        return True
    except (AttributeError, RuntimeError):
        return False


def _compile(build_dir: Path, arch_list: str, verbose: bool) -> Path:
    if ops_registered():
        # cpp_extension.load loads what it links; a second TORCH_LIBRARY(dino_scale) fails in the
        # library's static initializer, which aborts the process (std::terminate, no exception)
        raise BuildError("the dino_scale ops are already loaded in this process and a library cannot be "
                         "registered twice (the process would abort): build in a fresh process, "
                         "`python -m dino_scale.ops build`")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise BuildError("no CUDA toolkit found (nvcc): set CUDA_HOME or put nvcc on PATH")
    if torch.version.cuda is None:
        raise BuildError("this torch build has no CUDA support")
    with _env({"CUDA_HOME": cuda_home}):  # torch resolves CUDA_HOME at import
        import torch.utils.cpp_extension as cpp_ext  # heavy; only when compiling
    incs = extra_system_includes(cuda_home)
    sys_flags = [flag for inc in incs for flag in ("-isystem", inc)]
    cpp_ext.CUDA_HOME = cuda_home  # torch resolves it once at import; pin the one we found
    env = {"CUDA_HOME": cuda_home, "TORCH_CUDA_ARCH_LIST": arch_list,
           "MAX_JOBS": os.environ.get("MAX_JOBS", str(min(4, os.cpu_count() or 1)))}
    files = source_files()
    srcs = [str(p) for p in files if p.suffix in _SOURCE_SUFFIXES]
    stamp = sources_hash(arch_list)  # of the sources as the compile starts
    # ninja works (and the linker writes the library) in a staging folder; the finished library
    # is renamed into place, so library_path never names a half-written file (a build killed
    # mid-link, or a loader that looks while another process links).
    stage = build_dir / "build"
    stage.mkdir(parents=True, exist_ok=True)
    # torch before the FileLock change guards a JIT build with a FileBaton: a 'lock' file whose
    # mere existence makes the next build wait forever once a builder was killed. Every builder
    # of this folder holds the fcntl lock of _locked() (the caller), so a 'lock' here is stale.
    (stage / "lock").unlink(missing_ok=True)
    # the stamp says "the library here is of these sources": it is left as it is until the new
    # library is in place (written after it, below), so a build that fails or is killed leaves
    # the old library under its own stamp
    with _env(env):
        try:
            path = cpp_ext.load(
                name=EXT_PREFIX, sources=srcs, build_directory=str(stage),
                extra_cflags=CXX_FLAGS + sys_flags,
                extra_cuda_cflags=NVCC_FLAGS + sys_flags,
                extra_include_paths=[str(files[0].parent)],
                is_python_module=False, is_standalone=False, verbose=verbose)
        except Exception as exc:  # compiler errors arrive as RuntimeError/CalledProcessError
            raise BuildError(f"building the ms_deform_attn extension failed: {exc}") from exc
    lib = library_path(build_dir)
    if not path or not Path(path).is_file():
        raise BuildError(f"build finished but {path or stage} holds no library")
    (build_dir / ARCH_FILE).write_text(arch_list + "\n")  # for find_library; before the library shows
    with open(path, "rb") as fh:  # on disk before it shows under its name (a crash: no stub)
        os.fsync(fh.fileno())
    os.replace(path, lib)  # atomic on one file system: the library appears complete or not at all
    (build_dir / STAMP_FILE).write_text(stamp + "\n")
    return lib


def build_extension(build_dir: Optional[Path] = None, arch_list: Optional[str] = None,
                    force: bool = False, verbose: bool = False) -> Path:
    """Build the extension (if not already built) and return the path of the shared library.

    ``build_dir`` defaults to the cache directory (see module doc); ``arch_list`` to
    :func:`default_arch_list`. The library is not loaded into this process by this function
    when it already exists; a fresh compile through ``cpp_extension.load`` does load it.
    """
    arch_list = arch_list or default_arch_list()
    build_dir = Path(build_dir) if build_dir else build_dir_for(arch_list)
    if not force and _up_to_date(build_dir, arch_list):  # nothing to do: no lock needed (a read-only cache)
        return library_path(build_dir)
    with _locked(build_dir):
        lib = library_path(build_dir)
        if not force and _up_to_date(build_dir, arch_list):  # built by another process meanwhile
            return lib
        # a forced build compiles again and replaces the library only once the new one is linked:
        # unlinked first, a failed build (no nvcc on this node, a compiler error) left the cache
        # without one, and jobs with DINO_SCALE_MSDA_NO_JIT=1 ran on the PyTorch backend
        return _compile(build_dir, arch_list, verbose)
