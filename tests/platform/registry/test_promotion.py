"""Promotion through gates, champion history and rollback, on a temporary MLflow store."""

import json
import logging

import pytest
from mlflow import MlflowClient

from anchorless.errors import DataError
from anchorless.platform.registry.history import HISTORY_TAG, rollback
from anchorless.platform.registry.promotion import Guard, PromotionPolicy, decide, promote
from anchorless.platform.registry.signing import KEY_FILE, SIGNING_KEY_ENV, registry_signing_key
from anchorless.platform.registry.versions import RegistryError, format_model_rows, list_models
from anchorless.platform.data.shards import FORMAT, FORMAT_VERSION

NAME = "shapes-onenet"


@pytest.fixture
def client(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", registry_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(tmp_path / "model"))
    return client


@pytest.fixture
def shards(tmp_path):
    directory = tmp_path / "shards"
    directory.mkdir()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "num_images": 10, "shards": []}
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return str(directory)


def scripted(scores):
    calls = []

    def evaluate_fn(model_uri, shard_dir):
        version = model_uri.rsplit("/", 1)[1]
        calls.append(version)
        return dict(scores[version])

    evaluate_fn.calls = calls
    return evaluate_fn


SCORES = {
    "1": {"AP": 0.50, "AP50": 0.80, "duplicate_rate": 0.02, "latency_ms": 10.0},
    "2": {"AP": 0.40, "AP50": 0.70, "duplicate_rate": 0.02, "latency_ms": 10.0},
    "3": {"AP": 0.55, "AP50": 0.70, "duplicate_rate": 0.02, "latency_ms": 10.0},
}


def test_first_version_becomes_champion_and_a_weaker_one_is_refused(client, shards):
    evaluate_fn = scripted(SCORES)
    first = promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn)
    assert first.promoted and first.champion is None
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    weaker = promote(client, NAME, "2", shards, evaluate_fn=evaluate_fn)
    assert not weaker.promoted
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert "does not beat champion 0.5000" in weaker.table()
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.champion.decision"] == "refused"
    assert tags["promotion.champion.candidate_AP"] == "0.400000"
    assert tags["promotion.champion.champion_AP"] == "0.500000"
    assert len(tags["promotion.champion.data_sha256"]) == 64
    # v1 was scored once and its scores reused from its tags the second time.
    assert evaluate_fn.calls == ["1", "2"]


def test_a_reused_score_is_the_very_float_first_scored(client, shards):
    # 0.00965 printed to 4 places after 6-decimal rounding once read 0.0097 against the 0.0096
    # shown at the champion's own promotion.
    scores = {"1": {**SCORES["1"], "AP": 0.009649999999}, "2": {**SCORES["2"], "AP": 0.001}}
    first = promote(client, NAME, "1", shards, evaluate_fn=scripted(scores))
    second = promote(client, NAME, "2", shards, evaluate_fn=scripted(scores))
    assert second.champion_metrics["AP"] == first.candidate_metrics["AP"] == 0.009649999999


def test_a_better_gate_metric_with_a_regressed_guard_is_refused(client, shards):
    evaluate_fn = scripted(SCORES)
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn)
    decision = promote(client, NAME, "3", shards, evaluate_fn=evaluate_fn)
    assert not decision.promoted
    assert any("AP50 regressed: 0.7000 vs champion 0.8000" in reason for reason in decision.reasons)
    verdicts = {row["metric"]: row["verdict"] for row in decision.rows}
    assert verdicts == {"AP": "pass", "AP50": "FAIL", "duplicate_rate": "pass", "latency_ms": "pass"}


def test_force_needs_a_reason_and_records_it(client, shards):
    evaluate_fn = scripted(SCORES)
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn)
    with pytest.raises(RegistryError, match="--force needs a --reason"):
        promote(client, NAME, "2", shards, force=True, evaluate_fn=evaluate_fn)
    decision = promote(client, NAME, "2", shards, force=True, reason="hotfix for label map", evaluate_fn=evaluate_fn)
    assert decision.promoted and decision.forced
    tags = client.get_model_version(NAME, "2").tags
    assert tags["promotion.champion.forced"] == "true"
    assert "forced: hotfix for label map" in tags["promotion.champion.reasons"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "2"


def test_rollback_returns_to_the_previous_champion_and_keeps_history(client, shards):
    evaluate_fn = scripted({**SCORES, "3": {**SCORES["3"], "AP50": 0.85}})
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn)
    assert promote(client, NAME, "3", shards, evaluate_fn=evaluate_fn).promoted
    key = registry_signing_key(client._registry_uri)
    assert rollback(client, NAME, key=key) == ("3", "1")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert "promotion.champion.rolled_back" in client.get_model_version(NAME, "3").tags
    with pytest.raises(RegistryError, match="no previous version"):
        rollback(client, NAME, key=key)


