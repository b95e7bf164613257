"""The Python-backend steps: the code Triton's Python backend runs for every published Python model.

    text_step.py     the text step: amc_tokenizer (mode raw), amc_search_step (mode search: the whole of amc_search,
                     whose logic is search.py's)
    onnx_runner.py   one exported network on onnxruntime (the python flavour's amc_qen, amc_van, amc_lan, amc_mtn);
                     also the steps' provider choice, session options and error responses
    top_k.py         amc_topk, the end of the ranking ensembles; check_top_k, the one top_k rule
    static_shapes.py the search graph's fixed-shape copies (CUDA graphs); needs the onnx package, imported only then
    admission.py     the in-flight counter the ranking pipeline's steps share

Each step's ``TritonPythonModel`` only moves tensors between ``pb_utils`` and numpy; its logic is functions of numpy
arrays, tested without a server (``tests/unit``):

    search.py        the search step's (and every mode's reading of a query)
    search_graph.py  the search step's graph calls: SearchGraph, StaticGraphs (fixed-shape copies), graph_k
    text_requests.py the text step's raw mode: checks, admission, outputs
    text_features.py TextFeatures: a text-step version folder's tokenizer, encoder, keyword table and text rules
    network.py       a network step's input checks and batching
    top_k.py         select, beside its step

Publish vendors this package whole into each Python-backend version folder, as ``amc_steps/``, beside a copy of
``amc_contract/`` (``export.repository.write_step_code``); the version's ``model.py`` puts its folder first on
``sys.path`` and imports ``TritonPythonModel`` from ``amc_steps.<step>``. So the modules here import each other
relatively (``from . import onnx_runner``), the contract as ``amc_contract``, and nothing else of the project
(``tests/unit/test_layout.py`` checks it).
"""
