"""Generates every Triton ``config.pbtxt`` of the AMC repository from :mod:`amc_contract.signatures`.

Configs are built as Triton's ``ModelConfig`` protobuf (so an invalid field cannot be written) and printed
with ``text_format``; nothing here touches a repository (that is :mod:`export.repository`). The models a publish
writes, each config from one function here:

    amc_tokenizer    the text step, mode raw               :func:`step_config`
    amc_qen, amc_van, amc_lan, amc_mtn (the networks)       :func:`step_config`
    amc_topk         server-side top-k, mode raw           :func:`step_config`
    amc_v<N>, amc    the ensemble, pinned to N / to the serving version with the routing   :func:`ensemble_config`
    amc_search_step  whole-store search in one step        :func:`search_step_config`
    amc_search_v<N>, amc_search   its ensemble, pinned     :func:`search_ensemble_config`

Two flavours come from the same code: ``python`` (each network is a Python-backend model running
onnxruntime, with the CUDA execution provider when a GPU is present; runs on the tritonserver from the
nvidia-pytriton wheel) and ``onnxruntime`` (``platform: onnxruntime_onnx``, for NVIDIA's Triton container;
``KIND_GPU``, or ``KIND_CPU`` for a CPU server: ``kind``). A network's dims are the signature's with the
model's numbers on its model axes (``sizes``, ``export.onnx_export.model_sizes``), the same the export checks
the graph against: that backend refuses a config that declares -1 where the graph fixes a dim. The text step
(``serving/backends/text_step.py``: WordPiece, the sentence encoder ``text_encoder.onnx`` under onnxruntime,
the lexical features) is a Python-backend model in both; one module serves the raw ensemble (``amc_tokenizer``,
parameter ``mode: raw``) and whole-store search (``amc_search_step``, ``mode: search``).

Why pinned ensembles: an ensemble step with ``model_version: -1`` resolves to the latest loaded version at
request time, so during a rollout one request could run VAN of one version and MTN of another. Every
ensemble here pins one explicit version on every step, so the version set of a request is fixed by the
ensemble it was sent to.

``python -m export.configs [--check]`` regenerates (checks) the committed templates under ``model_repository/``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from amc_contract import signatures as sig
from amc_contract.routing import Routing

FLAVOURS = ("python", "onnxruntime")
# The steps of the ensemble ``amc`` (and ``amc_v<N>``), in pipeline order.
STEPS: tuple[sig.StepSignature, ...] = (sig.TOKENIZER, *sig.NETWORKS, sig.TOPK)
ONNX_FILE = "model.onnx"
# The search graph beside the search step (a Python step in both flavours: not model.onnx, which Triton's ONNX Runtime
# backend would take for its own).
SEARCH_GRAPH_FILE = "search_store.onnx"
TEMPLATE_ROOT = Path(__file__).resolve().parent.parent / "model_repository"
# Networks that gain from merging requests: VAN does most of the work; the others are cheap but batching
# them costs nothing when requests arrive together.
BATCH_DELAY_US = 200
# Overload, in two parts.
#
# 1. The text step, where every request enters an ensemble, has a bounded queue (MAX_QUEUE_SIZE requests, not
# batch elements: with MAX_BATCH 8, two batches waiting behind the one running); more are answered at once by
# Triton (UNAVAILABLE "Exceeds maximum queue size"). Only the entrance, and no queue timeout, because of what
# Triton 2.51 does with queue policies (seen here, 24 client threads against the CPU server, 10 candidates a
# request): with a bounded queue on every step, amc_qen stopped executing for good within seconds (execution
# count frozen, its queue full, every later request, a lone one too, rejected until the model is reloaded); with
# a queue timeout (default_timeout_microseconds) the same, expiring instead: the batcher then gates dispatch on
# a waiting-consumer count that drifts when it merges payloads (triton-inference-server/server#8870, fixed by
# core#509 in 2026-07, after 2.51). With the bound on the text step alone: no stall.
#
# 2. That bound alone does not hold latency: the text step is fast, so requests pass it and wait in the
# unbounded queue of the slow step behind it (Triton's statistics under overload on the 2-core CPU: almost all of a
# request's latency was amc_van's queue; the run is in commit 5fac526's message). So the
# text step also bounds the requests in flight through its version's pipeline (admitted by it, not yet answered
# by the top-k step at the end) to sig.MAX_IN_FLIGHT, through a counter that the text step, the top-k step and
# VAN share (serving/backends/admission.py); beyond it the text step answers UNAVAILABLE "overloaded: ... in
# flight" itself. No queue of Triton's changes, so the batcher bug cannot bite: what waits in VAN's queue is at
# most MAX_IN_FLIGHT requests. Counted: amc, amc_v<N> (counter "raw"). amc_search is one step that answers its
# requests itself (nothing after it could free a slot): its own queue bound (SEARCH_QUEUE_SIZE) refuses the excess.
# What a refusal and an answered request then take, in the server and at the clients: reports/overload_runs.json
# (device_runs_early_refusals) and docs/reliability.md. With the clients on the same 2 cores as the server, their
# packing takes as much CPU as the server's work.
MAX_QUEUE_SIZE = 16
# What the raw pipeline's network steps add to their niceness (config parameter ``nice``,
# onnx_runner.lower_cpu_priority): on a CPU server their compute yields to Triton's gRPC intake and to the text step,
# which refuses the excess, so under overload a refusal does not wait behind the networks' compute. The A/B of 10
# against 0 (a refusal's time in the server, answered requests a minute): reports/overload_runs.json,
# device_runs_early_refusals.
# Other processes on the same CPUs (outside the server's container) also take precedence over the networks.
NETWORK_NICE = 10
# Keywords the text step encodes on the fly (not in the version's keyword table) and keeps: 1.5 KB each.
KEYWORD_CACHE_SIZE = 20_000
ADMISSION = "admission"  # config parameter: the in-flight counter a step takes or frees slots of ("raw")
# The kinds of machine a repository is published for (``export.publish --device-kind``): where the onnxruntime
# flavour places its networks, and how the search step runs (SEARCH_SETTINGS).
DEVICE_KINDS = ("gpu", "cpu")


@dataclass(frozen=True)
class SearchSettings:
    """How ``amc_search_step`` runs on one kind of machine (config of :func:`search_step_config`)."""

    instances: int  # Python processes, each with its own session, store copy and CUDA context
    batch_delay_us: int  # the dynamic batcher's wait for more requests to merge into one graph call
    io_binding: bool  # onnx_runner.BoundSession: inputs and outputs bound on the device
    cuda_graph: bool  # each batch shape on a captured fixed-shape copy of the graph (search_graph.StaticGraphs)
    intra_op_threads: int | None  # onnxruntime's CPU pool per instance (None: its default, the machine's cores)


# The search step by the kind of machine that will serve (issue 23, "fast by default"). GPU: what the sweep of
# ``benchmarks.search_gpu`` chose on one H100 (reports/gpu.json, ``search_defaults``, which a test checks against
# this: the lever with the largest mean gain over the base at both sizes, where it passes the run's noise; the
# latest winner was onnxruntime's own CPU thread pool per instance, though every lever of that run beat its base by
# 11-15%, so the base may have been unlucky). CUDA graphs: onnxruntime refuses to capture the graph as exported (its
# shape ops run on the host), so the step captures fixed-shape copies of it, one per batch shape
# (``search_graph.StaticGraphs``); the step's description says which ran. CPU: one instance with onnxruntime's own
# pool (more processes would split the same cores), bound host buffers (the same code path as the GPU's), no graphs.
SEARCH_SETTINGS = {"gpu": SearchSettings(instances=2, batch_delay_us=200, io_binding=True, cuda_graph=True,
                                         intra_op_threads=None),
                   "cpu": SearchSettings(instances=1, batch_delay_us=100, io_binding=True, cuda_graph=False,
                                         intra_op_threads=None)}
# Requests the search step lets wait (each execution takes up to sig.SEARCH_MAX_BATCH queries); more are answered
# UNAVAILABLE at once by Triton, which the client backs off from. Only the one step: no later step to stall.
SEARCH_QUEUE_SIZE = 256
# Queries x rows per graph call at most: the graph holds (B, N, R, hidden) float32 tensors, ~2.5 GB per query of a
# 100,000-row store, so a whole-store search runs one query per call, a search among 1,000 rows up to 64.
SEARCH_ROWS_PER_RUN = 131_072


def device_kind() -> str:
    """"gpu" where this environment's onnxruntime offers its CUDA provider (onnxruntime-gpu is installed; the
    requirements pin the CPU build, so a development machine says "cpu"), else "cpu". Publishing for a GPU server
    from elsewhere: name the kind (``export.publish --device-kind gpu``, ``amc-rollout publish --device-kind gpu``)."""
    import onnxruntime as ort

    return "gpu" if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"


def search_settings(kind: str | None = None, *, instances: int | None = None) -> SearchSettings:
    """:data:`SEARCH_SETTINGS` of ``kind`` (default: this machine's :func:`device_kind`), with ``instances`` if
    given."""
    kind = kind or device_kind()
    if kind not in SEARCH_SETTINGS:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(SEARCH_SETTINGS)}")
    if instances is not None and instances < 1:
        raise ValueError(f"search step instances must be >= 1, got {instances}")
    return SEARCH_SETTINGS[kind] if instances is None else dataclasses.replace(SEARCH_SETTINGS[kind], instances=instances)


# ---- building blocks -----------------------------------------------------------------------------------------
def routing_parameters(routing: Routing) -> dict[str, str]:
    """``amc``'s config parameters for ``routing`` (the client parses them back with the same names)."""
    params = {sig.ROUTING_SERVING_VERSION: str(routing.serving_version),
              sig.ROUTING_CANARY_VERSION: "" if routing.canary_version is None else str(routing.canary_version),
              sig.ROUTING_CANARY_SHARE: f"{routing.canary_share:g}"}
    if routing.canary_search:  # only then: repositories without a store keep the configs they had
        params[sig.ROUTING_CANARY_SEARCH] = "1"
    return params


def _tensor(spec: sig.TensorSpec, cls, sizes: Mapping[str, int] | None):
    tensor = cls(name=spec.name, data_type=mc.DataType.Value(spec.triton_dtype), dims=spec.triton_dims(sizes))
    if spec.optional:
        tensor.optional = True
    return tensor


def declare_tensors(config: mc.ModelConfig, signature: sig.StepSignature,
                    sizes: Mapping[str, int] | None = None) -> None:
    """``signature``'s inputs and outputs as ``config``'s (dims for a model of ``sizes``)."""
    config.input.extend(_tensor(t, mc.ModelInput, sizes) for t in signature.inputs)
    config.output.extend(_tensor(t, mc.ModelOutput, sizes) for t in signature.outputs)


def onnxruntime_instances(config: mc.ModelConfig, kind: str, count: int) -> None:
    """The onnxruntime flavour's network: Triton's ONNX Runtime backend on ``kind``'s instances."""
    if kind not in DEVICE_KINDS:
        raise ValueError(f"unknown device kind {kind!r}; expected one of {sorted(DEVICE_KINDS)}")
    config.platform = "onnxruntime_onnx"
    config.default_model_filename = ONNX_FILE
    group = mc.ModelInstanceGroup.KIND_GPU if kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU
    config.instance_group.add(kind=group, count=count)


def queue_policy(config: mc.ModelConfig, *, max_queue_size: int = MAX_QUEUE_SIZE) -> None:
    """Bound ``config``'s dynamic-batching queue to ``max_queue_size`` waiting requests; more are rejected at
    once. No queue timeout. Only for an ensemble's first step (see MAX_QUEUE_SIZE for why)."""
    policy = config.dynamic_batching.default_queue_policy
    policy.max_queue_size = max_queue_size
    policy.default_timeout_microseconds = 0
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.allow_timeout_override = False


def admission_parameters(counter: str) -> dict[str, str]:
    """The entrance's admission control (see MAX_QUEUE_SIZE's comment) as config parameters of the text step
    (``serving/backends/text_step.py`` reads them)."""
    return {ADMISSION: counter, "max_in_flight": str(sig.MAX_IN_FLIGHT),
            "in_flight_expiry_s": f"{sig.IN_FLIGHT_EXPIRY_S:g}"}


def request_bounds() -> dict[str, int]:
    """The bounds of :mod:`amc_contract.signatures` as the text step's config parameters (``text_step.py``)."""
    return dict(sig.REQUEST_BOUNDS)


def text_step(config: mc.ModelConfig, *, instances: int) -> None:
    """The ranking text step's backend, instances and parameters (``serving/backends/text_step.py`` in mode raw reads
    them): it counts requests in flight (its ensembles end in the top-k step, which frees their slots)."""
    config.backend = "python"
    # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=instances)
    config.parameters["mode"].string_value = "raw"
    for key, value in request_bounds().items():
        config.parameters[key].string_value = str(value)
    for key, value in admission_parameters("raw").items():
        config.parameters[key].string_value = value
    config.parameters["keyword_cache_size"].string_value = str(KEYWORD_CACHE_SIZE)


def _top_k_step(config: mc.ModelConfig, mode: str) -> None:
    """The top-k step (``serving/backends/top_k.py``): Python, one CPU instance, requests taken as they come
    (dynamic batching without delay: it answers each request on its own, in one execute() call)."""
    config.backend = "python"
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
    config.dynamic_batching.SetInParent()
    config.parameters["mode"].string_value = mode
    config.parameters[ADMISSION].string_value = mode  # the last step of its ensembles: frees every request's slot


def add_step(config: mc.ModelConfig, step: sig.StepSignature, version: int,
             outputs: dict[str, str] | None = None, inputs: dict[str, str | None] | None = None) -> None:
    """One pinned step of an ensemble. Tensor names are unique across the pipeline, so a map is the identity,
    except where ``inputs``/``outputs`` rename (step tensor -> ensemble tensor): the networks' per-candidate
    outputs feed the top-k step under the names of ``sig.TOP_K_FEEDS``. ``outputs`` may also list a subset;
    ``inputs`` may map an optional input to None, leaving it unfed."""
    fed = {n: (inputs or {}).get(n, n) for n in step.input_names}
    config.ensemble_scheduling.step.add(
        model_name=step.model_name, model_version=version,
        input_map={n: tensor for n, tensor in fed.items() if tensor is not None},  # None: an optional input unfed
        output_map=outputs if outputs is not None else {n: n for n in step.output_names})


def _renamed(step: sig.StepSignature) -> dict[str, str]:
    return {n: sig.TOP_K_FEEDS.get(n, n) for n in step.output_names}


# ---- the models a publish writes ------------------------------------------------------------------------------
def step_config(signature: sig.StepSignature, flavour: str, *, sizes: Mapping[str, int] | None = None,
                kind: str = "gpu") -> mc.ModelConfig:
    """Config of one step model of ``amc`` (:data:`STEPS`), shared by every version directory: ``sizes`` are the
    numbers of the model axes (``sig.MODEL_AXES``) of its versions' graphs (default :func:`template_sizes`, the
    default model's); ``kind`` the machine that serves the onnxruntime flavour's networks (the python flavour's are
    Python processes)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"unknown flavour {flavour!r}; expected one of {FLAVOURS}")
    sizes = template_sizes() if sizes is None else sizes
    config = mc.ModelConfig(name=signature.model_name, max_batch_size=sig.MAX_BATCH)
    # Every version on disk is loaded; the rollout tool decides which directories exist.
    config.version_policy.all.SetInParent()
    declare_tensors(config, signature, sizes)
    if signature is sig.TOKENIZER:
        # Dynamic batching without delay: the step takes whatever requests are waiting (its execute() encodes
        # their queries in one call) and its queue gets the bounds of queue_policy().
        config.dynamic_batching.SetInParent()
        queue_policy(config)
        text_step(config, instances=1)
        return config
    if signature is sig.TOPK:
        _top_k_step(config, "raw")
        return config
    config.dynamic_batching.max_queue_delay_microseconds = BATCH_DELAY_US
    if flavour == "python":
        config.backend = "python"
        # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
        config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=1)
        config.parameters["onnx_file"].string_value = ONNX_FILE
        config.parameters["nice"].string_value = str(NETWORK_NICE)
        if signature is sig.VAN:  # refuses what the text step let in (NaN regions): frees the request's slot
            config.parameters[ADMISSION].string_value = "raw"
    else:
        onnxruntime_instances(config, kind, 1)
    return config


def ensemble_config(name: str, version: int, routing: Routing | None = None) -> mc.ModelConfig:
    """The text step -> QEN -> (VAN, LAN) -> MTN -> top-k ensemble with every step pinned to ``version``."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=sig.MAX_BATCH)
    declare_tensors(config, sig.ENSEMBLE)
    for step in STEPS:
        add_step(config, step, version, None if step is sig.TOPK else _renamed(step))
    for key, value in (routing_parameters(routing) if routing else {}).items():
        config.parameters[key].string_value = value
    return config


def search_step_config(settings: SearchSettings, *, sizes: Mapping[str, int] | None = None,
                       max_batch: int = sig.SEARCH_MAX_BATCH) -> mc.ModelConfig:
    """``amc_search_step``'s config: the text step's module in mode search, run as ``settings`` say (the
    benchmarks write their A/B variants with it), with the search graph's parameters (``SearchGraph`` of
    ``serving/backends/search_graph.py``). The same in both flavours (the graph runs inside the Python step)."""
    config = mc.ModelConfig(name=sig.SEARCH_STEP.model_name, max_batch_size=max_batch)
    config.version_policy.all.SetInParent()
    declare_tensors(config, sig.SEARCH_STEP, template_sizes() if sizes is None else sizes)
    config.backend = "python"
    # KIND_CPU: the instance is a Python process; onnxruntime inside it picks the CUDA provider itself.
    config.instance_group.add(kind=mc.ModelInstanceGroup.KIND_CPU, count=settings.instances)
    config.dynamic_batching.max_queue_delay_microseconds = settings.batch_delay_us
    queue_policy(config, max_queue_size=SEARCH_QUEUE_SIZE)
    params = {"mode": "search", **{k: str(v) for k, v in request_bounds().items()}, "onnx_file": SEARCH_GRAPH_FILE,
              "use_tf32": "0",
              "graph_inputs": ",".join(sig.SEARCH_STORE.input_names),
              "io_binding": str(int(settings.io_binding)), "cuda_graph": str(int(settings.cuda_graph)),
              "max_rows_per_run": str(SEARCH_ROWS_PER_RUN), "max_graph_batch": str(max_batch)}
    if settings.intra_op_threads is not None:
        params["intra_op_num_threads"] = str(settings.intra_op_threads)
    for key, value in params.items():
        config.parameters[key].string_value = value
    return config


def search_ensemble_config(name: str, version: int) -> mc.ModelConfig:
    """Whole-store search, pinned to ``version``: one step, ``amc_search_step`` (checks the request, tokenizes, runs
    the search graph over every row of the store or the rows of the optional ``candidate_ids`` filter, adds the kept
    rows' store ids and keywords; ``serving/backends/text_step.py``, mode search).

    Why one step (issue 23): each Python step costs CPU per request in the stub and the shared-memory hand-off
    (reports/gpu.md, run 8), and the graph keeps only the top k rows, so no per-row tensor of a whole store
    crosses the Python backend. The ensemble stays so that a version's search is pinned by name, as before."""
    config = mc.ModelConfig(name=name, platform="ensemble", max_batch_size=sig.SEARCH_MAX_BATCH)
    declare_tensors(config, sig.SEARCH_ENSEMBLE)
    add_step(config, sig.SEARCH_STEP, version)
    return config


# ---- text and templates ---------------------------------------------------------------------------------------
def to_text(config: mc.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


@functools.cache
def template_sizes() -> dict[str, int]:
    """The model axes' numbers in ``model_repository/``: the default ``AMCConfig``'s. A publish writes its own
    model's (``export.repository.init_repository``)."""
    from amc_model.model import AMCConfig
    from export.onnx_export import model_sizes

    return model_sizes(AMCConfig())


def template_files(flavour: str, *, sizes: Mapping[str, int] | None = None, kind: str = "gpu") -> dict[str, str]:
    """The version-independent configs of a fresh repository for a model of ``sizes`` (default
    :func:`template_sizes`) served on ``kind``: what ``model_repository/<flavour>/`` holds with the defaults.

    ``amc`` starts pinned to version 1, the first version a publish writes.
    """
    files = {f"{s.model_name}/config.pbtxt": to_text(step_config(s, flavour, sizes=sizes, kind=kind)) for s in STEPS}
    files[f"{sig.ENSEMBLE_NAME}/config.pbtxt"] = to_text(ensemble_config(sig.ENSEMBLE_NAME, 1, Routing(1)))
    return files


def write_template(repository: Path, flavour: str) -> None:
    for rel, text in template_files(flavour).items():
        (repository / rel).parent.mkdir(parents=True, exist_ok=True)
        (repository / rel).write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Regenerate the committed templates: ``python -m export.configs [--check]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m export.configs", description=main.__doc__)
    parser.add_argument("--root", type=Path, default=TEMPLATE_ROOT)
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed configs differ")
    args = parser.parse_args(argv)
    stale = [f"{fl}/{rel}" for fl in FLAVOURS for rel, text in template_files(fl).items()
             if not (args.root / fl / rel).exists() or (args.root / fl / rel).read_text() != text]
    if args.check:
        print("\n".join(f"differs from generator: {s}" for s in stale) or "model_repository matches the generator")
        return 1 if stale else 0
    for flavour in FLAVOURS:
        write_template(args.root / flavour, flavour)
    print(f"wrote {sum(len(template_files(f)) for f in FLAVOURS)} configs under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
