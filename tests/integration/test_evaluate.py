"""The evaluation with its seeds in parallel processes (``training.evaluate --jobs 2``): an integration test, as it
starts two seed processes that each import torch and train (the evaluation in one process, an ablation of one flag:
tests/unit/test_protocols.py)."""

from __future__ import annotations

import numpy as np


def test_seeds_in_parallel_processes_report_every_seed(tmp_path):
    """``--jobs 2``: two seed processes, then the reports over both from their details (the resume path)."""
    import json

    from tests.conftest import SMALL_CORPUS
    from training.evaluate import LEARNED, main

    args = ["--seeds", "0", "1", "--jobs", "2", "--out-dir", str(tmp_path), "--epochs", "1", "--batch_size", "32",
            "--progress", "false", "--corpus.max_images", "60", "--corpus.cache_dir", SMALL_CORPUS.cache_dir]
    assert main(args) == 0
    details = json.loads((tmp_path / "eval_details.json").read_text())
    assert details["seeds"] == [0, 1] and set(details["list_counts"]) == {"0", "1"}
    for seed in (0, 1):  # each seed's figures are its own process's, in seed order
        part = json.loads((tmp_path / "seeds" / f"seed{seed}" / "eval_details.json").read_text())
        for protocol, groups in part["per_seed"].items():
            metric = "ndcg@10" if protocol == "test_lists" else "r@1"
            for method in (*LEARNED, "bm25"):
                merged, own = details["per_seed"][protocol]["all"][metric][method][seed], groups["all"][metric][method][0]
                assert np.array_equal(merged, own, equal_nan=True)  # regional names: NaN where a seed has no list
        assert (tmp_path / "runs" / f"amc-seed{seed}" / "checkpoint.pt").is_file()
    report = json.loads((tmp_path / "eval.json").read_text())
    assert set(report["ndcg@10"]) >= set(LEARNED) and report["mtn_visual_weight"]["clean_keywords"] > 0
    assert "seeds [0, 1]" in (tmp_path / "eval.md").read_text()
