"""Evaluate AMC against its baselines over several seeds and three protocols.

    python -m training.evaluate --out-dir reports --seeds 0 1 2 [--jobs 3]

For each seed: trains AMC and the learned baselines (keywords only = LAN alone, visual only = VAN alone,
equal-weight fusion = no MTN) with the same data and settings, and scores the test queries under every
protocol of :mod:`training.protocols` (the log's test lists, the target among 99 random images, regional
English names). Text baselines: BM25 over the auto-tagger keywords, dense retrieval (cosine of the MiniLM
embeddings of the query and of the image's keywords joined), and their reciprocal-rank-fusion hybrid.
Writes ``eval.json`` (means over seeds, standard deviations, results split by clean vs noisy-keyword
targets, MTN's mean visual weight), ``eval_details.json`` (per seed), ``eval.md``, ``ndcg.png`` and
``attention.png`` (a few test queries with region heat maps, top keywords and modality weights).

``--jobs N`` runs up to N seeds at once, each in a process of its own (``--out-dir``/seeds/seed<S>/, with its log),
then writes the reports over all seeds from theirs; each process gets ``OMP_NUM_THREADS`` = cores / N unless the
variable is set. A seed's figures do not depend on how many ran beside it.

Why one module: it is the evaluation's one command, from training each seed to the tables and figures it writes, and
its parts serve that command only (the protocols are ``training.protocols``').
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from amc_contract.text import content_words, words
from amc_model.checkpoint import load_checkpoint
from training import protocols
from training.corpus import Corpus, load_corpus
from training.data import CorpusTensors, corpus_tensors, term_weights
from training.metrics import (
    BM25,
    NDCG_KS,
    STORE_METRICS,
    TARGET_METRICS,
    mean_ndcg,
    reciprocal_rank_fusion,
    store_metrics,
    target_metrics,
)
from training.retrieval import CollectionScorer
from training.train import score_lists, train
from training.train_config import TrainConfig

LEARNED = ("amc", "keywords_only", "visual_only", "equal_fusion")
TEXT_BASELINES = ("bm25", "dense", "hybrid")
# BM25 over the clean CLDR names and keywords: a reference ceiling on whole-store search, using text the model
# never sees (it reads the auto-tagger's noisy keywords); reported, never a method to beat.
REFERENCE = "bm25_clean_reference"
METHODS = (*LEARNED, *TEXT_BASELINES)
NDCG_KEYS = tuple(f"ndcg@{k}" for k in NDCG_KS)
GROUPS = ("all", "noisy", "clean")
RESULT_NEUTRAL = ("progress",)  # TrainConfig fields that change no figure: a resumed run may differ in them
# TrainConfig fields that only AMC's learned MTN weights read: a baseline trains and scores the same whatever they are
# (tests/unit/test_model.py::test_the_tags_witness_changes_no_baseline), so --baselines-from may take the learned
# baselines of a run that differs from this one in these fields alone.
AMC_ONLY_FIELDS = ("tag_agreement",)


def text_baselines(corpus: Corpus, data: CorpusTensors, lists: list[protocols.RankingList], *,
                   reference: bool = False) -> dict[str, list]:
    """Scores of BM25, dense and hybrid for each list (and with ``reference``, BM25 over the clean CLDR text)."""
    bm25 = BM25([words(" ".join(k)) for k in corpus.keywords])
    documents = data.text.get([", ".join(k) for k in corpus.keywords], "query")  # (images, E), unit norm
    queries = data.query_text([rl.text for rl in lists]).numpy()
    clean = BM25([words(" ".join([n, *k])) for n, k in zip(corpus.names, corpus.true_keywords, strict=True)])
    out: dict[str, list] = {m: [] for m in (*TEXT_BASELINES, *([REFERENCE] if reference else []))}
    for rl, q in zip(lists, queries, strict=True):
        query_words = words(data.normalized([rl.text])[0])
        lexical = bm25.score_all(query_words)[rl.candidates]
        dense = documents[rl.candidates] @ q
        out["bm25"].append(lexical)
        out["dense"].append(dense)
        out["hybrid"].append(reciprocal_rank_fusion([lexical, dense]))
        if reference:
            out[REFERENCE].append(clean.score_all(query_words)[rl.candidates])
    return out


def tag_spam_masks(corpus: Corpus, data: CorpusTensors, lists: list[protocols.RankingList]) -> list[np.ndarray]:
    """Per whole-store query, the images whose auto-tags carry every content word of the query (grade aside)."""
    holders: dict[str, set[int]] = {}
    for i, tags in enumerate(corpus.keywords):
        for w in {w for t in tags for w in content_words(t)}:
            holders.setdefault(w, set()).add(i)
    out = []
    for rl in lists:
        mask = np.zeros(len(corpus.keywords), dtype=bool)
        query_words = content_words(data.normalized([rl.text])[0])
        if query_words:
            mask[list(set.intersection(*(holders.get(w, set()) for w in query_words)))] = True
        out.append(mask[rl.candidates])
    return out


def list_metrics(name: str, lists: list[protocols.RankingList], scores: list[np.ndarray],
                 spam: list[np.ndarray] | None = None) -> dict[str, dict]:
    """{group: {metric: value}} for one method on one protocol; groups split by the target's keywords.
    ``spam``: the whole-store protocol's :func:`tag_spam_masks`."""
    out = {}
    for group in GROUPS:
        keep = [i for i, rl in enumerate(lists) if group == "all" or (rl.noisy is not None and rl.noisy == (group == "noisy"))]
        chosen = [lists[i] for i in keep]
        s = [scores[i] for i in keep]
        if name == "test_lists":
            metrics = mean_ndcg(s, [rl.relevance for rl in chosen]) if chosen else {k: float("nan") for k in NDCG_KEYS}
        elif name == "whole_store":
            metrics = store_metrics(s, [rl.relevance for rl in chosen], [rl.target for rl in chosen],
                                    [spam[i] for i in keep])
        else:
            metrics = target_metrics(s, [rl.relevance for rl in chosen], [rl.target for rl in chosen])
        out[group] = metrics
    return out


