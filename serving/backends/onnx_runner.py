"""Triton Python-backend model that runs one exported AMC network (QEN, VAN, LAN or MTN) with onnxruntime.

A ``python``-flavour network's version folder holds ``model.onnx`` and this package (its ``model.py`` imports
:class:`TritonPythonModel` from here: ``export.repository.write_step_code``). Everything model-specific comes from the
model's ``config.pbtxt``:

- input and output names and dtypes: ``input`` / ``output`` (generated from ``amc_contract.signatures``);
- ``parameters``: ``onnx_file`` (default ``model.onnx``), ``intra_op_num_threads`` (default: onnxruntime's, or
  the CPUs this process may run on where that is fewer than the machine's), ``allow_spinning`` (``0`` (default)
  or ``1``: whether onnxruntime's idle threads spin; see :func:`session_options`),
  ``nice`` (default ``0``: added to the niceness of the stub's main thread before its session starts, so
  onnxruntime's pool threads have it too; see :func:`lower_cpu_priority`), ``execution_provider`` (``auto``
  (default): CUDA when onnxruntime offers it, else CPU; or ``cpu``/``cuda``),
  ``use_tf32`` (``0`` (default) or ``1``: the CUDA provider's ``use_tf32`` option; with 0 its float32 MatMuls
  stay float32, as on the CPU path; onnxruntime's own default is TF32 on, about 1e-3 relative off fp32),
  ``cuda_graph`` (``0`` (default) or ``1``: the CUDA provider's ``enable_cuda_graph``; only the search step sets it,
  which runs its session through :class:`BoundSession`).

Batching: with ``dynamic_batching`` Triton may hand :meth:`execute` several requests at once. Requests whose
inputs agree on every non-batch dim are concatenated along the batch axis and run in one session call; the
outputs are split back. A request that fails validation, or a group whose run fails, gets an error response
``"<model>: <reason>"``: INVALID_ARGUMENT for a bad input, INTERNAL otherwise (a failed group is retried one
request at a time so only the bad request fails); the instance itself never raises out of :meth:`execute`. The step
only moves tensors between ``pb_utils`` and numpy: the checks and the batching are ``network.py``'s functions.

Also here, for every step of the package: the config parameters as strings (:func:`config_parameters`,
:func:`config_mode`), the onnxruntime providers and session options they choose (:func:`execution_providers`,
:func:`session_options`, :func:`lower_cpu_priority`), :class:`BoundSession` (the search step's device-resident I/O)
and the error responses (:func:`error_response`, :func:`coded_response`).

Overload: with config parameter ``admission`` (the generator sets it on VAN, the one network that can refuse a
request the text step admitted: NaN regions, regions and mask for different candidates), every error response
frees one slot of that in-flight counter (``admission.py``), since the request goes no further than here and the
top-k step that would free it never sees it.

Like every module of this package it must import in the stub without the project installed: numpy, onnxruntime,
``triton_python_backend_utils``, its siblings and ``amc_contract`` (both vendored beside the version's model.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from amc_contract import RequestError

from . import network
from .admission import InFlight, counter_path

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # imported outside Triton (tests): session_options only
    pb_utils = None


def config_parameters(config: dict[str, Any]) -> dict[str, str]:
    """A step's config parameters (``parameters`` of the config Triton hands ``initialize``) by key: each one's
    ``string_value``, "" where it has none."""
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def config_mode(params: dict[str, str], modes: tuple[str, ...], model_name: str) -> str:
    """The config parameter ``mode`` of a step that serves several models (``text_step.py``, ``top_k.py``): one of
    ``modes``, else ValueError naming them."""
    mode = params.get("mode", "")
    if mode not in modes:
        raise ValueError(f"{model_name}: config parameter mode must be one of {modes}, got {mode!r}")
    return mode


def session_options(params: dict[str, str], model_name: str) -> Any:
    """onnxruntime session options from the config parameters ``intra_op_num_threads`` and ``allow_spinning``.

    Why not onnxruntime's defaults: a served version is 6+ stub processes on one machine, each with its own
    thread pool. onnxruntime lets idle pool threads spin for a while after every call, so that the steps of one
    request burn each other's CPU while they wait: with spinning off, the 2-core machine (its 64 overload clients on
    the same cores) answered 970 / 863 requests in 30 s instead of 386 / 465, and a lone 20-candidate request took
    47 / 39 ms instead of 87 / 79 (100 candidates: 203 / 213 instead of 300 / 277; ``reports/overload_runs.json``).
    And a server pinned to fewer CPUs than the machine has (taskset, a cpuset) gets pools of that size, where
    onnxruntime would size them by the machine's cores; unpinned, onnxruntime's own default stays.
    Also used by the text and search steps (``text_step.py``, ``search_graph.SearchGraph``).
    """
    import os

    import onnxruntime as ort

    options = ort.SessionOptions()
    threads = params.get("intra_op_num_threads") or ""
    allowed = len(os.sched_getaffinity(0))
    if threads.strip():
        options.intra_op_num_threads = int(threads)
    elif allowed < (os.cpu_count() or allowed):
        options.intra_op_num_threads = allowed
    spinning = (params.get("allow_spinning") or "0").strip()
    if spinning not in ("0", "1"):
        raise ValueError(f"{model_name}: allow_spinning must be 0 or 1, not {spinning!r}")
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    return options


def lower_cpu_priority(params: dict[str, str], model_name: str) -> int:
    """Add the config parameter ``nice`` (0 to 19) to the calling thread's niceness (the stub's main thread, which
    runs execute() and starts onnxruntime's pool threads); returns the niceness now. The stub's other threads
    (its messages with the server) keep theirs.

    Why: on a CPU server the networks' onnxruntime work and Triton's gRPC front end share the cores. Under
    overload the front end must still take in every request (5 MB of regions at 20 candidates) before the text
    step can refuse it; with the networks at equal priority that intake queues behind their compute, and so do the
    refusals. Niced networks yield the CPU to the front end and the text step whenever those have work, and take
    all of it otherwise. Called before the session is made, so onnxruntime's pool threads inherit it (on Linux
    niceness is per thread, inherited by the threads a thread starts)."""
    import os

    text = (params.get("nice") or "0").strip()
    try:
        nice = int(text)
    except ValueError:
        nice = -1
    if not 0 <= nice <= 19:
        raise ValueError(f"{model_name}: nice must be an integer from 0 to 19, not {text!r}")
    return os.nice(nice)


def execution_providers(params: dict[str, str], args: dict[str, str], model_name: str) -> list[Any]:
    """onnxruntime providers from the config parameters ``execution_provider`` and ``use_tf32`` (see above).

    Also used by the text and search steps (``text_step.py``, ``search_graph.SearchGraph``).
    """
    import onnxruntime as ort

    choice = (params.get("execution_provider") or "auto").lower()
    available = ort.get_available_providers()
    if choice not in ("auto", "cpu", "cuda"):
        raise ValueError(f"{model_name}: execution_provider must be auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and "CUDAExecutionProvider" not in available:
        raise RuntimeError(f"{model_name}: execution_provider 'cuda' asked for, but onnxruntime offers "
                           f"only {available} (is onnxruntime-gpu installed?)")
    if choice != "cpu" and "CUDAExecutionProvider" in available:
        # A KIND_GPU instance names its device; a KIND_CPU instance (the python flavour) uses device 0.
        device = int(args.get("model_instance_device_id") or 0) if args.get("model_instance_kind") == "GPU" else 0
        tf32 = (params.get("use_tf32") or "0").strip()
        if tf32 not in ("0", "1"):
            raise ValueError(f"{model_name}: use_tf32 must be 0 or 1, not {tf32!r}")
        options = {"device_id": device, "use_tf32": tf32}
        if (params.get("cuda_graph") or "0").strip() == "1":  # only a BoundSession can run such a session
            options["enable_cuda_graph"] = "1"
        return [("CUDAExecutionProvider", options), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


# Batch sizes a BoundSession pads a call's queries up to (at most 1.5x the work): a few shapes, so a few bound buffer
# sets and CUDA graphs serve every batch the dynamic batcher forms.
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


# onnxruntime's element types -> numpy dtypes, for output buffers made before a run.
_NUMPY_TYPES = {ort_type: dtype for dtype, ort_type in network.ORT_TYPES.items()}


def bucket(n: int) -> int:
    """The smallest of :data:`BATCH_BUCKETS` that holds ``n`` queries (``n`` itself above the largest)."""
    return next((b for b in BATCH_BUCKETS if b >= n), n)


class BoundSession:
    """``session`` run through onnxruntime's IOBinding, its inputs and outputs in buffers on the session's device
    that are allocated once per set of input shapes (a "bucket") and bound once; with ``cuda_graph`` (the session was
    made with the CUDA provider's ``enable_cuda_graph``) each bucket's run is also captured as a CUDA graph (run
    option ``gpu_graph_id``) and replayed.

    Why: ``session.run`` with host arrays allocates every output and copies every input and output per call, and
    launches each of the graph's kernels from the calling thread; here a call copies the inputs into the bound
    buffers (``OrtValue.update_inplace``), runs, and copies the outputs back once, and with a graph the launches are
    one replay. The same code runs on the CPU provider (device ``cpu``), so the CPU tests cover it.

    ``host_inputs``: inputs bound in host memory whatever the device, and part of a bucket's key by value: the
    search graph's ``search_k``, which ONNX TopK reads on the host (bound on the GPU, onnxruntime would copy it back
    inside the graph, and a graph with a copy cannot be captured). ``max_graphs``: buckets captured at most; calls of
    further shapes run uncaptured (``gpu_graph_id`` -1), since a captured graph keeps its memory for good.
    """

    def __init__(self, session: Any, *, device: str = "cpu", device_id: int = 0, host_inputs: tuple[str, ...] = (),
                 cuda_graph: bool = False, max_graphs: int = 64) -> None:
        self.session, self.device, self.device_id = session, device, device_id
        self.host_inputs, self.cuda_graph, self.max_graphs = set(host_inputs), cuda_graph, max_graphs
        self.output_names = [o.name for o in session.get_outputs()]
        self.buckets: dict[tuple, tuple[Any, dict[str, Any], list[Any], Any]] = {}
        self.graphs = 0
        self.graph_error = ""  # why capturing stopped, where a capture failed

    def _key(self, feeds: dict[str, np.ndarray]) -> tuple:
        return tuple((n, a.shape, a.tobytes() if n in self.host_inputs else b"") for n, a in feeds.items())

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One call: ``feeds`` (host arrays) -> every output as a host array of its own (not a view of a buffer
        the next call overwrites)."""
        import onnxruntime as ort

        key = self._key(feeds)
        found = self.buckets.get(key)
        if found is not None:
            io, inputs, outputs, options = found
            for name, value in inputs.items():
                value.update_inplace(np.ascontiguousarray(feeds[name]))  # into the bound buffer, same address
            self.session.run_with_iobinding(io, options)
        else:
            io = self.session.io_binding()
            inputs = {}
            for name, array in feeds.items():
                where = "cpu" if name in self.host_inputs else self.device
                inputs[name] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), where, self.device_id)
                io.bind_ortvalue_input(name, inputs[name])
            options = self._options(capture=True)
            # Outputs of a fixed shape get their device buffers now: a CUDA graph is captured on this first call, and
            # onnxruntime allocating (and shaping) an output inside the capture is what it cannot record. Other
            # outputs are left to onnxruntime on the first call; either way the buffers then stay bound, so later
            # calls (and a captured graph) write into the same addresses.
            for out in self.session.get_outputs():
                shape = out.shape
                if self.cuda_graph and all(isinstance(d, int) and d > 0 for d in shape):
                    value = ort.OrtValue.ortvalue_from_shape_and_type(
                        shape, _NUMPY_TYPES[out.type], self.device, self.device_id)
                    io.bind_ortvalue_output(out.name, value)
                else:
                    io.bind_output(out.name, self.device, self.device_id)
            try:
                self.session.run_with_iobinding(io, options)
            except Exception as e:  # a capture onnxruntime could not make: this shape and later ones run uncaptured
                if not self.cuda_graph or self.graph_error:
                    raise
                self.graph_error, self.max_graphs = f"{type(e).__name__}: {str(e)[:300]}", 0
                options = self._options(capture=True)
                self.session.run_with_iobinding(io, options)
            outputs = io.get_outputs()
            io.clear_binding_outputs()
            for name, value in zip(self.output_names, outputs, strict=True):
                io.bind_ortvalue_output(name, value)
            self.buckets[key] = (io, inputs, outputs, options)
        return {name: np.array(value.numpy()) for name, value in zip(self.output_names, outputs, strict=True)}

    def _options(self, capture: bool) -> Any:
        import onnxruntime as ort

        options = ort.RunOptions()
        if self.cuda_graph:
            graph = self.graphs + 1 if capture and self.graphs < self.max_graphs else -1  # -1: run uncaptured
            self.graphs += graph > 0
            options.add_run_config_entry("gpu_graph_id", str(graph))
        return options


