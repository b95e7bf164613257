"""The AMC model apart from its training (open_clip's ``open_clip/`` vs ``open_clip_train/``).

- ``amc_model.model``: the networks (QEN, VAN, LAN, MTN), their config and the forwards export wraps;
- ``amc_model.checkpoint``: the checkpoint format, from which export rebuilds the model alone;
- ``amc_model.text_encoder``: the frozen sentence encoder (all-MiniLM-L6-v2) and its on-disk embedding cache.

Export and serving import this package, never ``training``; training imports it. It imports nothing from
``training`` (``tests/unit/test_layout.py`` checks both). The text rules it reads queries with (WordPiece ids,
term weights, the lexical match) are ``amc_contract.text``'s, shared with the served steps.
"""