def learned_scores(model, data: CorpusTensors, name: str, lists: list[protocols.RankingList]) -> list[dict]:
    """A learned model's scores of each list; the whole store through :class:`CollectionScorer` (the images'
    projections once, not once per query)."""
    if name == "whole_store":  # every image, in the order of each list's candidates
        every = CollectionScorer(model, data).scores([rl.text for rl in lists])
        return [{"scores": s[rl.candidates]} for s, rl in zip(every, lists, strict=True)]
    return score_lists(model, data, [rl.text for rl in lists], [rl.candidates for rl in lists])


def mtn_visual_weight(corpus: Corpus, lists: list[protocols.RankingList], scored: list[dict]) -> dict[str, float]:
    clean, noisy = [], []
    for rl, s in zip(lists, scored):
        for j, image in enumerate(rl.candidates):
            if rl.relevance[j] > 0:
                (noisy if corpus.noisy[image] else clean).append(float(s["modality_weights"][j, 0]))
    return {"clean_keywords": float(np.mean(clean)) if clean else float("nan"),
            "noisy_keywords": float(np.mean(noisy)) if noisy else float("nan")}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values))


def _affecting_results(config: dict) -> dict:
    """A run's configuration without the fields that change no figure (a progress bar), for comparing runs."""
    return {k: v for k, v in config.items() if k not in RESULT_NEUTRAL}


def _resumed(out: Path, base: TrainConfig, seeds: list[int], methods) -> tuple[dict, dict, dict, list[int]]:
    """What a partial run in ``out`` left (per_seed, timings, sizes, seeds done), if it had this configuration.

    Each seed's results depend only on that seed (corpus, split and weights are seeded together), so a run that
    stopped after some seeds and one resumed from it report the same figures.
    """
    path = out / "eval_details.json"
    if not path.is_file():
        return {}, {}, {}, []
    details = json.loads(path.read_text())
    config = json.loads(json.dumps(dataclasses.asdict(base)))
    if (_affecting_results(details.get("config") or {}) != _affecting_results(config)
            or details.get("seeds_requested") != seeds):
        raise ValueError(f"--resume-seeds: {path} is from another configuration or seed list; use another --out-dir")
    done = [s for s in details["seeds"] if s in seeds]
    if set(details["train_seconds"]) != set(methods):
        raise ValueError(f"--resume-seeds: {path} was made with methods {sorted(details['train_seconds'])}")
    sizes = {int(seed): counts for seed, counts in details["list_counts"].items()}
    return details["per_seed"], details["train_seconds"], sizes, done


