"""Conditions of a cluster's status, as KubeRay reports them next to the state word."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Condition:
    """One aspect of the cluster's status, as KubeRay reports conditions: type, true or not, a
    CamelCase reason when not, and a message naming what is missing."""

    type: str
    status: bool
    reason: str = ""
    message: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "status": self.status, "reason": self.reason, "message": self.message}
