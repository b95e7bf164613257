"""A stand-in for the Python backend's ``triton_python_backend_utils`` (``pb_utils``): the serving steps run in-process,
without a server, in the unit tests (and in ``benchmarks/search_step.py``, last present at commit 448fa56).

Built as the real stub builds it: the wheel's own ``triton_python_backend_utils.py`` (``serialize_byte_tensor``,
``get_input_tensor_by_name``, ``triton_string_to_numpy``, ...), loaded from the installed ``nvidia-pytriton``, with the
classes that the stub's C++ adds to it (``Tensor``, ``InferenceRequest``, ``InferenceResponse``, ``TritonError``,
``Logger``) given here in Python. As in the stub (``pb_tensor.cc``), a ``Tensor`` of a BYTES array (numpy object or
bytes dtype) is serialized when it is made, by the ``serialize_byte_tensor`` that the module named
``triton_python_backend_utils`` holds at that moment: its cost is counted, and a step that replaced it is seen.

    with installed() as pb_utils:                    # sys.modules["triton_python_backend_utils"] while inside
        step = load_step(version_dir / "model.py")     # a step's model.py, imported as a fresh stub imports it
        responses = step.execute([pb_utils.InferenceRequest({"query": ...}, requested_output_names=[...])])
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

MODULE_NAME = "triton_python_backend_utils"
TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1  # the stub's flag for a request's last response
BYTES = 13  # TRITONSERVER_TYPE_BYTES, as numpy_to_triton_type returns it
# numpy dtype -> Triton type, as the stub's C++ maps it (numpy_to_triton_type's table, looked up at C speed here: only
# the stub's Python, serialize_byte_tensor, should cost what it costs in the stub).
_TYPES = {np.dtype(t): i for i, t in enumerate((np.bool_, np.uint8, np.uint16, np.uint32, np.uint64, np.int8, np.int16,
                                                np.int32, np.int64, np.float16, np.float32, np.float64, np.object_),
                                               start=1)}


def utils_path() -> Path:
    """The installed wheel's ``triton_python_backend_utils.py`` (what the stub imports)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nvidia-pytriton is not installed: no triton_python_backend_utils.py to load")
    backends = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "backends"
    return backends / "python" / f"{MODULE_NAME}.py"


def _current() -> ModuleType:
    return sys.modules.get(MODULE_NAME) or _default()


class Tensor:
    """``pb_utils.Tensor(name, array)``: the array as the stub keeps it (C-contiguous; BYTES serialized at once)."""

    def __init__(self, name: str, array: np.ndarray) -> None:
        if not name:
            raise ValueError("Tensor name cannot be an empty string.")
        self._dtype = BYTES if array.dtype.kind == "S" else _TYPES.get(array.dtype)
        if self._dtype is None:
            raise TypeError(f"unsupported numpy type {array.dtype} for tensor {name}")
        self._name = name
        self._array = array if array.flags.c_contiguous else np.ascontiguousarray(array)
        self.serialized = _current().serialize_byte_tensor(self._array) if self._dtype == BYTES else None

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array

    def triton_dtype(self) -> int:
        return self._dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True


class ResponseSender:
    """A request's response sender; :attr:`sent` keeps ``(response, flags)`` in order."""

    def __init__(self) -> None:
        self.sent: list[tuple[Any, int]] = []

    def send(self, response: Any = None, flags: int = 0) -> None:
        if self.sent and self.sent[-1][1] & TRITONSERVER_RESPONSE_COMPLETE_FINAL:
            raise RuntimeError("a response was sent after the final one")
        self.sent.append((response, flags))


class InferenceRequest:
    """A request as a step's ``execute`` gets it: ``inputs`` (name -> array, or Tensors) and the outputs it names."""

    def __init__(self, inputs: Mapping[str, np.ndarray] | Sequence[Tensor],
                 requested_output_names: Sequence[str] = ()) -> None:
        self._inputs = [Tensor(n, a) for n, a in inputs.items()] if isinstance(inputs, Mapping) else list(inputs)
        self._requested = list(requested_output_names)
        self.sender = ResponseSender()

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def requested_output_names(self) -> list[str]:
        return self._requested

    def get_response_sender(self) -> ResponseSender:
        return self.sender