def test_margin_and_min_mode_rules():
    policy = PromotionPolicy(metric="AP", margin=0.02, guards={"latency_ms": Guard(mode="min", relative_tolerance=0.1)})
    base = {"AP": 0.50, "latency_ms": 100.0}
    assert not decide("m", "2", "1", {"AP": 0.515, "latency_ms": 100.0}, base, policy, "x").promoted
    assert decide("m", "2", "1", {"AP": 0.525, "latency_ms": 109.0}, base, policy, "x").promoted
    assert not decide("m", "2", "1", {"AP": 0.525, "latency_ms": 111.0}, base, policy, "x").promoted


def test_duplicate_rate_of_a_champion_that_detects_nothing_is_not_a_bar():
    policy = PromotionPolicy()
    blind = {"AP": 0.0, "AP50": 0.0, "duplicate_rate": 0.0, "confident_detections": 0, "latency_ms": 10.0}
    real = {"AP": 0.06, "AP50": 0.2, "duplicate_rate": 0.05, "confident_detections": 120, "latency_ms": 10.0}
    decision = decide("m", "2", "1", real, blind, policy, "x")
    assert decision.promoted
    row = next(r for r in decision.rows if r["metric"] == "duplicate_rate")
    assert row["verdict"] == "n/a" and "no confident_detections" in row["rule"]
    assert any("not compared" in reason for reason in decision.reasons)
    # A champion that does detect keeps its duplicate rate as a bar, and old scores
    # without the count are compared as before.
    assert not decide("m", "2", "1", real, {**blind, "confident_detections": 50}, policy, "x").promoted
    assert not decide("m", "2", "1", real, {k: v for k, v in blind.items() if k != "confident_detections"}, policy, "x").promoted


def test_unknown_version_and_model_are_clear_errors(client, shards, tmp_path):
    with pytest.raises(RegistryError, match="has no version 9"):
        promote(client, NAME, "9", shards, evaluate_fn=scripted(SCORES))
    with pytest.raises(RegistryError, match="no registered model named 'nope'"):
        list_models(client, "nope")
    with pytest.raises(DataError, match="no manifest; not a shard directory"):
        promote(client, NAME, "1", str(tmp_path), evaluate_fn=scripted(SCORES))


def test_list_shows_versions_aliases_and_metrics(client, shards):
    client.set_model_version_tag(NAME, "1", "AP", "0.5")
    promote(client, NAME, "1", shards, evaluate_fn=scripted(SCORES))
    rows = list_models(client, NAME)
    assert [row["version"] for row in rows] == ["1", "2", "3"]
    assert rows[0]["aliases"] == ["champion"] and rows[0]["AP"] == 0.5
    table = format_model_rows(rows)
    assert "champion" in table and "0.5000" in table


# --------------------------------------------------------------------------- what promotion trusts


def _eval_tags(client, version):
    return {k: v for k, v in client.get_model_version(NAME, version).tags.items() if k.startswith("eval")}


def test_forged_scores_on_a_worthless_version_are_scored_again_and_it_is_not_promoted(client, shards, caplog):
    """A client that may edit versions writes AP=0.99, duplicate_rate=0 under the very tag names
    promotion caches scores in; promotion re-scores the version and refuses it."""
    worthless = {**SCORES, "2": {"AP": 0.0, "AP50": 0.0, "duplicate_rate": 0.4, "latency_ms": 10.0}}
    evaluate_fn = scripted(worthless)
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn)
    prefix = next(k for k in _eval_tags(client, "1") if k.startswith("eval.")).rsplit(".", 1)[0]
    for metric, value in {"AP": "0.99", "AP50": "0.99", "duplicate_rate": "0", "latency_ms": "1.0"}.items():
        client.set_model_version_tag(NAME, "2", f"{prefix}.{metric}", value)

    with caplog.at_level(logging.WARNING):
        decision = promote(client, NAME, "2", shards, evaluate_fn=evaluate_fn)
    assert evaluate_fn.calls == ["1", "2"]  # v2 was evaluated; v1's own signed scores were reused
    assert not decision.promoted and decision.candidate_metrics["AP"] == 0.0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert "are unsigned; scoring it again" in caplog.text
    assert client.get_model_version(NAME, "2").tags[f"{prefix}.AP"] == "0.0"  # the forgery is replaced


