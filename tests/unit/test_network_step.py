"""A network step (``onnx_runner.TritonPythonModel``: the python flavour's ``amc_qen``, ``amc_van``, ``amc_lan``,
``amc_mtn``) without a server: its functions (``serving/backends/network.py``) and the step in-process with the shared
fake ``pb_utils`` over a toy graph. Every bad input that tests/integration/test_server.py sends to its toy network and
test_reliability.py sends through the ``amc`` ensemble (``serving.faults.bad_requests``) is refused here with the same
message, by the text step or VAN as on a server."""

from __future__ import annotations

import json

import numpy as np
import pytest

from amc_contract import RequestError
from amc_contract import signatures as sig
from amc_contract import text as amc_text
from serving import faults
from serving.backends import network, search, text_requests
from serving.backends.admission import InFlight
from tests import fake_pb_utils

SIZES = {"query_dim": 8, "hidden": 8, "keyword_hidden": 9}  # a model's sizes, as an export fixes them in its graphs


def spec_of(step: sig.StepSignature) -> network.Spec:
    """A network step's spec as the served step builds it from its config and the exported graph (the graph's dims:
    a model axis fixed to its size, the dynamic axes by name)."""
    def dims(t: sig.TensorSpec) -> list:
        return [SIZES.get(d, d) if isinstance(d, str) else d for d in t.dims]

    return network.Spec(tuple((t.name, t.numpy_dtype) for t in step.inputs),
                        tuple((t.name, t.numpy_dtype) for t in step.outputs), True,
                        {t.name: dims(t) for t in step.inputs})


VAN = spec_of(sig.VAN)


def van_inputs(regions: np.ndarray | None, mask: np.ndarray | None, batch: int = 1) -> dict:
    embedding = np.zeros((batch, SIZES["query_dim"]), np.float32)
    return {sig.QUERY_EMBEDDING.name: embedding, sig.REGIONS.name: regions, sig.REGION_MASK.name: mask}


# ---- the ensemble's catalogue of caller mistakes ------------------------------------------------------------------
def test_every_bad_request_of_the_ensemble_is_refused_by_the_text_step_or_van_naming_it():
    """``serving.faults.bad_requests`` (what tests/integration/test_reliability.py sends to ``amc``): each refused by
    the first step of the pipeline that sees it wrong, the text step (query, keywords, region_mask) or VAN (regions,
    region_mask), with the fragment the server's INVALID_ARGUMENT carries. (A batch over ``max_batch_size`` is
    Triton's own refusal, from the config: no step sees it.)"""
    normalize = search.QueryText(None, None, amc_text.EmojiNames({})).normalize
    text_rules = text_requests.RawRules(tuple(sig.TOKENIZER.input_names), text_requests.Bounds.of({}), normalize, 2)
    refused_by = {}
    for case, (arrays, fragment) in faults.bad_requests().items():
        if case == "batch over max_batch_size":
            continue
        try:
            text_requests.parse_raw(*(arrays.get(n) for n in sig.TOKENIZER.input_names), text_rules)
        except RequestError as e:
            refused_by[case] = "text step"
            assert fragment in str(e), (case, str(e))
            continue
        with pytest.raises(RequestError) as info:
            network.read_request(van_inputs(arrays[sig.REGIONS.name], arrays[sig.REGION_MASK.name],
                                            arrays[sig.QUERY.name].shape[0]), None, VAN)
        refused_by[case] = "VAN"
        assert fragment in str(info.value), (case, str(info.value))
    assert {c for c, step in refused_by.items() if step == "VAN"} == {
        "NaN regions", "inf regions", "-inf regions", "regions for more candidates than keywords",
        "region_mask for fewer regions than regions", "regions of 1000 features", "regions as float64"}


@pytest.mark.parametrize(("regions", "mask", "message"), [
    (np.full((1, 2, 3, 1280), np.nan, np.float32), np.ones((1, 2, 3), bool), "regions contains NaN or infinite values"),
    (np.ones((1, 3, 3, 1280), np.float32), np.ones((1, 2, 3), bool),
     "region_mask has 2 candidates (axis 1) but regions has 3: every input must agree on the number of candidates"),
    (np.ones((1, 2, 3, 1280), np.float32), np.ones((1, 2, 2), bool),
     "region_mask has 2 regions (axis 2) but regions has 3: every input must agree on the number of regions"),
    (np.ones((1, 2, 3, 1000), np.float32), np.ones((1, 2, 3), bool),
     "regions has 1000 at axis 3, expected 1280 (shape [1, 2, 3, 1000])"),
    (np.ones((1, 2, 3, 1280), np.float64), np.ones((1, 2, 3), bool),
     "input regions has dtype float64, expected float32"),
    (np.ones((1, 2, 1280), np.float32), np.ones((1, 2, 3), bool),
     "regions has shape [1, 2, 1280], expected 4 dims ['batch', 'candidates', 'regions', 1280]"),
    (np.ones((2, 2, 3, 1280), np.float32), np.ones((1, 2, 3), bool),
     "inputs disagree on the batch size: {'query_embedding': 1, 'regions': 2, 'region_mask': 1}"),
    (None, np.ones((1, 2, 3), bool), "input regions is missing"),
])
def test_van_refuses_bad_inputs_naming_the_problem(regions, mask, message):
    with pytest.raises(RequestError) as info:
        network.read_request(van_inputs(regions, mask), None, VAN)
    assert str(info.value) == message


