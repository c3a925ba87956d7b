"""The head lease's decisions (pure): who may start a GCS, and when a running head is fenced;
the relay's epoch filter; the config field that turns head fault tolerance on; where the store is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ray_serve_cai.config import head_node, worker_node
from ray_serve_cai.config.cluster import head_spec_hash, parse_cluster_spec
from ray_serve_cai.node.gcs_relay import EpochFilter, Target
from ray_serve_cai.node.gcs_storage import APPLIED_SPEC_VARIABLE, cluster_uid, storage_path
from ray_serve_cai.node.head_lease import LEASE_TTL_SECONDS, Lease, decide, fenced

NOW = 1_000_000.0


def lease(epoch: int = 3, holder: str = "old", age: float = 1.0, released: bool = False) -> Lease:
    return Lease(epoch, holder, "ray-c-head", "10.0.0.5", NOW - age, released)


@pytest.mark.parametrize(
    ("current", "claimed", "action", "epoch"),
    [
        (None, 0, "take", 1),  # a first head
        (None, 7, "take", 8),  # the lease file is gone but epochs were claimed: never reuse one
        (lease(), 3, "wait", 3),  # a live head holds it: wait (then refuse)
        (lease(age=LEASE_TTL_SECONDS + 1), 3, "take", 4),  # killed head: its lease expired
        (lease(released=True), 3, "take", 4),  # a head that stopped cleanly: no wait
        (lease(holder="me"), 3, "renew", 3),  # our own lease
        (lease(holder="me"), 4, "wait", 3),  # our epoch was claimed past us: do not renew
    ],
)
def test_lease_decisions(current: Lease | None, claimed: int, action: str, epoch: int) -> None:
    decision = decide(current, "me", NOW, claimed)
    assert (decision.action, decision.epoch) == (action, epoch)


def test_a_holder_whose_gcs_refuses_connections_is_taken_over_at_once() -> None:
    serving = Lease(3, "old", "ray-c-head", "10.0.0.5", NOW - 1, serving=True, gcs_port=6379)
    assert decide(serving, "me", NOW, 3, holder_gone=True).action == "take"
    assert decide(serving, "me", NOW, 3, holder_gone=False).action == "wait"
    starting = Lease(3, "old", "ray-c-head", "10.0.0.5", NOW - 1, serving=False)  # its GCS is not up yet
    assert decide(starting, "me", NOW, 3, holder_gone=True).action == "wait"


def test_a_waiting_head_says_who_holds_the_lease() -> None:
    decision = decide(lease(age=4), "me", NOW, 3)
    assert "ray-c-head at 10.0.0.5 holds the lease (epoch 3, renewed 4s ago)" in decision.reason


def test_a_takeover_remembers_the_previous_lease_only_when_it_was_not_released() -> None:
    expired = decide(lease(age=60), "me", NOW, 3)
    assert expired.previous is not None and not expired.previous.released
    assert decide(None, "me", NOW).previous is None


def test_fencing() -> None:
    assert fenced(lease(holder="me"), "me", 3) is None
    assert fenced(None, "me", 3) is None  # removed by `down`: the head is going anyway
    assert "epoch 4" in (fenced(lease(epoch=4, holder="new"), "me", 3) or "")
    assert fenced(lease(epoch=3, holder="other"), "me", 3) is not None


def test_the_relay_follows_only_the_newest_epoch() -> None:
    chosen = EpochFilter()
    new = Target("10.0.0.9", 6379, "b", epoch=5)
    assert chosen.accept(new) == new
    assert chosen.accept(Target("10.0.0.5", 6379, "a", epoch=4)) is None  # a stale head's file
    assert chosen.accept(None) is None
    restarted = Target("10.0.0.9", 6379, "c", epoch=5)  # restarted in place: same epoch
    assert chosen.accept(restarted) == restarted


def test_head_fault_tolerance_is_on_by_default_and_reaches_every_node() -> None:
    spec = parse_cluster_spec({"ray_cluster": {"name": "c", "num_workers": 1}}, env={})
    assert spec.head_fault_tolerance
    assert head_node(spec).environment["RAY_CAI_HEAD_FT"] == "1"
    assert worker_node(spec, "worker", 0).environment["RAY_CAI_HEAD_FT"] == "1"
    off = parse_cluster_spec({"ray_cluster": {"name": "c", "head_fault_tolerance": False}}, env={})
    assert head_node(off).environment["RAY_CAI_HEAD_FT"] == "0"
    assert head_spec_hash(off) != head_spec_hash(spec)  # changing it replaces the nodes


def test_status_reports_the_heads_view_else_what_the_spec_says() -> None:
    from ray_serve_cai.cli.cluster import _fault_tolerance_line
    from ray_serve_cai.cluster.status import ClusterStatus

    spec = parse_cluster_spec({"ray_cluster": {"name": "c"}}, env={})
    down = ClusterStatus("c", "p", "starting", [], desired=[head_node(spec)])
    assert down.as_dict()["head_fault_tolerance"] == {"enabled": True, "storage": "rocksdb", "epoch": None}
    failover = {"kind": "new head", "at": "2026-12-06T10:51:26+00:00", "seconds": 38.5, "epoch": 2}
    reported = {"enabled": True, "storage": "rocksdb", "epoch": 2, "last_failover": failover}
    up = ClusterStatus("c", "p", "ready", [], ray={"head_fault_tolerance": reported})
    assert up.as_dict()["head_fault_tolerance"]["epoch"] == 2
    line = _fault_tolerance_line(up.head_fault_tolerance) or ""
    assert (
        line.startswith("head fault tolerance: on (rocksdb, epoch 2); last failover: new head at")
        and "38.5s" in line
    )
    # The head of a later epoch, taking over, has not written its record yet: the last one is named
    # by its epoch, not shown as this epoch's.
    later = _fault_tolerance_line({**reported, "epoch": 3}) or ""
    assert "(rocksdb, epoch 3); last failover (epoch 2): new head at" in later, later
    assert (
        _fault_tolerance_line({"enabled": False})
        == "head fault tolerance: off (a head restart loses Ray's state)"
    )


def test_the_store_is_keyed_by_the_applied_records_uid(tmp_path: Path) -> None:
    """The head's GCS store: `.ray-cai/<cluster>/gcs/<uid>`, the uid from the applied record on the
    head (a new cluster of the same name has a new one); without a record, one created once."""
    record = json.dumps({"spec": {}, "cluster_uid": "0123abcd"})
    assert cluster_uid(tmp_path, "c", {APPLIED_SPEC_VARIABLE: record}) == "0123abcd"
    assert storage_path(tmp_path, "c", "0123abcd") == tmp_path / ".ray-cai" / "c" / "gcs" / "0123abcd"
    made = cluster_uid(tmp_path, "c", {})
    assert made.isalnum() and made != "0123abcd" and cluster_uid(tmp_path, "c", {}) == made
    assert cluster_uid(tmp_path, "other", {}) != made  # never shared between clusters
