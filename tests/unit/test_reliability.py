"""Reliability without a server (issue 9): the generated configs bound every queue and count requests in flight,
the steps' onnxruntime pools do not spin, the network steps' niceness, and the in-flight counter itself (against a
real tritonserver: tests/integration/test_reliability.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from amc_contract import signatures as sig


def test_every_step_queue_is_bounded_in_the_generated_configs() -> None:
    from export.configs import MAX_QUEUE_SIZE, step_config

    for flavour in ("python", "onnxruntime"):
        # The entrance of the ensemble is bounded, without a queue timeout; the steps behind it are not (a
        # bounded queue or a queue timeout there stalls Triton 2.51's batcher for good: export/configs.py).
        policy = step_config(sig.TOKENIZER, flavour).dynamic_batching.default_queue_policy
        assert policy.max_queue_size == MAX_QUEUE_SIZE
        assert policy.default_timeout_microseconds == 0 and not policy.allow_timeout_override
        for step in sig.NETWORKS:
            assert not step_config(step, flavour).dynamic_batching.HasField("default_queue_policy")


def test_admission_control_is_in_the_generated_configs() -> None:
    """The raw text step takes in-flight slots with the limit of the signatures module; the top-k step at the end of
    its ensembles frees them, and VAN (python flavour) frees the slot of each request it refuses. Search counts
    nothing (one step, bounded by its queue)."""
    from export.configs import ADMISSION, SEARCH_QUEUE_SIZE, SEARCH_SETTINGS, search_step_config, step_config

    for settings in SEARCH_SETTINGS.values():
        search = search_step_config(settings)
        assert ADMISSION not in search.parameters
        assert search.dynamic_batching.default_queue_policy.max_queue_size == SEARCH_QUEUE_SIZE
    for flavour in ("python", "onnxruntime"):
        for text, topk, counter in ((step_config(sig.TOKENIZER, flavour), step_config(sig.TOPK, flavour), "raw"),):
            params = {k: v.string_value for k, v in text.parameters.items()}
            assert params[ADMISSION] == counter and params["max_in_flight"] == str(sig.MAX_IN_FLIGHT)
            assert float(params["in_flight_expiry_s"]) == sig.IN_FLIGHT_EXPIRY_S
            assert topk.parameters[ADMISSION].string_value == counter
    assert step_config(sig.VAN, "python").parameters[ADMISSION].string_value == "raw"


def test_onnx_sessions_do_not_spin_and_size_their_threads_by_cpu_affinity() -> None:
    """The steps' onnxruntime pools (serving/backends/onnx_runner.py session_options): no spinning unless the
    config asks (spinning pools of 6 stub processes took each other's CPU: half the throughput on 2 cores),
    threads = the CPUs this process may use where it is pinned to fewer than the machine has, else onnxruntime's
    default (0), unless the config names a number; a bad value names itself."""
    import os

    from serving.backends.onnx_runner import session_options

    def spinning(options) -> str:
        return options.get_session_config_entry("session.intra_op.allow_spinning")

    default = session_options({}, "amc_van")
    assert spinning(default) == "0"
    allowed = os.sched_getaffinity(0)
    assert default.intra_op_num_threads == (len(allowed) if len(allowed) < os.cpu_count() else 0)
    if len(allowed) > 1:  # pinned to one CPU: a pool of one
        os.sched_setaffinity(0, {min(allowed)})
        try:
            assert session_options({}, "amc_van").intra_op_num_threads == 1
        finally:
            os.sched_setaffinity(0, allowed)
    chosen = session_options({"allow_spinning": "1", "intra_op_num_threads": "3"}, "amc_van")
    assert spinning(chosen) == "1" and chosen.intra_op_num_threads == 3
    with pytest.raises(ValueError, match="amc_van: allow_spinning must be 0 or 1, not 'yes'"):
        session_options({"allow_spinning": "yes"}, "amc_van")


def test_in_flight_counter_admits_up_to_the_limit_frees_and_expires(tmp_path: Path) -> None:
    import time

    from serving.backends.admission import InFlight

    path = tmp_path / "counter"
    entrance, end = InFlight(path, limit=3, expiry_s=0.5), InFlight(path)
    assert entrance.admit(2) == (2, 0)
    assert entrance.admit(5) == (1, 2)  # only one slot left
    assert entrance.admit(1) == (0, 3)
    end.release(2)
    assert end.in_flight() == 1 and entrance.admit(4) == (2, 1)
    time.sleep(0.6)  # a request that failed midway holds its slot for expiry_s at most
    assert end.in_flight() == 0 and entrance.admit(3) == (3, 0)
    end.release(10)  # more releases than slots (a direct call to the top-k step): never below 0
    assert entrance.in_flight() == 0


def test_a_bad_niceness_names_itself() -> None:
    """The network steps' niceness (config parameter nice; that the stubs of a real server run at it:
    tests/integration/test_reliability.py): 0 added leaves the priority unchanged, a bad value names itself."""
    import os

    from serving.backends.onnx_runner import lower_cpu_priority

    assert lower_cpu_priority({}, "amc_van") == os.getpriority(os.PRIO_PROCESS, 0)  # 0 added: unchanged
    for bad in ("20", "-1", "ten"):
        with pytest.raises(ValueError, match=f"amc_van: nice must be an integer from 0 to 19, not '{bad}'"):
            lower_cpu_priority({"nice": bad}, "amc_van")