def run(base: TrainConfig, seeds: list[int], out: Path, *, methods=LEARNED, log=print, resume: bool = False) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    # per_seed[protocol][group][metric][method] -> one value per seed
    per_seed: dict = {}
    weights, timings, examples, sizes, done = [], {}, None, {}, []
    if resume:
        per_seed, timings, sizes, done = _resumed(out, base, seeds, methods)

    earlier = {}  # where the learned baselines came from (add_earlier_baselines), kept through a resume
    if resume and (out / "eval_details.json").is_file():
        earlier = {k: v for k, v in json.loads((out / "eval_details.json").read_text()).items() if k == "baselines_from"}

    def write(seeds_done: list[int]) -> dict:
        report = summarize(per_seed, weights)
        write_reports(out, report, {"seeds": seeds_done, "seeds_requested": seeds,
                                    "per_seed": per_seed, "list_counts": sizes, "train_seconds": timings,
                                    "config": dataclasses.asdict(base),
                                    "summary": examples[0].summary() if examples else "", **earlier}, examples)
        return report

    def record(protocol: str, method: str, metrics: dict[str, dict]) -> None:
        for group, values in metrics.items():
            for metric, value in values.items():
                per_seed.setdefault(protocol, {}).setdefault(group, {}).setdefault(metric, {}) \
                    .setdefault(method, []).append(value)

    for seed in seeds:
        corpus = load_corpus(dataclasses.replace(base.corpus, seed=seed), progress=base.progress)
        evaluation = protocols.build(corpus)
        if seed in done:  # its figures are in per_seed; MTN's weights and the examples come from its checkpoint
            model = load_checkpoint(out / "runs" / f"amc-seed{seed}" / "checkpoint.pt").build_model()
            data = corpus_tensors(corpus, model, term_weights(corpus))
            lists = evaluation["test_lists"]
            scored = score_lists(model, data, [rl.text for rl in lists], [rl.candidates for rl in lists])
            weights.append(mtn_visual_weight(corpus, lists, scored))
            examples = examples or (corpus, lists, scored)
            log(f"seed {seed}: resumed from {out / 'eval_details.json'}")
            continue
        sizes[seed] = {p: len(v) for p, v in evaluation.items()}
        spam = None
        data = None
        for method in methods:
            cfg = dataclasses.replace(base, seed=seed, mode=method, out=str(out / "runs" / f"{method}-seed{seed}"))
            result = train(cfg, corpus)
            timings.setdefault(method, []).append(result.seconds)
            model = load_checkpoint(result.checkpoint).build_model()
            data = corpus_tensors(corpus, model, term_weights(corpus))
            spam = spam or tag_spam_masks(corpus, data, evaluation["whole_store"])
            for name, lists in evaluation.items():
                scored = learned_scores(model, data, name, lists)
                record(name, method, list_metrics(name, lists, [s["scores"] for s in scored], spam))
                if method == "amc" and name == "test_lists":
                    weights.append(mtn_visual_weight(corpus, lists, scored))
                    if examples is None:
                        examples = (corpus, lists, scored)
            summary = per_seed["random100"]["all"]
            log(f"seed {seed} {method:14s} test_lists NDCG@10 {per_seed['test_lists']['all']['ndcg@10'][method][-1]:.4f} "
                f"random100 R@1 {summary['r@1'][method][-1]:.3f} R@10 {summary['r@10'][method][-1]:.3f} "
                f"noisy R@10 {per_seed['random100']['noisy']['r@10'][method][-1]:.3f} "
                f"regional R@1 {per_seed['regional_names']['all']['r@1'][method][-1]:.3f} "
                f"whole_store R@1 {per_seed['whole_store']['all']['r@1'][method][-1]:.3f} "
                f"tag spam {per_seed['whole_store']['all']['tag_spam_top1_rate'][method][-1]:.3f} "
                f"({result.seconds:.0f} s, best epoch {result.best_epoch})")
        for name, lists in evaluation.items():
            for method, scores in text_baselines(corpus, data, lists, reference=name == "whole_store").items():
                record(name, method, list_metrics(name, lists, scores, spam))
        if seed != seeds[-1]:  # a long run leaves a report of the seeds done so far (eval.md says which)
            write(seeds[: seeds.index(seed) + 1])
    return write(seeds)