def test_scores_copied_from_another_version_altered_or_signed_with_another_key_are_not_trusted(client, shards):
    evaluate_fn = scripted(SCORES)
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn, signing_key=b"k1")
    champion_tags = _eval_tags(client, "1")
    for tag, value in champion_tags.items():  # v1's signed scores, signature included, onto v2
        client.set_model_version_tag(NAME, "2", tag, value)
    promote(client, NAME, "2", shards, evaluate_fn=evaluate_fn, signing_key=b"k1")
    assert evaluate_fn.calls == ["1", "2"]

    ap_tag = next(tag for tag in champion_tags if tag.endswith(".AP") and tag.startswith("eval."))
    client.set_model_version_tag(NAME, "1", ap_tag, "0.99")  # the champion's score raised
    promote(client, NAME, "3", shards, evaluate_fn=evaluate_fn, signing_key=b"k1")
    assert evaluate_fn.calls == ["1", "2", "3", "1"]
    assert client.get_model_version(NAME, "1").tags[ap_tag] == repr(0.50)

    calls = len(evaluate_fn.calls)
    extra = ap_tag.rsplit(".", 1)[0] + ".AP_bonus"  # an extra score beside signed ones voids them too
    client.set_model_version_tag(NAME, "2", extra, "1.0")
    promote(client, NAME, "2", shards, evaluate_fn=evaluate_fn, signing_key=b"k1")
    assert evaluate_fn.calls[calls:] == ["2"]
    assert extra not in client.get_model_version(NAME, "2").tags

    # Under another key nothing signed with k1 is evidence (an alias with no history yet).
    promote(client, NAME, "2", shards, alias="staging", evaluate_fn=evaluate_fn, signing_key=b"another key")
    assert evaluate_fn.calls[calls + 1:] == ["2"]


def test_the_default_key_of_a_sqlite_registry_is_a_private_file_beside_it_and_the_environment_wins(tmp_path, monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    key = registry_signing_key(uri)
    path = tmp_path / KEY_FILE
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_text().strip().encode() == key
    assert registry_signing_key(uri) == key  # created once
    monkeypatch.setenv(SIGNING_KEY_ENV, "from-the-environment")
    assert registry_signing_key(uri) == b"from-the-environment"
    monkeypatch.delenv(SIGNING_KEY_ENV)
    with pytest.raises(RegistryError, match=f"no signing key for the registry at http://registry:5000: set {SIGNING_KEY_ENV}"):
        registry_signing_key("http://registry:5000")


def test_a_tampered_champion_history_is_a_clear_error_for_rollback_and_promote(client, shards):
    evaluate_fn = scripted({**SCORES, "3": {**SCORES["3"], "AP50": 0.85}})
    key = b"registry key"
    promote(client, NAME, "1", shards, evaluate_fn=evaluate_fn, signing_key=key)
    promote(client, NAME, "3", shards, evaluate_fn=evaluate_fn, signing_key=key)
    tag = f"{HISTORY_TAG}.champion"
    signed = json.loads(client.get_registered_model(NAME).tags[tag])
    assert signed["champion"] == "3" and signed["previous"] == ["1"]

    client.set_registered_model_tag(NAME, tag, json.dumps({**signed, "previous": ["2"]}))  # roll back to v2 instead
    with pytest.raises(RegistryError, match=rf"{NAME}: tag {tag} does not match its signature"):
        rollback(client, NAME, key=key)
    with pytest.raises(RegistryError, match="does not match its signature"):
        promote(client, NAME, "2", shards, evaluate_fn=evaluate_fn, signing_key=key)
    client.set_registered_model_tag(NAME, tag, json.dumps(["2"]))  # the old, unsigned form
    with pytest.raises(RegistryError, match="is unsigned"):
        rollback(client, NAME, key=key)
    client.set_registered_model_tag(NAME, tag, json.dumps(signed))
    with pytest.raises(RegistryError, match="does not match its signature"):
        rollback(client, NAME, key=b"another key")
    client.set_registered_model_alias(NAME, "champion", "2")  # moved outside the promotion path
    with pytest.raises(RegistryError, match="written when champion was v3, but champion is v2"):
        rollback(client, NAME, key=key)
    client.set_registered_model_alias(NAME, "champion", "3")
    assert rollback(client, NAME, key=key) == ("3", "1")
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