def error_response(model_name: str, error: BaseException, *, invalid_argument: bool) -> Any:
    """An error response ``"<model>: <reason>"``. ``invalid_argument``: the caller's mistake, answered with
    INVALID_ARGUMENT (the 2.51 stub's ``TritonError.INVALID_ARG``; its ensembles pass the code on to the gRPC
    status); anything else is INTERNAL, its message prefixed with the exception's type."""
    if not invalid_argument:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{model_name}: {type(error).__name__}: {error}"))
    return coded_response(f"{model_name}: {error}", "INVALID_ARG")


def coded_response(message: str, code: str) -> Any:
    """An error response with ``pb_utils.TritonError.<code>`` (e.g. ``INVALID_ARG``, ``UNAVAILABLE``), or without
    a code (INTERNAL) on a stub that lacks it. A new object each call: the stub serializes each response once."""
    value = getattr(pb_utils.TritonError, code, None)
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message) if value is None
                                      else pb_utils.TritonError(message, value))


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.version = args["model_version"]
        params = config_parameters(config)
        path = Path(args["model_repository"]) / self.version / (params.get("onnx_file") or "model.onnx")
        niceness = lower_cpu_priority(params, self.model_name)
        self.session = ort.InferenceSession(str(path), sess_options=session_options(params, self.model_name),
                                            providers=execution_providers(params, args, self.model_name))
        numpy_of = pb_utils.triton_string_to_numpy
        inputs, outputs = (tuple((t["name"], np.dtype(numpy_of(t["data_type"]))) for t in config[kind])
                           for kind in ("input", "output"))
        # max_batch_size > 0: the first dim of every tensor is Triton's batch dim (not in config dims).
        self.spec = network.Spec(
            inputs=inputs, outputs=outputs, batched=int(config.get("max_batch_size", 0)) > 0,
            graph_dims={i.name: list(i.shape) for i in self.session.get_inputs()})
        network.check_signature(self.spec, {i.name: i.type for i in self.session.get_inputs()},
                                {o.name: o.type for o in self.session.get_outputs()}, self.model_name)
        self.in_flight = None
        if params.get("admission"):
            self.in_flight = InFlight(counter_path(Path(args["model_repository"]).parent, params["admission"],
                                                   self.version))
        pb_utils.Logger.log_info(f"{self.model_name} v{self.version}: {path.name} on {self.session.get_providers()}, "
                                 f"niceness {niceness}")

    # ---- serving: pb_utils tensors to numpy and back; the checks and the batching are network's -------------------
    def execute(self, requests: list[Any]) -> list[Any]:
        found: list[network.Request | Exception] = []
        for request in requests:
            try:
                tensors = {n: pb_utils.get_input_tensor_by_name(request, n) for n, _ in self.spec.inputs}
                asked = getattr(request, "requested_output_names", None)
                found.append(network.read_request({n: None if t is None else t.as_numpy() for n, t in tensors.items()},
                                                  None if asked is None else asked(), self.spec))
            except Exception as e:  # noqa: BLE001 - any problem is this request's error, never the instance's
                found.append(e)
        responses = []
        for answer in network.run_batched(found, self.session, self.spec):
            try:
                if isinstance(answer, Exception):
                    raise answer
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a)
                                                                            for n, a in answer.items()]))
            except Exception as e:  # noqa: BLE001
                responses.append(self._error(e))
        failed = sum(r.has_error() for r in responses) if self.in_flight is not None else 0
        if failed:
            try:
                self.in_flight.release(failed)
            except OSError as e:
                pb_utils.Logger.log_warn(f"{self.model_name}: in-flight counter unusable ({e})")
        return responses

    def _error(self, error: BaseException) -> Any:
        return error_response(self.model_name, error, invalid_argument=isinstance(error, RequestError))

    def finalize(self) -> None:
        self.session = None
