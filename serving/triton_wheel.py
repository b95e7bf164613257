"""The ``tritonserver`` that ships inside the ``nvidia-pytriton`` wheel: where its binary is, the
Python-backend directory it needs, and the environment to start it in.

The wheel carries ``pytriton/tritonserver/bin/tritonserver`` (Triton 2.51), the Python backend
(``backends/python/libtriton_python.so``) and one ``triton_python_backend_stub`` per Python version
(``python_backend_stubs/3.X/``), but not a ready-to-use backend directory: the stub must sit beside
``libtriton_python.so`` in ``<backend-directory>/python/``. :func:`python_backend_directory` assembles that
tree once per (wheel, Python version) under a cache directory, the way pytriton itself does in its workspace.

How the stub finds its Python environment: the stub embeds ``libpython3.X.so`` and, like any embedded
interpreter without a program name, computes ``sys.prefix`` from the first ``python3`` on ``PATH``. So the
server is started with this interpreter's ``bin/`` first on ``PATH``: a stub then sees this venv's
site-packages, editable installs (``amc``, ``amc_client``) included, and its numpy < 2. ``PYTHONPATH`` is
not how to extend it: the stub's interpreter runs isolated (``sys.flags.ignore_environment == 1``), so no
``PYTHON*`` variable reaches it (``PYTHONDONTWRITEBYTECODE`` neither: importing ``model.py`` writes
``<version>/__pycache__``, which Triton then sees as a changed version; precompile version directories with
``python -m compileall`` before loading them). The wheel's bundled shared libraries (``nvidia_pytriton.libs``) go on
``LD_LIBRARY_PATH`` for both the server and the stubs (:func:`server_environment`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = [
    "EXPECTED_TRITON_VERSION",
    "TritonNotFoundError",
    "find_tritonserver",
    "python_backend_directory",
    "server_environment",
]

# The Triton release the wheel carries; tests check the server reports it.
EXPECTED_TRITON_VERSION = "2.51.0"
# Files of the wheel's ``backends/python`` that the server loads (the stub is added per Python version).
_PYTHON_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")
_STUB = "triton_python_backend_stub"
_DEFAULT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "triton-backends"


class TritonNotFoundError(RuntimeError):
    """The nvidia-pytriton wheel, its tritonserver binary or the stub for this Python is missing."""


def _pytriton_root() -> Path:
    # find_spec, not import: importing pytriton pulls in its whole client stack for nothing.
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonNotFoundError(
            "the nvidia-pytriton wheel is not installed in this Python environment "
            f"({sys.executable}); `pip install nvidia-pytriton==0.7.0` brings tritonserver")
    return Path(next(iter(spec.submodule_search_locations)))


def find_tritonserver() -> Path:
    """Path of the ``tritonserver`` binary inside the nvidia-pytriton wheel."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise TritonNotFoundError(f"no executable tritonserver at {binary}; is nvidia-pytriton fully installed?")
    return binary


def _server_libs() -> Path:
    """The wheel's bundled shared libraries (auditwheel puts them beside the package)."""
    libs = _pytriton_root().parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        raise TritonNotFoundError(f"the nvidia-pytriton wheel has no bundled libraries at {libs}")
    return libs


def _python_tag() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def _wheel_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nvidia-pytriton")
    except PackageNotFoundError:
        return "unknown"


def python_backend_directory(cache_dir: Path | None = None) -> Path:
    """The ``--backend-directory`` for tritonserver: ``<dir>/python/`` with the backend and this Python's stub.

    Built once per (wheel version, Python major.minor) under ``cache_dir`` (default ``.cache/triton-backends``
    in the project, or ``$AMC_TRITON_BACKENDS``) and reused; concurrent builders do not collide because the
    tree is assembled in a temporary directory and renamed into place.
    """
    root = _pytriton_root() / "tritonserver"
    tag = _python_tag()
    stub = root / "python_backend_stubs" / tag / _STUB
    if not stub.is_file():
        have = sorted(p.name for p in (root / "python_backend_stubs").glob("*")) or ["none"]
        raise TritonNotFoundError(
            f"nvidia-pytriton has no Python backend stub for Python {tag} at {stub} (it has: {', '.join(have)})")
    sources = [root / "backends" / "python" / name for name in _PYTHON_BACKEND_FILES]
    missing = [str(p) for p in sources if not p.is_file()]
    if missing:
        raise TritonNotFoundError(f"the nvidia-pytriton wheel lacks the Python backend files {missing}")

    cache = Path(cache_dir or os.environ.get("AMC_TRITON_BACKENDS") or _DEFAULT_CACHE)
    target = cache / f"pytriton-{_wheel_version()}-py{tag}" / "backends"
    if (target / "python" / _STUB).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".backends-", dir=target.parent))
    try:
        (staging / "python").mkdir()
        for source in [*sources, stub]:
            shutil.copy2(source, staging / "python" / source.name)
        try:
            staging.rename(target)
        except OSError:
            # Another process finished the same build first: its tree is identical, keep it.
            if not (target / "python" / _STUB).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def server_environment() -> dict[str, str]:
    """Environment for tritonserver: bundled libs on LD_LIBRARY_PATH, this interpreter's bin/ first on PATH."""
    env = dict(os.environ)
    libs = str(_server_libs())
    env["LD_LIBRARY_PATH"] = f"{libs}:{env['LD_LIBRARY_PATH']}" if env.get("LD_LIBRARY_PATH") else libs
    # sys.prefix/bin of a venv holds its `python3`; the stub derives its sys.path from the first one on PATH.
    env["PATH"] = f"{Path(sys.prefix) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env