def test_outputs_asked_for_are_in_config_order_and_unknown_ones_refused():
    names = VAN.output_names
    assert network.requested(None, names) is names and network.requested([], names) is names
    assert network.requested([names[2], names[0]], names) == (names[0], names[2])
    with pytest.raises(RequestError, match=r"^unknown output\(s\) requested: \['nope'\]$"):
        network.requested(["nope", names[1]], names)


def test_a_graph_and_config_that_disagree_fail_the_load():
    graph_in = {sig.QUERY_EMBEDDING.name: "tensor(float)", sig.REGIONS.name: "tensor(float)",
                sig.REGION_MASK.name: "tensor(bool)"}
    graph_out = {t.name: "tensor(int64)" if t.dtype == "int64" else "tensor(float)" for t in sig.VAN.outputs}
    network.check_signature(VAN, graph_in, graph_out, "amc_van")
    with pytest.raises(ValueError, match=r"amc_van: config inputs \[.*\] differ from the ONNX graph's"):
        network.check_signature(VAN, {**graph_in, "extra": "tensor(float)"}, graph_out, "amc_van")
    with pytest.raises(ValueError, match="amc_van: config declares input region_mask as bool, the ONNX graph as "
                                         r"tensor\(float\)"):
        network.check_signature(VAN, {**graph_in, sig.REGION_MASK.name: "tensor(float)"}, graph_out, "amc_van")


