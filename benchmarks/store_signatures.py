"""The tensor signatures of the store ensembles only the benchmarks measure (``benchmarks.store_models`` builds them).

The client calls none of these models and a publish writes none of them, so they live here, not in
:mod:`amc_contract.signatures`; they are made of its tensors (one of their own: the store text step's
``candidate_rows``), and the config generator (``export.configs``' building blocks) and the ONNX export read them as
they read the client's.
Light on purpose (no torch): the benchmarks' drivers import it on any machine.

    amc_store_v<N>, amc_store   amc_store_tokenizer -> QEN -> (amc_van_store, amc_lan_store) -> MTN
    amc_store_fused             amc_store_tokenizer -> amc_fused_store
    amc_fused                   the four networks in one graph, raw features in
"""

from __future__ import annotations

from amc_contract import signatures as sig

CANDIDATE_ROWS = sig.TensorSpec("candidate_rows", "int64", ("batch", "candidates"),
                                doc="the store rows a request scores: its candidate_ids, or every row when it sent none")
# The store text step: the search step's request; of its outputs a request's ensemble maps those its graphs read
# (the step computes only those): amc_store the query's embedding and the lexical features, amc_store_fused the
# query's tokens and words. Its outputs in the order text_step.py's store mode parses them.
STORE_TOKENIZER = sig.StepSignature("amc_store_tokenizer", sig.SEARCH_STEP.inputs,
                                    (sig.QUERY_TEXT, sig.KEYWORD_LEXICAL, sig.TOKENIZER_VERSION, CANDIDATE_ROWS,
                                     sig.SEARCH_K, sig.QUERY_TOKENS, sig.QUERY_WORDS, sig.QUERY_WORD_WEIGHTS))
VAN_STORE = sig.StepSignature("amc_van_store", (sig.QUERY_EMBEDDING, sig.CANDIDATE_IDS),
                              (sig.VISUAL_VECTOR, sig.REGION_ATTENTION, sig.VAN_VERSION))
LAN_STORE = sig.StepSignature("amc_lan_store", (sig.QUERY_EMBEDDING, sig.KEYWORD_LEXICAL, sig.CANDIDATE_IDS),
                              (sig.KEYWORD_VECTOR, sig.KEYWORD_ATTENTION, sig.LAN_VERSION))
STORE_NETWORKS = (VAN_STORE, LAN_STORE)  # amc_store reuses QEN and MTN of the same version
_STORE_OUTPUTS = (sig.SCORES, sig.MODALITY_WEIGHTS, sig.REGION_ATTENTION, sig.KEYWORD_ATTENTION, sig.MODEL_VERSION)
STORE_ENSEMBLE_NAME = "amc_store"
STORE_ENSEMBLE = sig.StepSignature(STORE_ENSEMBLE_NAME, (sig.QUERY, sig.CANDIDATE_IDS), _STORE_OUTPUTS)
# All four networks in one graph: amc_fused over raw features (text features in), amc_fused_store over the store (the
# query's tokens and numbered words in: the sentence encoder and the lexical match inside).
FUSED = sig.StepSignature("amc_fused", (sig.QUERY_TEXT, sig.REGIONS, sig.REGION_MASK, sig.KEYWORD_EMBEDDINGS,
                                        sig.KEYWORD_LEXICAL), _STORE_OUTPUTS)
FUSED_STORE = sig.StepSignature("amc_fused_store", (sig.QUERY_TOKENS, sig.QUERY_WORDS, sig.QUERY_WORD_WEIGHTS,
                                                    sig.CANDIDATE_IDS), _STORE_OUTPUTS)
# The store steps carry query tokens and candidate ids, not region features, so merging many requests into one
# execution is cheap: their max_batch_size (and that of the 2-step store ensemble) is the search step's, while
# sig.MAX_BATCH stays the raw path's (and QEN's and MTN's, which the 5-step store ensemble shares with it).
STORE_MAX_BATCH = sig.SEARCH_MAX_BATCH
STORE_FUSED_ENSEMBLE_NAME = "amc_store_fused"
STORE_FUSED_ENSEMBLE = sig.StepSignature(STORE_FUSED_ENSEMBLE_NAME, STORE_ENSEMBLE.inputs, STORE_ENSEMBLE.outputs)

STORE_STEPS = (STORE_TOKENIZER, *STORE_NETWORKS)
FUSED_STEPS = (FUSED, FUSED_STORE)
STEPS = STORE_STEPS + FUSED_STEPS  # every step added here
# Instances of the store text step and the fused store graph by the kind of machine (issue 10): on an H100 4:4
# answered the most at 100 candidates of the counts tried (reports/gpu.md, run 6; the sweep's file is in git:
# git show 132d596:reports/gpu_instances_run6.json); on a CPU one each (more processes only split the same cores).
# Each fused-graph instance holds its own copy of the store's projections and of the sentence encoder. The other
# steps keep one.
STORE_INSTANCES = {"gpu": 4, "cpu": 1}
TUNED_STORE_STEPS = (STORE_TOKENIZER, FUSED_STORE)
STORE_BATCH_DELAY_US = 100  # requests are cheap to merge, so wait less for company at low load


def versioned_store_ensemble_name(version: int) -> str:
    """``amc_store_v3``: the store ensemble pinned to one model version."""
    return f"{STORE_ENSEMBLE_NAME}_v{version}"


def model_names(version: int) -> list[str]:
    """What ``store_models.add_store_models`` adds for ``version``: the steps, then the ensembles."""
    return ([s.model_name for s in STEPS]
            + [versioned_store_ensemble_name(version), STORE_ENSEMBLE_NAME, STORE_FUSED_ENSEMBLE_NAME])
