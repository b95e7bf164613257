"""Roll model versions out while Triton serves: publish, load, verify, canary, promote, roll back, gc.

    amc-rollout --repository runs/repository --url 127.0.0.1:8001 --admin-key KEY status
    amc-rollout ... publish runs/amc/checkpoint.pt      # export + validate + load + verify, no traffic yet
    amc-rollout ... canary 2 --share 0.1               # 10% of client traffic to version 2
    amc-rollout ... promote                             # the canary (or a given version) serves everything
    amc-rollout ... rollback                            # back to the version that served before
    amc-rollout ... gc --keep 3                         # unload and delete all but the newest 3 (and serving)

Why no response mixes versions: every ensemble pins one explicit version on every step
(:mod:`export.repository`). ``amc_v<N>`` is pinned to N; ``amc`` is pinned to the serving version and is the
only config a rollout rewrites. Triton reloads an ensemble by loading the new one and swapping it in, so a
request runs entirely under the old pin or entirely under the new one. The networks also carry their
version into MTN, which answers ``model_version = -1`` if they ever disagree; the client refuses such
responses and the load test counts them.

Ordering rules that keep the old version serving whatever fails:

* a new version's step directories are loaded beside the serving ones (Triton loads the added version
  and leaves loaded versions alone), then its ``amc_v<N>`` ensemble; nothing routes to it yet;
* it is verified before any traffic: golden requests through Triton must equal the PyTorch outputs saved at
  publish time, and its test NDCG@10 must not be below the serving version's by more than a margin;
* ``amc`` is re-pinned only to a version whose ensemble is ready: re-pinning to a version that is not loaded
  makes Triton unload ``amc``. If the reload fails anyway, the previous config is restored at once;
* a version that fails to load or verify is unloaded and moved to ``.failed/`` so later loads don't retry it.

The canary split is done by the clients (as gRPC's weighted clusters are): ``amc``'s config parameters
carry ``canary_version`` and ``canary_share``, and :class:`amc_client.AMCClient` sends that share of its
queries to ``amc_v<canary>``.

A fleet (``--url`` repeated, or a comma list): every replica serves the same repository (a shared volume).
A version is published once, then loaded and verified on every replica (concurrently); routing changes
(canary, promote, rollback) are made only when the versions they name are ready on every replica, and are
applied to every replica; if any replica fails a step, the step is undone on all of them (a version that
fails to load or verify anywhere is unloaded everywhere and quarantined; a routing change that fails to
reload ``amc`` anywhere is reverted everywhere), and the error names the replica.

Why one module: the ordering rules above span every operation of :class:`Rollout` (each loads, re-pins or unloads
under the same rules, on every replica, and undoes itself on all of them when one fails), so they are read against
each other in one class; its command line, :func:`main`, is under 60 lines.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from amc_contract import signatures as sig
from amc_contract.routing import Routing
from export.configs import DEVICE_KINDS, STEPS
from export.onnx_export import relative_error
from export.publish import GOLDEN, corpus_gallery, published_versions, read_manifest, repository_lock
from export.publish import publish as publish_checkpoint
from export.repository import (
    check_store_configs,
    legacy_ensembles,
    read_routing,
    set_routing,
    set_store_serving,
    store_models,
    store_paths,
    store_serving_models,
    store_serving_version,
    store_step_names,
    unpublished_paths,
    version_store_steps,
    write_atomic,
)
from export.store import Gallery
from serving.endpoints import GRPC_ADMIN_KEY_HEADER

HISTORY = ".rollout-history.json"
GOLDEN_TOLERANCE = 1e-4
# Load failures that say nothing about the version itself: retry later rather than quarantine it.
TRANSIENT = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")


T = TypeVar("T")


class RolloutError(RuntimeError):
    """A rollout step was refused or failed; the serving version is unchanged."""


def rollout_urls(urls: str | Sequence[str]) -> list[str]:
    """The replicas' gRPC addresses: one, a list, or comma lists; a duplicate or an empty entry is refused."""
    items = [u.strip() for entry in ([urls] if isinstance(urls, str) else urls) for u in entry.split(",")]
    if not items or "" in items:
        raise RolloutError(f"replica URLs must be non-empty host:port addresses, got {urls!r}")
    duplicates = sorted({u for u in items if items.count(u) > 1})
    if duplicates:
        raise RolloutError(f"replica {', '.join(duplicates)} is listed more than once")
    return items