def run_in_processes(base: TrainConfig, seeds: list[int], out: Path, jobs: int, *, methods=LEARNED, log=print,
                     resume: bool = False) -> dict:
    """``run`` with each seed in a process of its own, at most ``jobs`` at a time; the reports over all seeds are
    then written from the seeds' details by ``run``'s resume path (which reloads each seed's AMC checkpoint for
    MTN's weights and the attention examples)."""
    parts = out / "seeds"
    parts.mkdir(parents=True, exist_ok=True)
    config_file = parts / "config.json"
    config_file.write_text(json.dumps(dataclasses.asdict(base), indent=2) + "\n")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    waiting, running, failed = list(seeds), {}, []
    while waiting or running:
        while waiting and len(running) < jobs:
            seed = waiting.pop(0)
            cmd = [sys.executable, "-m", "training.evaluate", "--seeds", str(seed), "--out-dir",
                   str(parts / f"seed{seed}"), "--config", str(config_file), "--methods", *methods,
                   *(["--resume-seeds"] if resume else [])]
            log_file = parts / f"seed{seed}.log"
            with open(log_file, "w") as f:
                running[seed] = (subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), time.time())
            log(f"seed {seed}: started (log: {log_file})")
        time.sleep(1.0)
        for seed, (proc, began) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[seed]
            if proc.returncode != 0:
                failed.append(seed)
            log(f"seed {seed}: {'done' if proc.returncode == 0 else 'FAILED'} in {time.time() - began:.0f} s")
    if failed:
        raise RuntimeError(f"seeds {failed} failed; see {', '.join(str(parts / f'seed{s}.log') for s in failed)}")

    merged: dict = {"per_seed": {}, "train_seconds": {}, "list_counts": {}}
    for seed in seeds:
        part = json.loads((parts / f"seed{seed}" / "eval_details.json").read_text())
        for protocol, groups in part["per_seed"].items():
            for group, metrics in groups.items():
                for metric, by_method in metrics.items():
                    for method, values in by_method.items():
                        merged["per_seed"].setdefault(protocol, {}).setdefault(group, {}).setdefault(metric, {}) \
                            .setdefault(method, []).extend(values)
        for method, seconds in part["train_seconds"].items():
            merged["train_seconds"].setdefault(method, []).extend(seconds)
        merged["list_counts"].update(part["list_counts"])
        for run_dir in (parts / f"seed{seed}" / "runs").iterdir():
            shutil.rmtree(out / "runs" / run_dir.name, ignore_errors=True)
            shutil.copytree(run_dir, out / "runs" / run_dir.name)
    merged |= {"seeds": seeds, "seeds_requested": seeds, "config": json.loads(config_file.read_text())}
    (out / "eval_details.json").write_text(json.dumps(merged, indent=2) + "\n")
    return run(base, seeds, out, methods=methods, log=log, resume=True)


def _differing(a: dict, b: dict) -> list[str]:
    """The fields in which two run configurations differ (a field one of them lacks counts)."""
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def _cells(per_seed: dict):
    """(protocol, group, metric, that group's metrics) for every cell of an eval_details ``per_seed``."""
    for protocol, groups in per_seed.items():
        for group, metrics in groups.items():
            for metric in list(metrics):
                yield protocol, group, metric, metrics


