"""The search step's graph calls (``amc_search_step``; its logic, ``search.py``, calls them): :class:`SearchGraph`
runs ``search_store.onnx`` on this process's onnxruntime, through :class:`StaticGraphs`' fixed-shape copies on CUDA
graphs where they are asked for and can be had; :func:`graph_k` is the one k of a call. Tested without a server by
``tests/unit/test_search_step.py`` (through the step) and ``tests/parity/test_static_shapes.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .onnx_runner import BoundSession, bucket, execution_providers, session_options


class SearchGraph:
    """The search graph's calls: ``search_store.onnx`` beside the step (``export.store.SearchStoreGraph``: the sentence
    encoder, the lexical match, the four networks and TopK over the rows searched) on this process's onnxruntime.
    Config parameters (the generator writes them, ``export.configs``):

    - ``graph_inputs``: the graph's input names, in the order tokens, words, word weights, rows, k (the signatures');
    - ``io_binding`` (``1`` default): run through ``onnx_runner.BoundSession`` (inputs and outputs bound in buffers on
      the session's device, a few batch shapes); ``0``: ``session.run`` with host arrays (the A/B's "off");
    - ``cuda_graph`` (``0`` default): on the CUDA provider, run each bucket (input shapes and k) through a copy of the
      graph with every shape fixed, captured as a CUDA graph (:class:`StaticGraphs`; onnxruntime refuses to capture
      the dynamic graph, whose shape work runs on the host); at most ``max_static_graphs`` (8) copies, and none for a
      graph file over ``max_static_graph_mb`` (1024 MB: each copy holds the store again); other calls, and every call
      where a copy fails, run the dynamic graph uncaptured, and :meth:`describe` says why;
    - ``max_rows_per_run`` (131072): queries x rows per graph call at most (the graph's (B, N, R, hidden) tensors:
      a whole store of 100,000 rows is ~2.5 GB of them per query), ``max_graph_batch`` (64) queries at most;
    - ``intra_op_num_threads``, ``allow_spinning``, ``execution_provider``, ``use_tf32``: as ``onnx_runner.py``
      (whose provider choice, session options, ``BoundSession`` and batch buckets it uses).
    """

    def __init__(self, folder: Path, params: dict[str, str], args: dict[str, str], model_name: str) -> None:
        import onnxruntime as ort

        self.names = [n.strip() for n in (params.get("graph_inputs") or "").split(",") if n.strip()]
        self.max_rows = int(params.get("max_rows_per_run") or 131072)
        self.max_batch = int(params.get("max_graph_batch") or 64)
        path = folder / (params.get("onnx_file") or "search_store.onnx")
        graph = (params.get("cuda_graph") or "0").strip() == "1"
        self.graph_refused = ""

        def open_session(p: dict[str, str], model: Any = None) -> Any:
            return ort.InferenceSession(str(path) if model is None else model,
                                        sess_options=session_options(p, model_name),
                                        providers=execution_providers(p, args, model_name))
        # The dynamic graph is never captured (its shape work runs on the host: onnxruntime refuses); the fixed-shape
        # copies of StaticGraphs are.
        session = open_session({**params, "cuda_graph": "0"})
        have = [i.name for i in session.get_inputs()]
        if len(self.names) != 5 or sorted(have) != sorted(self.names):
            raise ValueError(f"{model_name}: config parameter graph_inputs {self.names} does not name {path.name}'s "
                             f"inputs {have}")
        self.session = session
        on_cuda = session.get_providers()[0] == "CUDAExecutionProvider"
        device_id = int(session.get_provider_options().get("CUDAExecutionProvider", {}).get("device_id", 0))
        capture = graph and on_cuda
        self.bound = None
        if (params.get("io_binding") or "1").strip() == "1" or capture:
            self.bound = BoundSession(session, device="cuda" if on_cuda else "cpu", device_id=device_id,
                                             host_inputs=(self.names[4],))
        self.static = None  # the fixed-shape copies, where CUDA graphs are asked for and can be had
        if capture:
            limit_mb = float(params.get("max_static_graph_mb") or 1024)
            if path.stat().st_size > limit_mb * 2**20:
                self.graph_refused = (f"{path.name} is {path.stat().st_size / 2**20:.0f} MB, over max_static_graph_mb "
                                      f"{limit_mb:.0f}: no fixed-shape copies")
            else:
                try:  # it needs the onnx package in the stub's Python: without it, serve uncaptured
                    from . import static_shapes
                except Exception as e:  # noqa: BLE001
                    self.graph_refused = f"no fixed-shape copies: static_shapes.py: {type(e).__name__}: {e}"
                else:
                    self.static = StaticGraphs(
                        path, self.names, lambda model: open_session({**params, "cuda_graph": "1"}, model),
                        lambda s: BoundSession(s, device="cuda", device_id=device_id, cuda_graph=True, max_graphs=1),
                        static_shapes, int(params.get("max_static_graphs") or 8))
        self.bucket = bucket

    def describe(self) -> str:
        how = "IOBinding" if self.bound is not None else "host arrays"
        if self.static is not None:
            graphs = f"CUDA graphs of fixed-shape copies ({self.static.describe()})"
        else:
            graphs = "no CUDA graphs" + (f" ({self.graph_refused})" if self.graph_refused else "")
        return f"search graph on {self.session.get_providers()[0]}, {how}, {graphs}"

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph call: its outputs by name, host arrays of their own."""
        if self.static is not None:
            out = self.static.run(feeds)
            if out is not None:
                return out
        if self.bound is not None:
            return self.bound.run(feeds)
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feeds), strict=True))

    def score(self, tokens: np.ndarray, words: np.ndarray, weights: np.ndarray, rows: np.ndarray,
              k: int) -> dict[str, np.ndarray]:
        """Q queries' features and the rows each searches (Q, N) -> the graph's outputs for their top ``k``, (Q, ...)
        by name, in as few calls as :attr:`max_rows` and :attr:`max_batch` allow, each padded to a batch bucket
        (the last query repeated) so that calls take a few shapes."""
        queries, n = rows.shape
        step = max(1, min(self.max_batch, self.max_rows // n))
        parts = []
        for start in range(0, queries, step):
            stop = min(queries, start + step)
            size = self.bucket(stop - start)
            size = size if size <= step else stop - start
            pad = np.r_[np.arange(start, stop), np.full(size - (stop - start), stop - 1)]
            feeds = dict(zip(self.names, (tokens[pad], words[pad], weights[pad], rows[pad],
                                          np.full((size, 1), k, dtype=np.int64)), strict=True))
            parts.append({name: value[: stop - start] for name, value in self.run(feeds).items()})
        return parts[0] if len(parts) == 1 else {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


class StaticGraphs:
    """The search graph's calls on CUDA graphs: per bucket (the four inputs' shapes and k), a copy of the graph with
    every shape fixed and k a constant (``static_shapes.py`` of this package), whose
    shape work onnxruntime folds away, in a session with CUDA graphs, bound and captured on its first call.

    Why copies: the dynamic graph computes its shapes on the host (Shape, Range, TopK's k) and onnxruntime refuses to
    capture a graph with host nodes (reports/search_static_shapes.json lists them). ``limit`` copies at most, since
    each holds the graph's constants (the store) again; a bucket beyond it, or any copy that fails to build, capture
    or run, returns None and the caller runs the dynamic graph (a failure also stops further copies, named by
    :meth:`describe`). Not thread-safe: a Triton instance calls ``execute`` one batch at a time.
    """

    def __init__(self, path: Path, names: Sequence[str], open_session: Any, bind: Any, static_shapes: Any,
                 limit: int) -> None:
        self.path, self.names, self.open_session, self.bind = path, list(names), open_session, bind
        self.static_shapes, self.limit = static_shapes, limit
        self.model = None  # the graph's ModelProto, read on the first copy
        self.copies: dict[tuple, Any] = {}
        self.error = ""

    def describe(self) -> str:
        state = f"{len(self.copies)} of at most {self.limit} built"
        return state + (f"; stopped: {self.error}" if self.error else "")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        tokens, words, weights, rows, k = (feeds[n] for n in self.names)
        key = (tokens.shape, words.shape, rows.shape, int(k[0, 0]))
        bound = self.copies.get(key)
        try:
            if bound is None:
                if self.error or len(self.copies) >= self.limit:
                    return None
                if self.model is None:
                    self.model = self.static_shapes.load(self.path)
                copy = self.static_shapes.static_search_graph(
                    self.model, batch=rows.shape[0], tokens=tokens.shape[1], words=words.shape[1],
                    candidates=rows.shape[1], k=key[3])
                # Outputs that folded to constants (model_version) are answered here: onnxruntime would copy them
                # from the host on every run, which a capture cannot hold.
                constant = self.static_shapes.split_constant_outputs(copy)
                bound = self.copies[key] = (self.bind(self.open_session(copy.SerializeToString())), constant)
            session, constant = bound
            out = session.run(dict(zip(self.names[:4], (tokens, words, weights, rows), strict=True)))
            if getattr(session, "graph_error", ""):  # BoundSession ran it uncaptured: a copy for nothing
                raise RuntimeError(f"capture failed: {session.graph_error}")
            return {**out, **{name: value.copy() for name, value in constant.items()}}
        except Exception as e:  # noqa: BLE001 - serve on the dynamic graph rather than fail the request
            self.error = f"{type(e).__name__}: {str(e)[:300]}"
            self.copies.pop(key, None)
            return None


def graph_k(wanted: Sequence[int], n: int) -> int:
    """The one k of a graph call for requests that want ``wanted`` of ``n`` rows: rounded up to a power of two from 16
    (TopK's first k of a larger k are the same rows), so that calls take few shapes."""
    most = max(wanted)
    return n if most >= n else min(n, 1 << (max(16, most) - 1).bit_length())