def _on_replica(e: BaseException, url: str) -> BaseException:
    """``e`` with the replica named in its message (same type, so callers still read ``status()``)."""
    if isinstance(e, InferenceServerException):
        return InferenceServerException(f"replica {url}: {e.message()}", status=e.status())
    if isinstance(e, RolloutError):
        return RolloutError(f"replica {url}: {e}")
    return e


def admin_headers(key: str | None) -> dict[str, str]:
    """gRPC metadata for Triton's restricted model-repository protocol (gRPC prefixes the header name)."""
    return {GRPC_ADMIN_KEY_HEADER: key} if key else {}


def infer_arrays(client: grpcclient.InferenceServerClient, model: str, arrays: dict[str, np.ndarray],
                 timeout_s: float = 60.0) -> dict[str, np.ndarray]:
    """One raw request with the ensemble's inputs taken from ``arrays``; returns every ensemble output."""
    inputs = []
    for spec in sig.ENSEMBLE.inputs:
        if spec.optional and spec.name not in arrays:
            continue
        value = arrays[spec.name]
        if spec.dtype == "bytes":
            value = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
            value = value.reshape(-1, 1) if spec is sig.QUERY else value
        tensor = grpcclient.InferInput(spec.name, list(value.shape), spec.triton_datatype)
        tensor.set_data_from_numpy(value.astype(spec.numpy_dtype))
        inputs.append(tensor)
    outputs = [grpcclient.InferRequestedOutput(n) for n in sig.ENSEMBLE.output_names]
    result = client.infer(model, inputs, outputs=outputs, client_timeout=timeout_s)
    return {n: result.as_numpy(n) for n in sig.ENSEMBLE.output_names}


@dataclass
class VersionStatus:
    version: int
    ready: bool
    manifest: dict


