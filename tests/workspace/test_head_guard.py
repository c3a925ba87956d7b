"""The head's lease over real files and sockets (no Ray): two `HeadGuard`s of one cluster in one
project directory, as two head pods of a CML project see it (issue 23, item 3: exactly one GCS).

- a head whose GCS answers keeps the lease: a second head refuses, saying who holds it;
- a head that stopped cleanly released it: the next takes the next epoch at once (a `restart`);
- a head whose GCS port refuses connections (its pod or its GCS is gone) is taken over at once, and
  fenced: its own check then says the lease moved;
- every takeover claims a new epoch, never one claimed before; `down` (the directory removed) ends it.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ray_serve_cai.node.gcs_storage import gcs_root, read_failover
from ray_serve_cai.node.head_guard import HeadGuard, LeaseRefused
from ray_serve_cai.node.head_lease import read_lease

CLUSTER = "g"


def no_sleep(_: float) -> None:
    """`acquire` polls once a second; these cases never need a second look."""


def guard(project: Path, name: str) -> HeadGuard:
    return HeadGuard(project, CLUSTER, name, "127.0.0.1")


@pytest.fixture
def listening() -> Iterator[int]:
    """A port that accepts connections (a live GCS)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield int(server.getsockname()[1])


def refusing_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed on return: nothing listens there


def test_a_live_head_keeps_the_lease_and_a_second_one_refuses(tmp_path: Path, listening: int) -> None:
    first = guard(tmp_path, "ray-g-head")
    assert first.acquire(no_sleep, lambda _: None, wait_seconds=0) == 1
    first.serving(listening)
    waited: list[str] = []
    with pytest.raises(LeaseRefused) as refused:
        guard(tmp_path, "ray-g-stray").acquire(no_sleep, waited.append, wait_seconds=0)
    assert "refusing to start a second GCS for cluster 'g'" in str(refused.value)
    assert "head ray-g-head at 127.0.0.1 holds the lease (epoch 1" in str(refused.value)
    assert first.check() is None  # the holder renews: nothing moved
    assert read_lease(tmp_path, CLUSTER).epoch == 1  # type: ignore[union-attr]


def test_a_released_lease_is_taken_at_once_in_the_next_epoch(tmp_path: Path, listening: int) -> None:
    first = guard(tmp_path, "ray-g-head")
    first.acquire(no_sleep, lambda _: None, wait_seconds=0)
    first.serving(listening)
    first.release()  # SIGTERM: Ray ended, the lease released
    released = read_lease(tmp_path, CLUSTER)
    first.release()  # the launcher's `finally` after `end_ray` released it: nothing more is written
    assert read_lease(tmp_path, CLUSTER) == released
    second = guard(tmp_path, "ray-g-head")
    assert second.acquire(no_sleep, lambda _: None, wait_seconds=0) == 2
    assert second.taken_over is not None and second.taken_over.released  # a `restart`, not a failover
    record = second.record_failover("restart", second.taken_over.renewed_at, second.taken_over.renewed_at + 3)
    assert read_failover(tmp_path, CLUSTER) == record and record["epoch"] == 2 and record["seconds"] == 3


def test_a_head_whose_gcs_refuses_is_taken_over_at_once_and_fenced(tmp_path: Path) -> None:
    old = guard(tmp_path, "ray-g-head")
    old.acquire(no_sleep, lambda _: None, wait_seconds=0)
    old.serving(refusing_port())  # its GCS is gone (e.g. its pod was lost)
    new = guard(tmp_path, "ray-g-head")
    assert new.acquire(no_sleep, lambda _: None, wait_seconds=0) == 2  # no wait for the lease to expire
    assert new.taken_over is not None and not new.taken_over.released
    assert "the lease moved to epoch 2" in (old.check() or "")  # the old head stops its GCS
    assert new.check() is None

    shutil.rmtree(gcs_root(tmp_path, CLUSTER))  # `down`
    assert new.check() is None and read_lease(tmp_path, CLUSTER) is None  # nothing written back
    third = guard(tmp_path, "ray-g-head")
    assert third.acquire(no_sleep, lambda _: None, wait_seconds=0) == 1  # a new cluster starts afresh