def add_earlier_baselines(out: Path, earlier: Path) -> list[str]:
    """Complete ``out``'s eval_details.json, from a run without some learned baselines, with their per-seed figures
    and training times from ``earlier`` (an eval_details.json): allowed only where the two runs' configurations differ
    in :data:`AMC_ONLY_FIELDS` alone, cover the same seeds and lists, and their text baselines, which read the same
    corpus and lists, agree to the last digit. Returns the methods taken."""
    path = out / "eval_details.json"
    now, then = json.loads(path.read_text()), json.loads(earlier.read_text())
    differing = [k for k in _differing(_affecting_results(now["config"]), _affecting_results(then["config"]))
                 if k not in AMC_ONLY_FIELDS]
    if differing:
        raise ValueError(f"--baselines-from {earlier}: its configuration differs in {differing}, which baselines read")
    if then["seeds"] != now["seeds"] or then["list_counts"] != now["list_counts"]:
        raise ValueError(f"--baselines-from {earlier}: seeds {then['seeds']} / lists differ from this run's")
    for protocol, group, metric, metrics in _cells(now["per_seed"]):
        by_method = metrics[metric]
        for method in (*TEXT_BASELINES, REFERENCE):
            old = then["per_seed"][protocol][group][metric].get(method)
            if method in by_method and not np.array_equal(old, by_method[method], equal_nan=True):
                raise ValueError(f"--baselines-from {earlier}: {method}'s {protocol} {group} {metric} differs "
                                 f"({old} vs {by_method[method]}): not the same corpus and lists")
    taken = [m for m in LEARNED if m not in now["train_seconds"]]
    missing = [m for m in taken if m not in then["train_seconds"]]
    if missing:
        raise ValueError(f"--baselines-from {earlier}: it has no figures for {missing}")
    order = (*LEARNED, *TEXT_BASELINES, REFERENCE)  # the tables' rows in the order a full run writes them
    for protocol, group, metric, metrics in _cells(now["per_seed"]):
        merged = {**metrics[metric], **{m: then["per_seed"][protocol][group][metric][m] for m in taken}}
        metrics[metric] = {m: merged[m] for m in order if m in merged}
    for method in taken:
        now["train_seconds"][method] = then["train_seconds"][method]
    fields = [k for k in _differing(now["config"], then["config"]) if k in AMC_ONLY_FIELDS]
    now["baselines_from"] = {"path": str(earlier), "methods": taken, "differing_fields": fields}
    path.write_text(json.dumps(now, indent=2) + "\n")
    return taken


def write_reports(out: Path, report: dict, details: dict, examples) -> None:
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval_details.json").write_text(json.dumps(details, indent=2) + "\n")
    plot_ndcg(report, out / "ndcg.png")
    if examples:
        plot_attention(*examples, out / "attention.png")
    (out / "eval.md").write_text(markdown(report, details))


def summarize(per_seed: dict, weights: list[dict]) -> dict:
    """Means over seeds in the shape issue 2 and issue 8 name (see reports/eval.json)."""
    report: dict = {}
    test = per_seed["test_lists"]["all"]
    for key in ("ndcg@10", "ndcg@1", "ndcg@5", "ndcg@20"):
        report[key] = {m: _mean_std(v)[0] for m, v in test[key].items()}
    report["std"] = {key: {m: _mean_std(v)[1] for m, v in test[key].items()}
                     for key in ("ndcg@10", "ndcg@1", "ndcg@5", "ndcg@20")}
    report["mtn_visual_weight"] = {k: float(np.mean([w[k] for w in weights])) if weights else float("nan")
                                   for k in ("clean_keywords", "noisy_keywords")}
    report["protocols"] = {}
    for name in protocols.PROTOCOLS:
        groups = per_seed[name]
        entry = {metric: {m: _mean_std(v)[0] for m, v in by_method.items()} for metric, by_method in groups["all"].items()}
        entry["std"] = {metric: {m: _mean_std(v)[1] for m, v in by_method.items()}
                        for metric, by_method in groups["all"].items()}
        for group in ("noisy", "clean"):
            entry[group] = {metric: {m: _mean_std(v)[0] for m, v in by_method.items()}
                            for metric, by_method in groups[group].items()}
        report["protocols"][name] = entry
    return report