class Rollout:
    """Operations on one serving repository and the tritonservers that serve it (one, or a fleet of replicas:
    ``url`` a list or a comma list)."""

    def __init__(self, repository: str | Path, url: str | Sequence[str], *, admin_key: str | None = None,
                 timeout_s: float = 120.0, ndcg_margin: float = 0.02, keep: int = 3, log=print) -> None:
        self.repository = Path(repository)
        self.clients = {u: grpcclient.InferenceServerClient(u) for u in rollout_urls(url)}
        self.client = next(iter(self.clients.values()))  # the first replica's
        self.headers = admin_headers(admin_key)
        self.timeout_s, self.ndcg_margin, self.keep, self.log = timeout_s, ndcg_margin, keep, log

    def close(self) -> None:
        for client in self.clients.values():
            client.close()

    def _each(self, call: Callable[[grpcclient.InferenceServerClient], T]) -> dict[str, T]:
        """``call`` on every replica (concurrently); the first replica's failure is raised, naming it."""
        if len(self.clients) == 1:
            return {url: call(client) for url, client in self.clients.items()}
        with ThreadPoolExecutor(len(self.clients)) as pool:
            futures = {url: pool.submit(call, client) for url, client in self.clients.items()}
        for url, future in futures.items():
            if future.exception() is not None:
                raise _on_replica(future.exception(), url) from future.exception()
        return {url: future.result() for url, future in futures.items()}

    def __enter__(self) -> Rollout:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading state -----------------------------------------------------------------------------
    def routing(self) -> Routing:
        return read_routing(self.repository)

    def _not_ready(self, model: str, version: str = "") -> list[str]:
        """The replicas where ``model`` (``version``) is not ready, or that do not answer."""

        def ready(client: grpcclient.InferenceServerClient) -> bool:
            try:
                return client.is_model_ready(model, version)
            except InferenceServerException:
                return False

        return [url for url, ok in self._each(ready).items() if not ok]

    def _model_ready(self, model: str) -> bool:
        return not self._not_ready(model)

    def ready(self, version: int) -> bool:
        """Whether version N's ensemble (and its store's, where it has one) is ready on every replica."""
        return all(self._model_ready(m) for m in self._ensembles(version))

    def _ensembles(self, version: int) -> list[str]:
        """Version N's pinned ensembles: ``amc_v<N>``, then ``amc_search_v<N>`` if it has a candidate store."""
        return [sig.versioned_ensemble_name(version), *store_models(self.repository, version)[1]]

    def status(self) -> dict:
        routing = self.routing()
        versions = [VersionStatus(v, self.ready(v), read_manifest(self.repository, v))
                    for v in published_versions(self.repository)]
        return {"serving_version": routing.serving_version, "canary_version": routing.canary_version,
                "canary_share": routing.canary_share, "amc_ready": self._model_ready(sig.ENSEMBLE_NAME),
                "replicas_not_ready": self._not_ready(sig.ENSEMBLE_NAME),
                "versions": [{"version": s.version, "ready": s.ready, "fingerprint": s.manifest["fingerprint"],
                              "created": s.manifest["created"],
                              "test_ndcg@10": s.manifest["metrics"].get("test_ndcg@10"),
                              "manifest": s.manifest} for s in versions]}

    # ---- loading and verifying -----------------------------------------------------------------------
    def _load(self, model: str, config: str | None = None) -> None:
        """Load (or reload) ``model`` on every replica."""
        self._each(lambda c: c.load_model(model, config=config, headers=self.headers, client_timeout=self.timeout_s))

    def _unload(self, models: list[str]) -> None:
        """Unload ``models`` on every replica; one that is not loaded there is fine."""
        for client in self.clients.values():
            for model in models:
                with contextlib.suppress(InferenceServerException):
                    client.unload_model(model, headers=self.headers)

    def load_version(self, version: int) -> None:
        """Load version N of every step (its store's too) beside what serves, then its pinned ensembles; undo on
        failure."""
        if version not in published_versions(self.repository):
            raise RolloutError(f"version {version} is not published in {self.repository}")
        steps = [s.model_name for s in STEPS] + store_models(self.repository, version)[0]
        try:
            with ThreadPoolExecutor(len(steps)) as pool:  # independent models: load them concurrently
                list(pool.map(self._load, steps))
            for step in steps:
                not_ready = self._not_ready(step, str(version))
                if not_ready:
                    raise RolloutError(f"{step} version {version} did not become ready"
                                       + (f" on replica {', '.join(not_ready)}" if len(self.clients) > 1 else ""))
            for ensemble in self._ensembles(version):
                self._load(ensemble)
        except InferenceServerException as e:
            if e.status() in TRANSIENT:
                raise RolloutError(f"loading version {version} did not finish ({e.status()}); nothing changed, "
                                   f"try again: {e.message()}") from e
            self._quarantine(version)
            raise RolloutError(f"version {version} failed to load; serving is unchanged: {e.message()}") from e
        except RolloutError:
            self._quarantine(version)
            raise

    def verify(self, version: int) -> dict:
        """Golden requests through Triton equal PyTorch; NDCG no worse than serving's minus the margin."""
        with np.load(self.repository / sig.versioned_ensemble_name(version) / GOLDEN) as archive:
            golden = dict(archive)
        try:
            by_replica = self._each(
                lambda c: infer_arrays(c, sig.versioned_ensemble_name(version), golden, self.timeout_s))
        except InferenceServerException as e:
            raise RolloutError(f"version {version} failed its golden requests: {e.message()}") from e
        for url, served in by_replica.items():
            where = f" on replica {url}" if len(self.clients) > 1 else ""
            # relative_error is inf for NaN or infinite outputs, so those can never pass.
            errors = {name: relative_error(served[name], golden[name])
                      for name in ("scores", "modality_weights", "region_attention", "keyword_attention")}
            same_order = all(np.array_equal(np.argsort(-a, kind="stable"), np.argsort(-b, kind="stable"))
                             for a, b in zip(served["scores"], golden["scores"]))
            if not np.all(served["model_version"] == version):
                raise RolloutError(f"version {version} answered with model_version "
                                   f"{np.unique(served['model_version'])}{where}")
            if max(errors.values()) > GOLDEN_TOLERANCE or not same_order:
                raise RolloutError(f"version {version}: Triton's outputs differ from its checkpoint's{where} "
                                   f"(relative errors {errors}, same ranking: {same_order})")
        mine = read_manifest(self.repository, version)["metrics"].get("test_ndcg@10")
        serving = self.routing().serving_version
        theirs = (read_manifest(self.repository, serving)["metrics"].get("test_ndcg@10")
                  if serving != version and serving in published_versions(self.repository) else None)
        if mine is not None and theirs is not None and mine < theirs - self.ndcg_margin:
            raise RolloutError(f"version {version} test NDCG@10 {mine:.4f} is below serving version {serving}'s "
                               f"{theirs:.4f} by more than the margin {self.ndcg_margin}")
        return {"relative_errors": errors, "test_ndcg@10": mine, "serving_test_ndcg@10": theirs}

    def _verify_or_quarantine(self, version: int) -> dict:
        try:
            return self.verify(version)
        except RolloutError:
            self._quarantine(version)
            raise

    def _quarantine(self, version: int) -> None:
        """Unload a failed version and move its files out of the repository so no later load retries it.

        Never a version that serves, is canary, or is a rollback target: those stay, and the error is raised.
        """
        routing = self.routing()
        if version in (routing.serving_version, routing.canary_version) or version in self._history():
            self.log(f"version {version} failed a check but is in use or a rollback target; left in place")
            return
        target = self.repository / ".failed" / f"v{version}-{time.time_ns()}"
        ensembles = self._ensembles(version)
        legacy = legacy_ensembles(self.repository, version)  # an earlier release's, removed with the version
        store_steps = store_models(self.repository, version)[0]
        for source in self._version_paths(version):
            if source.exists():
                # Step folders keep their model's name (amc_van/2 -> amc_van); ensembles are folders of their own.
                name = source.parent.name if source.parent != self.repository else source.name
                (target / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(source), str(target / name))
        self._unload(ensembles + legacy)
        for step in [s.model_name for s in STEPS] + store_steps:  # reload from disk: the removed version is
            try:                                                   # unloaded, the others stay as they are
                self._load(step)
            except InferenceServerException as e:
                self.log(f"warning: reloading {step} after quarantine: {e.message()}")
        self.log(f"version {version} unloaded and moved to {target}")

    def _version_paths(self, version: int) -> list[Path]:
        """Every folder version N has in the repository: step versions, store (an earlier release's store models of
        the version too), pinned ensemble."""
        return ([self.repository / s.model_name / str(version) for s in STEPS] + store_paths(self.repository, version)
                + [self.repository / sig.versioned_ensemble_name(version)])

    # ---- changing what serves ------------------------------------------------------------------------
    def _set_routing(self, routing: Routing) -> None:
        needed = {sig.versioned_ensemble_name(v) for v in {routing.serving_version, routing.canary_version} - {None}}
        if routing.canary_search and routing.canary_version is not None:
            needed.add(sig.versioned_search_ensemble_name(routing.canary_version))
        for model in sorted(needed):
            not_ready = self._not_ready(model)
            if not_ready:
                where = f" on replica {', '.join(not_ready)}" if len(self.clients) > 1 else ""
                raise RolloutError(f"{model} is not loaded and ready{where}; load and verify its version first")
        previous = self.routing()
        if previous.serving_version != routing.serving_version:
            try:  # before anything changes: whole-store search must be able to follow the new serving version
                check_store_configs(self.repository, version_store_steps(self.repository, routing.serving_version))
            except ValueError as e:
                raise RolloutError(f"version {routing.serving_version} cannot serve whole-store search here, nothing "
                                   f"changed: {e}") from e
        set_routing(self.repository, routing)
        try:
            self._load(sig.ENSEMBLE_NAME)
        except InferenceServerException as e:
            set_routing(self.repository, previous)
            try:
                self._load(sig.ENSEMBLE_NAME)
            except InferenceServerException as again:
                raise RolloutError(f"re-pinning amc failed ({e.message()}) and restoring the previous routing "
                                   f"failed too ({again.message()}): amc may be unloaded; its config on disk is "
                                   f"the previous one, load it with the admin key") from e
            raise RolloutError(f"re-pinning amc failed, previous routing restored: {e.message()}") from e
        if previous.serving_version != routing.serving_version:
            self._record(previous.serving_version)
            self._follow_with_store(routing.serving_version)

    def _follow_with_store(self, version: int) -> None:
        """Whole-store search follows the serving version: re-pin ``amc_search`` to version N's store, if it has one
        (else it keeps the store it serves, with a log line). A reload that fails puts the previous config back;
        ``amc`` keeps its new pin (search is the secondary path, and its error says so)."""
        if not store_models(self.repository, version)[1]:
            serving = store_serving_version(self.repository)
            if serving is not None:
                self.log(f"version {version} has no candidate store; whole-store search keeps version {serving}'s")
            return
        before = {n: (self.repository / n / "config.pbtxt").read_text() for n in store_serving_models(self.repository)}
        set_store_serving(self.repository, version)
        try:
            for name in store_serving_models(self.repository):
                self._load(name)
        except InferenceServerException as e:
            for name, text in before.items():
                write_atomic(self.repository / name / "config.pbtxt", text)
                with contextlib.suppress(InferenceServerException):
                    self._load(name)
            created = sorted(set(store_serving_models(self.repository)) - set(before))  # by this re-pin: gone
            self._unload(created)
            for name in created:
                shutil.rmtree(self.repository / name, ignore_errors=True)
            raise RolloutError(f"version {version} serves rankings, but re-pinning whole-store search to its store "
                               f"failed and search keeps the previous store: {e.message()}") from e

    def _history(self) -> list[int]:
        """Versions that served before, oldest first: what ``rollback`` walks back through."""
        path = self.repository / HISTORY
        return json.loads(path.read_text()) if path.exists() else []

    def _write_history(self, history: list[int]) -> None:
        write_atomic(self.repository / HISTORY, json.dumps(history))

    def _record(self, version: int) -> None:
        self._write_history([*self._history(), version])

    def publish(self, checkpoint: str | Path, *, eval_metrics: dict | None = None, store: Gallery | None = None,
                device_kind: str | None = None) -> int:
        """Export + validate + publish (with a candidate store built from ``store``, if given), then load and verify
        beside the serving version (no traffic yet). ``device_kind``: as ``export.publish.publish``'s."""
        version = publish_checkpoint(checkpoint, self.repository, eval_metrics=eval_metrics, store=store,
                                     device_kind=device_kind, log=self.log)
        with repository_lock(self.repository):  # publish released it; hold it while the version is checked
            self.load_version(version)
            self._verify_or_quarantine(version)
        self.log(f"version {version} loaded and verified; not serving yet")
        return version

    def canary(self, version: int, share: float) -> None:
        if not 0 < share < 1:
            raise RolloutError(f"canary share must be between 0 and 1, got {share}")
        if version == self.routing().serving_version:
            raise RolloutError(f"version {version} already serves; a canary must be another version")
        with repository_lock(self.repository):
            if not self.ready(version):
                self.load_version(version)
            self._verify_or_quarantine(version)
            current = self.routing()
            # Search splits the same way where the canary has a store (_set_routing checks it is ready).
            search = sig.versioned_search_ensemble_name(version) in store_models(self.repository, version)[1]
            self._set_routing(Routing(current.serving_version, version, share, search))
        self.log(f"canary: version {version} takes {share:.0%} of client traffic")

    def promote(self, version: int | None = None) -> int:
        with repository_lock(self.repository):
            current = self.routing()
            version = version if version is not None else current.canary_version
            if version is None:
                raise RolloutError("nothing to promote: no canary and no version given")
            if not self.ready(version):
                self.load_version(version)
                self._verify_or_quarantine(version)
            self._set_routing(Routing(version))
        self.log(f"promoted: version {version} serves all traffic")
        return version

    def rollback(self) -> int:
        """Serve the version that served before the last promote (or just end a canary)."""
        with repository_lock(self.repository):
            current = self.routing()
            if current.canary_version is not None:
                self._set_routing(Routing(current.serving_version))
                self.log(f"canary {current.canary_version} ended; version {current.serving_version} serves all")
                return current.serving_version
            published = set(published_versions(self.repository))
            history = self._history()
            while history and (history[-1] == current.serving_version or history[-1] not in published):
                history.pop()
            if not history:
                raise RolloutError("no earlier version to roll back to")
            target = history.pop()
            if not self.ready(target):
                self.load_version(target)
            self._set_routing(Routing(target))
            self._write_history(history)  # _set_routing recorded the version we left; drop it again
        self.log(f"rolled back to version {target}")
        return target

    def gc(self, keep: int | None = None) -> list[int]:
        """Unload and delete all but the newest ``keep`` versions; the serving and canary ones always stay."""
        keep = self.keep if keep is None else keep
        if keep < 1:
            raise RolloutError(f"gc must keep at least 1 version, got {keep}")
        with repository_lock(self.repository):
            routing = self.routing()
            versions = published_versions(self.repository)
            # The version whose store search serves stays too (a later version without a store left it serving).
            protected = set(versions[len(versions) - keep:]) | {routing.serving_version, routing.canary_version,
                                                                 store_serving_version(self.repository)}
            removed = [v for v in versions if v not in protected]
            # Folders of a version without its amc_v<N> are left by an interrupted publish: never published.
            orphans = unpublished_paths(self.repository, versions)
            for v in removed:
                self._unload(self._ensembles(v) + legacy_ensembles(self.repository, v))
                for path in self._version_paths(v):
                    shutil.rmtree(path, ignore_errors=True)
            for path in orphans:
                shutil.rmtree(path, ignore_errors=True)
            if removed or orphans:
                # Store steps only where they are loaded: loading one would load every version it has.
                stores = [n for n in store_step_names(self.repository) if self._model_ready(n)]
                for step in [s.model_name for s in STEPS] + stores:
                    self._load(step)
                self._write_history([v for v in self._history() if v not in removed])
        self.log(f"removed versions {removed or 'none'}; kept {sorted(set(versions) - set(removed))}"
                 + (f"; removed {len(orphans)} folders of unpublished versions" if orphans else ""))
        return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="amc-rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--url", action="append", default=None,
                        help="tritonserver gRPC address; repeat it (or give a comma list) for every replica of a "
                             "fleet serving the repository (default 127.0.0.1:8001)")
    parser.add_argument("--admin-key", default=None, help="key for Triton's restricted model-repository API")
    parser.add_argument("--ndcg-margin", type=float, default=0.02)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="what serves, what is canary, each version's manifest")
    p = sub.add_parser("publish", help="export, validate, load and verify a checkpoint as a new version")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--store-corpus", action="store_true",
                   help="with a candidate store of every image of the checkpoint's training corpus (whole-store "
                        "search follows the serving version from promote on)")
    p.add_argument("--device-kind", choices=sorted(DEVICE_KINDS), default=None,
                   help="the machine that serves, for how the search step runs and the onnxruntime flavour's "
                        "KIND_GPU / KIND_CPU where configs are new (default: this one's: gpu where onnxruntime has "
                        "its CUDA provider)")
    p = sub.add_parser("canary", help="send a share of client traffic to a version")
    p.add_argument("version", type=int)
    p.add_argument("--share", type=float, default=0.1)
    p = sub.add_parser("promote", help="serve a version (default: the canary) to all traffic")
    p.add_argument("version", type=int, nargs="?")
    sub.add_parser("rollback", help="end the canary, or go back to the previously serving version")
    p = sub.add_parser("gc", help="unload and delete old versions")
    p.add_argument("--keep", type=int, default=3)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        with Rollout(args.repository, args.url or "127.0.0.1:8001", admin_key=args.admin_key,
                     ndcg_margin=args.ndcg_margin) as r:
            if args.command == "status":
                status = r.status()
                for v in status["versions"]:
                    v.pop("manifest")
                print(json.dumps(status, indent=2))
            elif args.command == "publish":
                r.publish(args.checkpoint, store=corpus_gallery(args.checkpoint) if args.store_corpus else None,
                          device_kind=args.device_kind)
            elif args.command == "canary":
                r.canary(args.version, args.share)
            elif args.command == "promote":
                r.promote(args.version)
            elif args.command == "rollback":
                r.rollback()
            else:
                r.gc(args.keep)
    except (RolloutError, InferenceServerException, OSError, RuntimeError, ValueError) as e:
        # RuntimeError covers CheckpointError and ExportError from publish.
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command != "status":
        print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
