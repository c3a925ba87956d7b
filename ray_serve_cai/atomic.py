"""One atomic writer: `write_atomically(path, text)` — a temp file in the same directory, flushed
and fsynced, then `os.replace`, so a reader sees the old file or the new one, never half of one.

Standard library only: every layer may use it (the node's rendezvous file, Ray's autoscaling
config, `ray_cluster_info.json`, the autoscaler's decision).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_atomically(path: Path | str, text: str, *, mode: int = 0o644, unless_same: bool = False) -> bool:
    """Replace `path` with `text` atomically, the file getting `mode`; with `unless_same`, a file
    that already holds `text` is left alone. True when written."""
    target = Path(path)
    if unless_same:
        try:
            if target.read_text() == text:
                return False
        except OSError:
            pass
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return True


def write_json_atomically(path: Path | str, data: Any, *, mode: int = 0o644) -> bool:
    """`data` as indented, key-sorted JSON via `write_atomically`, unless the file already holds it."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    return write_atomically(path, text, mode=mode, unless_same=True)


__all__ = ["write_atomically", "write_json_atomically"]
