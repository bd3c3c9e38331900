"""Promotion through the registry: gates and guards, decided on fresh evidence.

Promotion is a decision with evidence: the candidate and the current champion are
scored on the same evaluation shards (identified by their manifest checksum), the
alias moves only if the candidate beats the champion on the gate metric by the
margin and regresses no guard metric beyond its tolerance, and the decision, both
scores and the data checksum are written as tags on the candidate version. The
champion history lives in a tag of the registered model so a rollback knows where
to go back to.

Scores are cached in the version's tags (``eval.<data sha256[:12]>.<metric>``) with an
HMAC over (model, version, data checksum, scores) in ``eval_signature.<data sha256[:12]>``,
made with the registry's signing key (see ``signing``). A cache that is unsigned, altered,
copied from another version or signed with another key is not evidence: the version is
scored again. The champion history is signed the same way (see ``history``).
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from mlflow import MlflowClient
from pydantic import BaseModel, ConfigDict, Field

from anchorless.platform.data.shards import manifest_checksum, read_manifest
from anchorless.platform.evaluation.offline import evaluate
from anchorless.platform.models.loading import load_model
from anchorless.platform.registry.history import move_alias, read_history, write_history
from anchorless.platform.registry.signing import registry_signing_key, sign, verify
from anchorless.platform.registry.versions import RegistryError, alias_version, format_metric, get_version

log = logging.getLogger(__name__)

EVAL_TAG_PREFIX = "eval"  # eval.<data sha256[:12]>.<metric>
EVAL_SIGNATURE_PREFIX = "eval_signature"  # eval_signature.<data sha256[:12]>: the HMAC of the scores
# Metrics a version is compared on; the evaluation summary has them under these names.
COMPARED_METRICS = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR100", "duplicate_rate", "confident_detections", "latency_ms",
)
# A rate guard says nothing when the champion's rate has no denominator: a champion
# that detects nothing confidently has a duplicate rate of 0 that no real model can match.
_RATE_DENOMINATORS = {"duplicate_rate": "confident_detections"}


class Guard(BaseModel):
    """A metric the candidate must not regress on."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["max", "min"] = Field(description="max: higher is better; min: lower is better")
    tolerance: float = Field(0.0, ge=0.0, description="absolute regression allowed")
    relative_tolerance: float = Field(0.0, ge=0.0, description="regression allowed as a fraction of the champion's value")


class PromotionPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: str = Field("AP", description="the gate metric the candidate must beat the champion on")
    mode: Literal["max", "min"] = "max"
    margin: float = Field(0.0, ge=0.0, description="the candidate must beat the champion by more than this")
    guards: dict[str, Guard] = Field(
        default_factory=lambda: {
            "AP50": Guard(mode="max", tolerance=0.005),
            "duplicate_rate": Guard(mode="min", tolerance=0.01),
            # Latency on a shared CPU is noisy; only a clear slow-down blocks a promotion.
            "latency_ms": Guard(mode="min", relative_tolerance=0.25),
        }
    )


@dataclass
class Decision:
    name: str
    candidate: str
    champion: str | None
    promoted: bool
    forced: bool
    reasons: list[str]
    data_sha256: str
    candidate_metrics: dict[str, float]
    champion_metrics: dict[str, float] | None
    rows: list[dict[str, Any]] = field(default_factory=list)

    def table(self) -> str:
        header = ("metric", "rule", f"candidate v{self.candidate}", f"champion v{self.champion}" if self.champion else "champion", "verdict")
        body = [
            (r["metric"], r["rule"], format_metric(r["candidate"]), format_metric(r["champion"]), r["verdict"]) for r in self.rows
        ]
        widths = [max(len(str(cell)) for cell in column) for column in zip(header, *body)]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in (header, *body)]
        lines.insert(1, "  ".join("-" * w for w in widths))
        verdict = "PROMOTED" if self.promoted else "REFUSED"
        if self.forced:
            verdict += " (forced)"
        lines.append(f"{verdict}: {'; '.join(self.reasons)}")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "candidate": self.candidate,
            "champion": self.champion,
            "promoted": self.promoted,
            "forced": self.forced,
            "reasons": self.reasons,
            "data_sha256": self.data_sha256,
            "candidate_metrics": self.candidate_metrics,
            "champion_metrics": self.champion_metrics,
        }


def measure_latency_ms(model_uri: str, image_size: int, *, repeats: int = 10) -> float:
    """Median single-image predict latency on this machine (after two warm-up runs)."""
    import torch

    model, _ = load_model(model_uri)
    model.eval()
    image = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    timings = []
    with torch.no_grad():
        for index in range(repeats + 2):
            start = time.perf_counter()
            model.predict(image)
            if index >= 2:
                timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings)


