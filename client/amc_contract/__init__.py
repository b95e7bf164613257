"""What the client, training, export and the served steps agree on: AMC's contract, in one package.

- :mod:`amc_contract.signatures`: every served step's tensors (name, dtype, dims), the request bounds, the model
  names and the routing parameters' names;
- :mod:`amc_contract.text`: the text rules (WordPiece ids, words, IDF term weights, the lexical match, query
  normalization), the same offline and online;
- :mod:`amc_contract.routing`: canary routing as the ``amc`` ensemble's config parameters hold it;
- :class:`RequestError`: a request the server refuses (the steps answer it INVALID_ARGUMENT with its message).

numpy only (``tokenizers`` when WordPiece is loaded): no torch, no gRPC. It ships in the client's distribution
(``pip install client/`` installs ``amc_client`` and ``amc_contract``), and every published Python-backend version
folder carries a copy of it (``export.repository``), so a version serves with the contract it was published with.
"""

from amc_contract.errors import RequestError

__all__ = ["RequestError"]