class TritonError:
    UNKNOWN, INTERNAL, NOT_FOUND, INVALID_ARG, UNAVAILABLE, UNSUPPORTED, ALREADY_EXISTS, CANCELLED = range(8)

    def __init__(self, message: str, code: int = 1) -> None:
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code


class InferenceResponse:
    def __init__(self, output_tensors: Sequence[Tensor] | None = None, error: TritonError | None = None) -> None:
        self._tensors, self._error = list(output_tensors or []), error

    def output_tensors(self) -> list[Tensor]:
        return self._tensors

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


class Logger:
    """The stub's logger; each line is kept in :attr:`lines` as (level, message)."""

    lines: list[tuple[str, str]] = []

    @classmethod
    def log_info(cls, message: str) -> None:
        cls.lines.append(("info", message))

    @classmethod
    def log_warn(cls, message: str) -> None:
        cls.lines.append(("warn", message))

    @classmethod
    def log_error(cls, message: str) -> None:
        cls.lines.append(("error", message))

    @classmethod
    def log_verbose(cls, message: str) -> None:
        cls.lines.append(("verbose", message))


def make() -> ModuleType:
    """A fresh ``triton_python_backend_utils``: the wheel's file plus the classes above."""
    spec = importlib.util.spec_from_file_location(MODULE_NAME, utils_path())
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("Tensor", "InferenceRequest", "InferenceResponse", "TritonError", "Logger", "ResponseSender",
                 "TRITONSERVER_RESPONSE_COMPLETE_FINAL"):
        setattr(module, name, globals()[name])
    return module


_DEFAULT: list[ModuleType] = []


def _default() -> ModuleType:
    if not _DEFAULT:
        _DEFAULT.append(make())
    return _DEFAULT[0]


@contextlib.contextmanager
def installed() -> Iterator[ModuleType]:
    """A fresh module as ``triton_python_backend_utils`` in ``sys.modules`` while inside (the one before, after)."""
    module, before = make(), sys.modules.get(MODULE_NAME)
    sys.modules[MODULE_NAME] = module
    try:
        yield module
    finally:
        if before is None:
            sys.modules.pop(MODULE_NAME, None)
        else:
            sys.modules[MODULE_NAME] = before


def load_step(path: Path, name: str | None = None) -> ModuleType:
    """A step's ``model.py`` imported by path under a private name (as the stub imports it), with whatever
    ``triton_python_backend_utils`` is installed now. Registered in ``sys.modules`` (its dataclasses look it up).

    A published version's ``model.py`` (``export.repository.write_step_code``) puts its folder first on ``sys.path``
    and imports the packages vendored there (``amc_steps``, ``amc_contract``), as a stub process of its own would: so
    while it runs, this process's modules of those names are set aside, and afterwards put back (with ``sys.path`` and
    ``sys.dont_write_bytecode``). The step keeps the version's own copies; this process keeps its own."""
    folder = path.parent
    vendored = {p.name for p in folder.iterdir() if (p / "__init__.py").is_file()}

    def theirs(module: str) -> bool:
        return module.partition(".")[0] in vendored

    aside = {m: sys.modules.pop(m) for m in [m for m in sys.modules if theirs(m)]}
    path_before, bytecode_before = list(sys.path), sys.dont_write_bytecode
    name = name or f"_step_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        for m in [m for m in sys.modules if theirs(m)]:
            del sys.modules[m]
        sys.modules.update(aside)
        sys.path[:] = path_before
        sys.dont_write_bytecode = bytecode_before
    return module


def outputs(response: InferenceResponse) -> dict[str, np.ndarray]:
    """A response's tensors by name."""
    return {t.name(): t.as_numpy() for t in response.output_tensors()}


def answer(request: InferenceRequest, returned: Any) -> InferenceResponse:
    """The response a request got: what ``execute`` returned for it, or (returned None) what it sent."""
    if returned is not None:
        return returned
    if not request.sender.sent:
        raise AssertionError("execute returned None for a request that was sent no response")
    return request.sender.sent[-1][0]
