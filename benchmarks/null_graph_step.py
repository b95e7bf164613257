"""A stand-in for a Python-backend graph step that serves everything but the graph (benchmarks only).

``benchmarks.serving_bound`` copies this file over ``<model>/<version>/model.py`` and the step's own ``model.py``
beside it as ``amc_graph_runner.py``. The step then does all that the real one does (reads and checks every
input from shared memory, groups the requests, answers every output of the real shapes and dtypes through shared
memory), except the ONNX session call: after one real call per instance, which gives each output's shape per
candidate and the model version, it answers zeros of those shapes. So the gap between this step and the real one is the graph's
cost in the server, and what this step reaches is what the serving machinery around the graph allows.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location(f"_amc_graph_runner_{abs(hash(str(_HERE)))}",
                                               _HERE / "amc_graph_runner.py")
assert _spec is not None and _spec.loader is not None
_runner = importlib.util.module_from_spec(_spec)
sys.dont_write_bytecode = True  # Triton would see a __pycache__ in the version directory as a change
_spec.loader.exec_module(_runner)


class TritonPythonModel(_runner.TritonPythonModel):
    def initialize(self, args: dict[str, str]) -> None:
        super().initialize(args)
        config = json.loads(args["model_config"])
        # Outputs whose first config dim is -1 have one row per candidate ([B, N, ...]); the others ([B, 1]:
        # the model version) are repeated per query.
        self.per_candidate = {t["name"]: int(t["dims"][0]) == -1 for t in config["output"]}
        self.template: dict[str, np.ndarray] | None = None
        self.logger.log_info(f"{self.model_name}: NULL GRAPH (benchmark): answers zeros after one real call")

    def _run(self, feeds: dict[str, np.ndarray], names: tuple[str, ...]) -> dict[str, np.ndarray]:
        if self.template is None:
            real = super()._run(feeds, self.output_names)
            self.template = {n: a[:1].copy() for n, a in real.items()}
            return {n: real[n] for n in names}
        first = next(iter(feeds.values()))
        batch = first.shape[0]
        candidates = feeds["candidate_ids"].shape[1]
        out: dict[str, Any] = {}
        for name in names:
            template = self.template[name]
            if self.per_candidate[name]:
                out[name] = np.zeros((batch, candidates, *template.shape[2:]), dtype=template.dtype)
            else:
                out[name] = np.repeat(template, batch, axis=0)
        return out