# ---- batching ----------------------------------------------------------------------------------------------------
class Session:
    """A stand-in onnxruntime session for VAN's signature: visual_vector = the sum of each candidate's regions, and
    fails a call whose regions hold 13 anywhere; records each call's batch."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, tuple[str, ...]]] = []

    def run(self, names, feeds):
        regions = feeds[sig.REGIONS.name]
        self.calls.append((regions.shape[0], tuple(names)))
        if (regions == 13).any():
            raise RuntimeError("bad group")
        b, n = regions.shape[:2]
        values = {sig.VISUAL_VECTOR.name: regions.sum(axis=(2, 3))[..., None].repeat(SIZES["hidden"], -1),
                  sig.REGION_ATTENTION.name: np.ones(regions.shape[:3], np.float64),  # another dtype: cast back
                  sig.VAN_VERSION.name: np.full((b, 1), 4, np.int64)}
        return [values[name] for name in names]


def request(value: float, n: int = 2, r: int = 3, batch: int = 1, wanted=None) -> network.Request:
    arrays = van_inputs(np.full((batch, n, r, 1280), value, np.float32), np.ones((batch, n, r), bool), batch)
    return network.read_request(arrays, wanted, VAN)


def test_requests_of_equal_shapes_share_a_session_call_and_a_failing_one_fails_alone():
    session = Session()
    requests = [request(1.0), request(2.0, batch=2), request(3.0, n=5), RequestError("bad"), request(13.0),
                request(4.0, wanted=[sig.VAN_VERSION.name])]
    answers = network.run_batched(requests, session, VAN)
    # (1, 2, 3), (2, 2, 3) [batch 2], (13), (4): one call of 5 that fails, then one each; (n=5): one call
    assert [c[0] for c in session.calls] == [5, 1, 2, 1, 1, 1]
    assert answers[3] is requests[3] and str(answers[4]) == "bad group"
    assert tuple(answers[0]) == VAN.output_names and answers[0][sig.VISUAL_VECTOR.name][0, 0, 0] == 3 * 1280
    assert answers[1][sig.VISUAL_VECTOR.name].shape == (2, 2, SIZES["hidden"])
    assert answers[0][sig.REGION_ATTENTION.name].dtype == np.float32  # the config's dtype
    assert list(answers[5]) == [sig.VAN_VERSION.name] and answers[5][sig.VAN_VERSION.name].tolist() == [[4]]
    assert all(a.flags.c_contiguous for x in answers if isinstance(x, dict) for a in x.values())


def test_an_output_without_the_batch_first_is_an_internal_error():
    class Scalar(Session):
        def run(self, names, feeds):
            return [np.float32(1.0) if n == sig.VAN_VERSION.name else v
                    for n, v in zip(names, super().run(names, feeds), strict=True)]

    found = network.run_batched([request(1.0)], Scalar(), VAN)[0]
    assert isinstance(found, RuntimeError) and str(found) == "output van_version has shape [], expected batch 1 first"


# ---- the step in-process -----------------------------------------------------------------------------------------
def toy_step(tmp_path, pb_utils):
    """``toy_net`` of tests/integration/test_server.py: scores[b, n] = mask[b, n] * sum_d regions[b, n, d], total =
    sum_n scores, run by onnx_runner as publish lays it out, dynamic batching on."""
    import onnx
    from onnx import TensorProto, helper

    from export.repository import NETWORK_MODULE, write_step_code

    here = tmp_path / "toy_net"
    write_step_code(here / "1", NETWORK_MODULE)
    regions, mask, scores = sig.REGIONS.name, sig.REGION_MASK.name, sig.SCORES.name
    nodes = [helper.make_node("Cast", [mask], ["maskf"], to=TensorProto.FLOAT),
             helper.make_node("ReduceSum", [regions, "axis2"], ["rowsum"], keepdims=0),
             helper.make_node("Mul", ["rowsum", "maskf"], [scores]),
             helper.make_node("ReduceSum", [scores, "axis1"], ["total"], keepdims=1)]
    graph = helper.make_graph(
        nodes, "toy", [helper.make_tensor_value_info(regions, TensorProto.FLOAT, ["batch", "candidates", "dim"]),
                       helper.make_tensor_value_info(mask, TensorProto.BOOL, ["batch", "candidates"])],
        [helper.make_tensor_value_info(scores, TensorProto.FLOAT, ["batch", "candidates"]),
         helper.make_tensor_value_info("total", TensorProto.FLOAT, ["batch", 1])],
        initializer=[helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
                     helper.make_tensor("axis1", TensorProto.INT64, [1], [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8),
              str(here / "1" / "model.onnx"))
    config = {"name": "toy_net", "backend": "python", "max_batch_size": 8,
              "input": [{"name": regions, "data_type": "TYPE_FP32", "dims": [-1, -1]},
                        {"name": mask, "data_type": "TYPE_BOOL", "dims": [-1]}],
              "output": [{"name": scores, "data_type": "TYPE_FP32", "dims": [-1]},
                         {"name": "total", "data_type": "TYPE_FP32", "dims": [1]}],
              "parameters": {"intra_op_num_threads": {"string_value": "1"}}}
    step = fake_pb_utils.load_step(here / "1" / "model.py").TritonPythonModel()
    step.initialize({"model_config": json.dumps(config), "model_name": "toy_net", "model_version": "1",
                     "model_repository": str(here)})
    return step


def test_the_network_step_batches_and_isolates_bad_requests_in_process(tmp_path):
    """tests/integration/test_server.py's batching test without the server: one execute, answers equal to the
    toy's arithmetic, the NaN request refused INVALID_ARGUMENT alone, a slot freed per error response."""
    rng = np.random.default_rng(0)
    shapes = [(1, 3, 4), (2, 3, 4), (1, 5, 4), (1, 3, 4), (3, 5, 4), (1, 3, 4)]
    cases = [(rng.standard_normal(s).astype(np.float32), rng.random(s[:2]) > 0.3) for s in shapes]
    cases[3][0][0, 1, 2] = np.nan  # shares its shape group with requests 0, 1 and 5
    with fake_pb_utils.installed() as pb_utils:
        step = toy_step(tmp_path, pb_utils)
        step.in_flight = InFlight(tmp_path / "counter")
        step.in_flight.admit(len(cases))
        requests = [pb_utils.InferenceRequest({sig.REGIONS.name: r, sig.REGION_MASK.name: m}) for r, m in cases]
        requests.append(pb_utils.InferenceRequest({sig.REGIONS.name: cases[0][0]}))
        requests.append(pb_utils.InferenceRequest(dict(zip((sig.REGIONS.name, sig.REGION_MASK.name), cases[0],
                                                           strict=True)), requested_output_names=["total"]))
        answers = step.execute(requests)
        assert step.in_flight.in_flight() == len(cases) - 2  # the NaN request and the one missing its mask
        step.finalize()
    for i, ((regions, mask), answer) in enumerate(zip(cases, answers, strict=False)):
        if i == 3:
            assert answer.error().message() == "toy_net: regions contains NaN or infinite values"
            assert answer.error().code() == pb_utils.TritonError.INVALID_ARG
            continue
        out = fake_pb_utils.outputs(answer)
        scores = regions.sum(axis=2) * mask
        np.testing.assert_allclose(out[sig.SCORES.name], scores, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["total"], scores.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-5)
    assert answers[6].error().message() == "toy_net: input region_mask is missing"
    assert list(fake_pb_utils.outputs(answers[7])) == ["total"]
