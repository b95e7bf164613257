"""Thin gRPC client for the AMC image-search ranker served by Triton.

>>> with AMCClient("127.0.0.1:8001") as client:
...     for r in client.rank("cat with a hat", candidates, top_k=5):
...         print(r.rank, r.candidate_id, r.score, r.visual_weight, r.top_keywords[:3])
"""

from amc_contract.routing import Routing

from ._async_client import AsyncAMCClient
from ._client import AMCClient
from ._fleet import ReplicaStatus
from ._packing import pack_request
from ._types import Candidate, CandidateArrays, RankedResult
from .errors import (
    AMCError,
    DeadlineExceededError,
    InvalidInputError,
    MixedVersionError,
    ModelVersionError,
    ServerUnavailableError,
)
from .images import candidates_from_images, extract_region_features

__version__ = "0.1.0"

__all__ = [
    "AMCClient",
    "AMCError",
    "AsyncAMCClient",
    "Candidate",
    "CandidateArrays",
    "DeadlineExceededError",
    "InvalidInputError",
    "MixedVersionError",
    "ModelVersionError",
    "RankedResult",
    "ReplicaStatus",
    "Routing",
    "ServerUnavailableError",
    "candidates_from_images",
    "extract_region_features",
    "pack_request",
]