def evaluate_version(model_uri: str, shard_dir: str, **evaluate_kwargs: Any) -> dict[str, float]:
    """Score a registered version on shards: COCO metrics, duplicate rate and latency."""
    summary = evaluate(model_uri, shard_dir, **evaluate_kwargs)
    metrics = {key: float(summary[key]) for key in COMPARED_METRICS if key in summary}
    _, meta = load_model(model_uri, fold_batchnorm=False)  # only its meta is read here
    image_size = int(meta["config"]["data"]["image_size"])
    metrics["latency_ms"] = measure_latency_ms(model_uri, image_size)
    return metrics


EvaluateFn = Callable[[str, str], dict[str, float]]


def _scores_record(name: str, version: str, data_sha: str, scores: dict[str, str]) -> tuple:
    return ("scores", name, str(version), data_sha, scores)


def _cached_scores(tags: dict[str, str], name: str, version: str, data_sha: str, key: bytes) -> dict[str, float] | None:
    """The scores in the version's tags if their signature verifies, else None (saying why)."""
    prefix = f"{EVAL_TAG_PREFIX}.{data_sha[:12]}."
    written = {tag[len(prefix):]: value for tag, value in tags.items() if tag.startswith(prefix)}
    if not written:
        return None
    signature = tags.get(f"{EVAL_SIGNATURE_PREFIX}.{data_sha[:12]}")
    if not verify(key, signature, *_scores_record(name, version, data_sha, written)):
        why = "unsigned" if not signature else "not signed by this registry's promotion (altered, copied or another key)"
        log.warning("v%s: the scores in its tags for data %s are %s; scoring it again", version, data_sha[:12], why)
        return None
    return {metric: float(value) for metric, value in written.items()}


def _scores(
    client: MlflowClient, name: str, version: str, shard_dir: str, data_sha: str, evaluate_fn: EvaluateFn, key: bytes
) -> dict[str, float]:
    """Scores of a version on these shards, cached in its signed tags keyed by the data checksum."""
    tags = get_version(client, name, version).tags or {}
    cached = _cached_scores(tags, name, version, data_sha, key)
    if cached is not None:
        log.info("v%s: reusing its signed scores on data %s", version, data_sha[:12])
        return cached
    log.info("v%s: evaluating on %s", version, shard_dir)
    metrics = {metric: float(value) for metric, value in evaluate_fn(f"models:/{name}/{version}", shard_dir).items()}
    # repr: the reused score must be the very float scored now; 6 decimals once turned a
    # champion's AP 0.00965 into 0.0096 at its promotion and 0.0097 when reused.
    written = {metric: repr(value) for metric, value in metrics.items()}
    prefix = f"{EVAL_TAG_PREFIX}.{data_sha[:12]}."
    for tag in tags:
        if tag.startswith(prefix) and tag[len(prefix):] not in written:
            client.delete_model_version_tag(name, version, tag)  # a stray score would void the signature
    for metric, value in written.items():
        client.set_model_version_tag(name, version, f"{prefix}{metric}", value)
    signature = sign(key, *_scores_record(name, version, data_sha, written))
    client.set_model_version_tag(name, version, f"{EVAL_SIGNATURE_PREFIX}.{data_sha[:12]}", signature)
    return metrics


def _better(candidate: float, champion: float, mode: str, margin: float) -> bool:
    return candidate > champion + margin if mode == "max" else candidate < champion - margin


def _regressed(candidate: float, champion: float, guard: Guard) -> bool:
    allowed = guard.tolerance + guard.relative_tolerance * abs(champion)
    return candidate < champion - allowed if guard.mode == "max" else candidate > champion + allowed


