"""Fast by default (issue 23): what ``export.publish`` writes for a GPU server's search step is what the sweep of
``benchmarks.search_gpu`` chose (``reports/gpu.json``, ``search_defaults``), not a typed guess; and the sweep's rule
for choosing keeps the base unless a lever gains more than the noise at both sizes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from benchmarks.search_report import NOISE, summarize
from export.configs import SEARCH_SETTINGS

REPORTS = Path(__file__).resolve().parents[2] / "reports"


def test_gpu_search_settings_are_what_the_sweep_chose():
    found = json.loads((REPORTS / "gpu.json").read_text())["search_defaults"]
    assert dataclasses.asdict(SEARCH_SETTINGS["gpu"]) == found["settings"], found["best_variant"]


def _run(base: tuple[float, float], variant: tuple[float, float]) -> dict:
    settings = {"base": {"instances": 2}, "more": {"instances": 4}}

    def points(rates):
        return {"n100": {"candidates_per_s": rates[0]}, "n1000": {"candidates_per_s": rates[1]}}

    return {"served": {"base": {"settings": settings["base"]},
                       "variants": {"base_n100": points(base)["n100"], "base_n1000": points(base)["n1000"],
                                    "more": {"settings": settings["more"], **points(variant)}}}}


def test_a_lever_becomes_the_default_only_past_the_noise_at_both_sizes():
    gain = 1.0 + 2 * NOISE
    assert summarize(_run((100.0, 100.0), (100.0 * gain, 100.0 * gain)))["search_defaults"]["best_variant"] == "more"
    # better at one size, worse at the other: the base stays
    assert summarize(_run((100.0, 100.0), (107.0, 80.0)))["search_defaults"]["best_variant"] == "base"
    # better at both, but within the noise: the base stays
    small = 1.0 + NOISE / 2
    assert summarize(_run((100.0, 100.0), (100.0 * small, 100.0 * small)))["search_defaults"]["best_variant"] == "base"
