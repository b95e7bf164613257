"""Static-shape copies of the search graph, one per IOBinding bucket, so that onnxruntime's CUDA provider can run
every node of it and capture it as a CUDA graph.

Why: the search graph (``search_store.onnx``, :class:`export.store.SearchStoreGraph`) is exported with symbolic dims
(batch, tokens, query_words, candidates) and takes TopK's k as an input (``search_k``, (B, 1)). Its shape
arithmetic (Shape -> Gather -> Unsqueeze -> Concat -> Reshape/Expand/..., ConstantOfShape, the encoder's
``Range(0, tokens)`` of position ids) runs on the host: the CUDA provider produces Shape's output in host memory and
onnxruntime places what computes on it on the CPU provider (``GetCpuPreferredNodes``), and TopK's k
(``search_k[0, 0]``, gathered on the GPU) is read by the CUDA TopK kernel on the host, so a MemcpyToHost is added
before it. ``enable_cuda_graph`` needs every node on the CUDA provider, so onnxruntime refused it
(``reports/gpu.md``, run 9: 98 nodes on the CPU provider, 5 Memcpy nodes).

Within a bucket of ``onnx_runner.BoundSession`` every input shape is fixed and so is k (the search step rounds it
and the bucket's key holds its value). :func:`static_search_graph` makes the copy of the graph for one bucket: every
graph input's dims set, ``search_k`` replaced by a constant (an initializer, so TopK's k is a host constant and no
node computes it), and the shape arithmetic folded into constants by onnxruntime's own basic-level optimizer on the
CPU provider (constant folding, which folds a Shape node whose input's shape is static, and what follows from it).
Basic-level rewrites are provider-independent (onnxruntime runs them before it partitions the graph), so the copy is
what any provider's session starts from. :func:`host_computed_nodes` lists what would still compute a value the CUDA
provider reads on the host; for this graph it is nothing (``tests/parity/test_static_shapes.py``,
``reports/search_static_shapes.json``).

Large initializers (the store, the encoder's weights) never go through the optimizer: they are swapped for graph
inputs of their shape while it runs (so their consumers do not fold, and nothing gigabytes large is serialized) and
copied back afterwards. A node whose inputs are all initializers but a large one (the position embeddings gathered
at the now constant positions) stays as it is; onnxruntime's basic level folds it when a session opens the copy.
The copy is a ``ModelProto`` as large as the original: open it with ``InferenceSession(copy.SerializeToString())``
below protobuf's 2 GB, else save it with ``onnx.save_model(..., save_as_external_data=True)`` and open the file.
Only numpy, onnx and onnxruntime are imported: the search step imports this module (a version's ``amc_steps``) only
when CUDA graphs are asked for, so a stub without the onnx package serves uncaptured.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# The search graph's inputs (amc_contract.signatures.SEARCH_STORE), in order: tokens, words, word weights, rows, k.
SEARCH_INPUTS = ("query_tokens", "query_words", "query_word_weights", "candidate_ids", "search_k")

# Initializers with more elements than this are kept out of the optimizer (see the module's docstring).
LARGE = 4096

# Inputs the CUDA provider's kernels read in host memory (``InputMemoryType(OrtMemTypeCPUInput, i)`` in
# onnxruntime/core/providers/cuda): fed by anything but an initializer, onnxruntime either computes the feeding
# nodes on the CPU provider or adds a MemcpyToHost, and either refuses a CUDA graph. A few (Clip's bounds, Pad's
# value) are not shapes, but they are read on the host all the same.
HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "TopK": (1,), "ConstantOfShape": (0,),
    "Range": (0, 1, 2), "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,), "Pad": (1, 2, 3), "Clip": (1, 2),
    "Resize": (1, 2, 3), "Upsample": (1,), "OneHot": (1,), "CumSum": (1,), "Trilu": (1,), "Dropout": (1, 2),
    "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,), "ReduceProd": (1,),
    "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,), "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,),
}
# Nodes whose output the CUDA provider writes in host memory, or that exist only to compute on shapes.
SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range"})


def load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def op_counts(model: onnx.ModelProto | str | Path) -> dict[str, int]:
    """Nodes of the main graph by op type, most first."""
    return dict(Counter(n.op_type for n in load(model).graph.node).most_common())


def host_computed_nodes(model: onnx.ModelProto | str | Path) -> list[str]:
    """Every node that would still compute on shapes on the host: a Shape, Size, ConstantOfShape or Range node, and
    every node one of whose :data:`HOST_INPUTS` is fed by anything but an initializer (a node's output or a graph
    input), as ``"<op> <name>: <input> <- <what feeds it>"``. Empty: nothing the CUDA provider would place on the
    CPU provider or copy to the host for these reasons."""
    graph = load(model).graph
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    found = []
    for node in graph.node:
        if node.op_type in SHAPE_OPS:
            found.append(f"{node.op_type} {node.name}: computes on shapes")
            continue
        for i in HOST_INPUTS.get(node.op_type, ()):
            if i >= len(node.input) or not node.input[i] or node.input[i] in constants:
                continue
            name = node.input[i]
            source = ("graph input" if name in inputs else
                      f"{producers[name].op_type} {producers[name].name}" if name in producers else "?")
            found.append(f"{node.op_type} {node.name}: input {i} {name} <- {source}")
    return found


def _dims(value: onnx.ValueInfoProto, shape: Sequence[int]) -> None:
    tensor = value.type.tensor_type
    if len(tensor.shape.dim) != len(shape):
        raise ValueError(f"{value.name} has {len(tensor.shape.dim)} dims, not {len(shape)} ({list(shape)})")
    for dim, size in zip(tensor.shape.dim, shape, strict=True):
        if dim.HasField("dim_value") and dim.dim_value != size:
            raise ValueError(f"{value.name} has {dim.dim_value} at a fixed dim, not {size} ({list(shape)})")
        dim.Clear()
        dim.dim_value = int(size)


def _skeleton(model: onnx.ModelProto, large: int) -> tuple[onnx.ModelProto, dict[str, TensorProto]]:
    """``model`` with each initializer of more than ``large`` elements swapped for a graph input of its type and
    shape (returned by name, untouched): what the optimizer gets."""
    big = {t.name: t for t in model.graph.initializer if int(np.prod(t.dims, dtype=np.int64)) > large}
    graph = helper.make_graph(
        list(model.graph.node), model.graph.name,
        [*model.graph.input, *(helper.make_tensor_value_info(n, t.data_type, list(t.dims)) for n, t in big.items())],
        list(model.graph.output), [t for t in model.graph.initializer if t.name not in big])
    skeleton = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                 producer_name=model.producer_name, producer_version=model.producer_version)
    skeleton.metadata_props.extend(model.metadata_props)
    return skeleton, big


def _basic_optimized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` after onnxruntime's basic-level graph optimizations on the CPU provider (its constant folding)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="amc-static-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(out)
        options.intra_op_num_threads = 1
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return onnx.load(str(out))


def make_static(model: onnx.ModelProto | str | Path, shapes: Mapping[str, Sequence[int]],
                constants: Mapping[str, np.ndarray] | None = None, *, large: int = LARGE) -> onnx.ModelProto:
    """A copy of ``model`` for inputs of fixed shapes: each input named in ``shapes`` gets those dims, each named
    in ``constants`` becomes an initializer of that value (no longer an input), and the shape arithmetic that this
    makes constant is folded (onnxruntime, basic level, CPU provider). Every graph input must be in one of the two.
    The outputs get their static shapes (onnx shape inference). ``model`` is not changed."""
    model = load(model)
    constants = dict(constants or {})
    names = [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    missing = sorted(set(names) - set(shapes) - set(constants))
    unknown = sorted((set(shapes) | set(constants)) - set(names))
    if missing or unknown:
        raise ValueError(f"every graph input needs a shape or a value: missing {missing}, not inputs {unknown}")
    skeleton, big = _skeleton(model, large)
    graph = skeleton.graph
    kept = [i for i in graph.input if i.name not in constants]
    for value in kept:
        if value.name in shapes:
            _dims(value, shapes[value.name])
    for name, array in constants.items():
        declared = next(i for i in model.graph.input if i.name == name)
        dtype = helper.tensor_dtype_to_np_dtype(declared.type.tensor_type.elem_type)
        array = np.asarray(array)
        if array.dtype != dtype:
            raise ValueError(f"{name} is {dtype} in the graph, the value given is {array.dtype}")
        _dims(onnx.ValueInfoProto(name=name, type=declared.type), array.shape)  # checks rank and fixed dims
        graph.initializer.append(numpy_helper.from_array(array, name))
    del graph.input[:]
    graph.input.extend(kept)
    for output in graph.output:  # stale symbolic dims; shape inference gives the static ones below
        output.type.tensor_type.ClearField("shape")
    del graph.value_info[:]
    folded = _basic_optimized(skeleton)
    folded = onnx.shape_inference.infer_shapes(folded, strict_mode=True)
    del folded.graph.value_info[:]  # onnxruntime infers them again; only the outputs' shapes are kept
    inputs = [i for i in folded.graph.input if i.name not in big]
    del folded.graph.input[:]
    folded.graph.input.extend(inputs)
    used = {i for n in folded.graph.node for i in n.input} | {o.name for o in folded.graph.output}
    folded.graph.initializer.extend(t for name, t in big.items() if name in used)
    del folded.metadata_props[:]
    folded.metadata_props.extend(model.metadata_props)
    return folded


def split_constant_outputs(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Take the graph outputs that folding made constants (an initializer or a Constant node: the search graph's
    ``model_version``) out of ``model``'s outputs, and return their values. onnxruntime copies such an output from
    the initializer into the bound buffer on every run, a host-synchronous copy that a CUDA graph capture cannot
    hold; the caller answers them itself."""
    values = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    constant = {o.name: values[o.name] for o in model.graph.output if o.name in values}
    kept = [o for o in model.graph.output if o.name not in constant]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    return constant


def static_search_graph(model: onnx.ModelProto | str | Path, *, batch: int, tokens: int, words: int,
                        candidates: int, k: int, large: int = LARGE) -> onnx.ModelProto:
    """The search graph for one bucket: ``batch`` queries of ``tokens`` WordPiece ids and ``words`` word slots,
    each among ``candidates`` store rows, keeping the top ``k``. ``search_k`` is no longer an input (k is a
    constant of the copy): feed the other four. See :func:`make_static`."""
    if not 1 <= k <= candidates:
        raise ValueError(f"k must be from 1 to the {candidates} candidates, not {k}")
    tokens_in, words_in, weights_in, rows_in, k_in = SEARCH_INPUTS
    return make_static(model, {tokens_in: (batch, tokens), words_in: (batch, words), weights_in: (batch, words),
                               rows_in: (batch, candidates)},
                       {k_in: np.full((batch, 1), k, dtype=np.int64)}, large=large)