def decide(
    name: str,
    candidate: str,
    champion: str | None,
    candidate_metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    policy: PromotionPolicy,
    data_sha: str,
) -> Decision:
    """The pure part of a promotion: compare two score sets under a policy."""
    rows: list[dict[str, Any]] = []
    reasons: list[str] = []
    gate_value = candidate_metrics.get(policy.metric)
    if gate_value is None:
        raise RegistryError(f"gate metric {policy.metric!r} is not among the scores: {sorted(candidate_metrics)}")
    passed = True
    if champion_metrics is None:
        reasons.append("no champion yet")
        rows.append({"metric": policy.metric, "rule": "gate", "candidate": gate_value, "champion": None, "verdict": "pass"})
    else:
        champion_gate = champion_metrics[policy.metric]
        better = _better(gate_value, champion_gate, policy.mode, policy.margin)
        sign = ">" if policy.mode == "max" else "<"
        rule = f"{sign} champion {'+' if policy.mode == 'max' else '-'} {policy.margin:g}"
        rows.append({"metric": policy.metric, "rule": rule, "candidate": gate_value, "champion": champion_gate, "verdict": "pass" if better else "FAIL"})
        if not better:
            passed = False
            reasons.append(f"{policy.metric} {gate_value:.4f} does not beat champion {champion_gate:.4f} by > {policy.margin:g}")
        for metric, guard in policy.guards.items():
            ours, theirs = candidate_metrics.get(metric), champion_metrics.get(metric)
            if ours is None or theirs is None:
                rows.append({"metric": metric, "rule": "guard", "candidate": ours, "champion": theirs, "verdict": "n/a"})
                continue
            denominator = _RATE_DENOMINATORS.get(metric)
            if denominator is not None and champion_metrics.get(denominator) == 0:
                rows.append({"metric": metric, "rule": f"guard (champion has no {denominator})", "candidate": ours, "champion": theirs, "verdict": "n/a"})
                reasons.append(f"{metric} not compared: the champion has no {denominator.replace('_', ' ')}")
                continue
            regressed = _regressed(ours, theirs, guard)
            tolerance = guard.tolerance + guard.relative_tolerance * abs(theirs)
            rule = f"{'>=' if guard.mode == 'max' else '<='} champion {'-' if guard.mode == 'max' else '+'} {tolerance:.4g}"
            rows.append({"metric": metric, "rule": rule, "candidate": ours, "champion": theirs, "verdict": "FAIL" if regressed else "pass"})
            if regressed:
                passed = False
                reasons.append(f"{metric} regressed: {ours:.4f} vs champion {theirs:.4f}")
        if passed:
            reasons.append(f"{policy.metric} {gate_value:.4f} beats champion {champion_gate:.4f}, no guard regressed")
    return Decision(
        name=name,
        candidate=str(candidate),
        champion=champion,
        promoted=passed,
        forced=False,
        reasons=reasons,
        data_sha256=data_sha,
        candidate_metrics=candidate_metrics,
        champion_metrics=champion_metrics,
        rows=rows,
    )


def promote(
    client: MlflowClient,
    name: str,
    version: str,
    shard_dir: str,
    *,
    alias: str = "champion",
    policy: PromotionPolicy | None = None,
    force: bool = False,
    reason: str | None = None,
    evaluate_fn: EvaluateFn = evaluate_version,
    signing_key: bytes | None = None,
) -> Decision:
    """Evaluate candidate and champion on the same shards and move the alias if the candidate wins.

    ``signing_key`` signs and checks the cached scores and the champion history; default the
    registry's own (``signing.registry_signing_key``).
    """
    policy = policy or PromotionPolicy()
    key = signing_key if signing_key is not None else registry_signing_key(client._registry_uri)
    version = str(version)
    get_version(client, name, version)
    if force and not reason:
        raise RegistryError("--force needs a --reason, which is recorded on the version")
    data_sha = manifest_checksum(read_manifest(shard_dir))
    champion = alias_version(client, name, alias)
    if champion == version:
        raise RegistryError(f"{name} v{version} is already {alias}")
    history = read_history(client, name, alias, key)  # before any work: a tampered one stops here
    candidate_metrics = _scores(client, name, version, shard_dir, data_sha, evaluate_fn, key)
    champion_metrics = _scores(client, name, champion, shard_dir, data_sha, evaluate_fn, key) if champion else None
    decision = decide(name, version, champion, candidate_metrics, champion_metrics, policy, data_sha)
    if force and not decision.promoted:
        decision.promoted = True
        decision.forced = True
        decision.reasons.append(f"forced: {reason}")
    tags = {
        f"promotion.{alias}.decision": "promoted" if decision.promoted else "refused",
        f"promotion.{alias}.forced": str(decision.forced).lower(),
        f"promotion.{alias}.reasons": "; ".join(decision.reasons)[:5000],
        f"promotion.{alias}.data_sha256": data_sha,
        f"promotion.{alias}.champion": champion or "",
        f"promotion.{alias}.candidate_{policy.metric}": f"{candidate_metrics[policy.metric]:.6f}",
        f"promotion.{alias}.champion_{policy.metric}": f"{champion_metrics[policy.metric]:.6f}" if champion_metrics else "",
        f"promotion.{alias}.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for tag, value in tags.items():
        client.set_model_version_tag(name, version, tag, value)
    if decision.promoted:
        move_alias(client, name, alias, version)  # first: a refused move leaves the history as it was
        write_history(client, name, alias, version, history + ([champion] if champion else []), key)
    return decision