def plot_ndcg(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in report["ndcg@10"]:
        means = [report[f"ndcg@{k}"][method] for k in NDCG_KS]
        stds = [report["std"][f"ndcg@{k}"][method] for k in NDCG_KS]
        ax.errorbar(NDCG_KS, means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set(xlabel="k", ylabel="NDCG@k (test, mean over seeds)", xticks=NDCG_KS, title="AMC vs baselines")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_attention(corpus: Corpus, queries, scored: list[dict], path: Path, count: int = 4) -> None:
    """Per query: its top-ranked image with the region heat map, top keywords and modality weights."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.corpus import render_emoji

    # Half name queries (one target), half keyword queries (no single target); noisy targets first.
    names = sorted((i for i, q in enumerate(queries) if q.target is not None), key=lambda i: not queries[i].noisy)
    picks = names[: count // 2]
    picks += [i for i, q in enumerate(queries) if q.target is None][: count - len(picks)]
    fig, axes = plt.subplots(len(picks), 2, figsize=(8, 2.6 * len(picks)), squeeze=False)
    for row, i in zip(axes, picks):
        q, s = queries[i], scored[i]
        best = int(np.argmax(s["scores"]))
        image = int(q.candidates[best])
        picture = np.asarray(render_emoji(corpus.chars[image]).resize((224, 224)))
        heat = s["region_attention"][best].reshape(7, 7)
        row[0].imshow(picture)
        row[0].imshow(np.kron(heat, np.ones((32, 32))), alpha=0.5, cmap="jet")
        row[0].set_title(f"query: {q.text[:40]}\nrelevance {q.relevance[best]}", fontsize=8)
        row[0].axis("off")
        kw = corpus.keywords[image]
        attention = s["keyword_attention"][best][: len(kw)]
        order = np.argsort(-attention)[:5]
        row[1].barh([kw[j][:24] for j in order][::-1], attention[order][::-1], color="tab:green")
        wv, wl = s["modality_weights"][best]
        noisy = " (noisy keywords)" if corpus.noisy[image] else ""
        row[1].set_title(f"visual {wv:.2f} / language {wl:.2f}{noisy}", fontsize=8)
        row[1].set_xlim(0, 1)
        row[1].tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(entry: dict, metrics: tuple[str, ...], std: dict | None) -> list[str]:
    methods = list(entry[metrics[0]])
    rows = ["| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for m in methods:
        cells = [f"{entry[k][m]:.4f}" + (f" ± {std[k][m]:.4f}" if std else "") for k in metrics]
        rows.append(f"| {m} | " + " | ".join(cells) + " |")
    return rows


def markdown(report: dict, details: dict) -> str:
    w = report["mtn_visual_weight"]
    seconds = {m: f"{np.mean(v):.0f}" for m, v in details["train_seconds"].items()}
    counts = details["list_counts"]
    lines = [
        "# AMC evaluation", "",
        f"Mean ± standard deviation over seeds {details['seeds']} (corpus, split and weights seeded together)"
        + ("" if details["seeds"] == details.get("seeds_requested", details["seeds"]) else
           f" (**partial**: the run asked for seeds {details['seeds_requested']}; this report holds the seeds done)")
        + ". "
        "Reproduce: `make eval` (`python -m training.evaluate --out-dir reports`). Protocols "
        "(`training/protocols.py`): **test_lists**, the log's 30-candidate test lists; **random100**, each test "
        "query's target among 99 random images; **regional_names**, the same with CLDR's regional English names "
        "of test-split emoji (text never seen in training). *noisy* / *clean*: lists whose target's auto-tagger "
        "keywords are noise / not. Lists per seed: "
        + ", ".join(f"seed {s}: " + ", ".join(f"{p} {n}" for p, n in c.items()) for s, c in counts.items()) + ".",
        "", "## test_lists", "", *_table(report, tuple(f"ndcg@{k}" for k in NDCG_KS), report["std"]), ""]
    test = report["protocols"]["test_lists"]
    for group in ("noisy", "clean"):
        lines += [f"{group} targets (name queries):", "", *_table(test[group], ("ndcg@1", "ndcg@10"), None), ""]
    for name in ("random100", "regional_names", "whole_store"):
        entry = report["protocols"][name]
        metrics = STORE_METRICS if name == "whole_store" else TARGET_METRICS
        if name == "whole_store":
            lines += ["## whole_store", "", "Each test query against every image of the corpus (what `AMCClient.search` "
                      "does). r@k, mrr: the first result of grade >= 1 (the target, a skin-tone variant, or an image "
                      "the log's rules call relevant); target_r@1: the target itself first (name queries); "
                      "tag_spam_top1_rate: the first result is a grade-0 image whose auto-tags carry every content "
                      "word of the query; hub_share: of the queries answered by a grade-0 image, the share of the "
                      f"most frequent one. `{REFERENCE}` ranks by the clean CLDR names and keywords, which no "
                      "method sees: a reference ceiling, not a baseline.", ""]
        else:
            lines += [f"## {name}", ""]
        lines += [*_table(entry, metrics, entry["std"]), ""]
        for group in ("noisy", "clean"):
            lines += [f"{group} targets:", "", *_table(entry[group], metrics, None), ""]
    lines += [
        f"MTN's mean visual weight on relevant candidates of the test lists: clean keywords "
        f"{w['clean_keywords']:.3f}, noisy keywords {w['noisy_keywords']:.3f} "
        f"(ratio {w['noisy_keywords'] / w['clean_keywords']:.2f}).", "",
        f"Mean training time per model in seconds: {seconds}.", "",
        *([f"The learned baselines {', '.join(details['baselines_from']['methods'])} are those of the earlier run "
           f"whose details this run read from `{details['baselines_from']['path']}` (`--baselines-from`; git keeps "
           f"that file): its configuration differed only in "
           f"{', '.join(details['baselines_from']['differing_fields']) or 'nothing'}, which only AMC reads, and its "
           "text baselines agreed with this run's to the last digit.", ""]
          if details.get("baselines_from") else []),
        "![NDCG@k per method](ndcg.png)", "", "![Attention on test queries](attention.png)", "",
        "What was tried to get here, step by step with figures: [eval_history.md](eval_history.md).", "",
        "## Corpus", "", "```", details["summary"], "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from training.config import add_dataclass_args, config_from_args

    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-dir", dest="out_dir", type=Path, default=Path("reports"))
    parser.add_argument("--resume-seeds", dest="resume_seeds", action="store_true",
                        help="keep the seeds a stopped run of the same configuration finished in --out-dir")
    parser.add_argument("--jobs", type=int, default=1, help="seeds evaluated at once, each in its own process")
    parser.add_argument("--methods", nargs="+", choices=LEARNED, default=list(LEARNED),
                        help="learned methods to train (amc always among them); fewer for an ablation of AMC alone")
    parser.add_argument("--baselines-from", dest="baselines_from", type=Path, default=None,
                        help="an earlier eval_details.json whose learned baselines complete this run's (its "
                             f"configuration may differ only in {', '.join(AMC_ONLY_FIELDS)}); the reports are then "
                             "rewritten with every method")
    add_dataclass_args(parser, TrainConfig)
    args = parser.parse_args(argv)
    seeds, out_dir, resume, jobs = args.seeds, args.out_dir, args.resume_seeds, args.jobs
    methods = tuple(m for m in LEARNED if m in args.methods)  # the report's order, whatever the command line's
    baselines_from = args.baselines_from
    del args.seeds, args.out_dir, args.resume_seeds, args.jobs, args.methods, args.baselines_from
    if jobs < 1:
        parser.error(f"--jobs must be >= 1, got {jobs}")
    if "amc" not in methods:
        parser.error("--methods must include amc (the report's MTN weights and attention examples are AMC's)")
    if baselines_from is not None and methods == LEARNED:
        parser.error("--baselines-from completes a run of fewer --methods; this run trains every learned method")
    try:
        base = config_from_args(TrainConfig, args)
        started = time.perf_counter()
        if jobs > 1 and len(seeds) > 1:
            report = run_in_processes(base, seeds, out_dir, jobs, methods=methods, resume=resume)
        else:
            report = run(base, seeds, out_dir, methods=methods, resume=resume)
        if baselines_from is not None and methods != LEARNED:
            taken = add_earlier_baselines(out_dir, baselines_from)
            print(f"learned baselines {taken} from {baselines_from}")
            report = run(base, seeds, out_dir, methods=LEARNED, resume=True)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"wrote {out_dir}/eval.json, eval.md, ndcg.png, attention.png in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
