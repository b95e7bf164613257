"""The training configuration: every field is a ``python -m training.train`` flag (``--corpus.seed 3`` for the
corpus's), and ``make eval`` records it with each report. Its own module so that a step's loss
(``training.step``) and the evaluation can read it without importing the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from amc_model.model import AMCConfig
from training.corpus import CorpusConfig


@dataclass(frozen=True)
class TrainConfig:
    out: str = "runs/amc"  # directory for checkpoint.pt and history.json
    seed: int = 0  # weights init, batch order and negative sampling
    mode: str = "amc"  # amc, or a baseline: visual_only, keywords_only, equal_fusion
    epochs: int = 30  # upper bound; early stopping usually ends sooner
    patience: int = 4  # epochs without validation improvement before stopping
    batch_size: int = 64  # queries per step
    negatives: int = 8  # t: unclicked candidates per clicked one in the loss
    margin: float = 0.2  # alpha in max(0, alpha - s+ + s-)
    lr: float = 2e-3
    weight_decay: float = 1e-5
    query_dim: int = 128
    query_skip: bool = True  # AMCConfig.query_skip
    lexical_axis: bool = True  # AMCConfig.lexical_axis
    projection_bias: bool = False  # AMCConfig.projection_bias
    init_temperature: float = 5.0  # AMCConfig.init_temperature: MTN's softmax temperature at the start (learned)
    mtn_guide: str = "match"  # AMCConfig.mtn_guide
    lexical_pool: str = "max"  # AMCConfig.lexical_pool
    gate_lexical: bool = True  # AMCConfig.gate_lexical
    # MTN's lexical gate: every query's trust softplus(g . q) at the start (AMC.mtn.start_gate_at). PyTorch's default
    # init starts it near 0.7 and it ended near 0.75 (its gradient is weak: where both halves match the query, the split
    # barely moves the score); from 4, training keeps the trust an exact, informative tag match deserves
    # (reports/eval_history.md, rows 35-37). Initialisation only, so not part of the model's configuration.
    init_lexical_gate: float = 4.0
    lexical_monotone: bool = True  # AMCConfig.lexical_monotone
    visual_agreement: bool = True  # AMCConfig.visual_agreement (needs gate_lexical; off where the gate is off)
    tag_agreement: bool = True  # AMCConfig.tag_agreement (needs visual_agreement; off where that is off)
    hidden: int = 128
    pca_dim: int = 256
    # Visual-only auxiliary losses (issue 8: VAN was weak where keywords are noise, because the fused loss lets
    # LAN do the work on clean images and VAN gets little gradient). Both score cos(q_m, v^q), VAN's vector alone:
    visual_rank_weight: float = 0.0  # the ranking loss on the same clicked/unclicked candidates
    visual_contrastive_weight: float = 1.0  # in-batch softmax: each query against every other query's positive
    contrastive_temperature: float = 0.1
    # The ranking loss on LAN's vector alone, cos(q_m, k^q): trains the language half on its own too, so that
    # cos(q', k^q) tells MTN whether a candidate's keywords can be trusted.
    language_rank_weight: float = 0.0
    # Softmax over (clicked, t unclicked) as well as the paper's hinge: keeps pushing the clicked image to the
    # top after the margin is met, which is what NDCG@1 rewards.
    listwise_weight: float = 0.0
    listwise_temperature: float = 0.05
    # Negatives from the whole collection (training.collection), scored by the full model in a softmax against the
    # clicked image: what whole-store search needs and the logged lists' 30 candidates never show (issue 21).
    # Half the logged lists' weight: with the weights' average (ema_decay) it kept the whole store's lead and gave
    # the lists' top back (reports/eval_history.md, issue 21's sixth session; 1.0 before).
    collection_weight: float = 0.5  # 0 turns it off
    # Queries of each batch that get it (0: all): its cost grows with queries x negatives; 32 of 64 kept a step at
    # about 1.4x the logged lists' cost on the CPU.
    collection_queries: int = 32
    collection_hard: int = 4  # per query: tag-spam, visual-neighbour and model-mined negatives (shared by the batch)
    collection_random: int = 32  # per step: random images every chosen query is scored against
    collection_temperature: float = 0.05
    mine_every: int = 3  # epochs between minings of what the current model ranks first (0: never mine)
    mine_queries: int = 1024  # distinct training queries mined each time (drawn at random; 0: all of them)
    # Train on long-dwell clicks as positives, short clicks as negatives (see training.sampling.training_pairs).
    dwell: bool = True
    # Validation figure that picks the best epoch: NDCG@10, or "ndcg@1+10" (their mean).
    select_by: str = "ndcg@10"
    # Validate (and keep) an exponential moving average of the weights, updated after every step with this decay
    # (0: the weights as trained). Averaging over the last ~1/(1 - decay) steps smooths the step-to-step noise of
    # the sampled negatives.
    # 0.995 averages over about one epoch (205 steps of 64 queries); 3 seeds in reports/eval_history.md.
    ema_decay: float = 0.995
    resume: str = ""  # checkpoint to continue from; refused if its model configuration differs
    # How each batch's clicked and unclicked candidates are drawn. "sequential": one rng.choice pair per query
    # (the original stream, what every reported figure used). "vectorized": the same distribution drawn for
    # the whole batch in a few numpy calls, ~100x cheaper; under torchrun every rank draws the whole global
    # batch, so the sequential draw is work each rank repeats (see reports/ddp.json).
    sampling: str = "sequential"
    # Compute the lexical features of every (training query, logged candidate) pair once, before the first
    # step, and keep them (and the query embeddings) on the training device (training.data.LoggedPairs): the
    # same features, without a step's largest CPU cost. Memory: queries x 30 candidates x K keywords x 3 floats.
    precompute_lexical: bool = True
    # On a CUDA device, replay each step from a CUDA graph (training.graphed: ~800 kernels per step, launched
    # at once instead of from Python). Needs precompute_lexical; each epoch's last batch is then its last
    # batch_size queries, so that every step has the same shape.
    cuda_graph: bool = True
    progress: bool = True  # show a progress bar
    # cpu, or cuda (under torchrun: GPU LOCAL_RANK, NCCL), or cuda:K. Under torchrun cpu means gloo.
    device: str = "cpu"
    corpus: CorpusConfig = field(default_factory=CorpusConfig)

    def model_config(self) -> AMCConfig:
        return AMCConfig(query_dim=self.query_dim, query_skip=self.query_skip, hidden=self.hidden,
                         pca_dim=self.pca_dim, mode=self.mode, init_temperature=self.init_temperature,
                         lexical_axis=self.lexical_axis, projection_bias=self.projection_bias,
                         mtn_guide=self.mtn_guide, lexical_pool=self.lexical_pool,
                         gate_lexical=self.gate_lexical, lexical_monotone=self.lexical_monotone,
                         visual_agreement=self.visual_agreement and self.gate_lexical,
                         tag_agreement=self.tag_agreement and self.visual_agreement and self.gate_lexical)
