"""Project files (`/api/v2/projects/{project_id}/files…`): the project folder the workloads see.

CML mounts a project's files at `/home/cdsw` in every workload; here that folder is the project's
directory, the working directory of its job runs and applications, so a file uploaded through the API
is what a workload reads and a file a workload writes is what the API lists and downloads.

The five operations of the spec: `UploadFile` (multipart, each part's form-field name is the
destination path relative to the project root; parents are created, an existing file is replaced
atomically), `ListProjectFiles` (the entries of a directory, or the file itself, as `FileInfo`),
`DownloadProjectFile` (`POST …/files/{path}:download`, the raw bytes), `DeleteProjectFile` (a file or
a whole directory) and `UpdateProjectFileMetadata` (`FileInfo.path` renames or moves). Paths are
relative to the project root; `""`, `"."` and `"/"` are the root itself; a path that leaves the project
(`..`, a symlink pointing out) is refused with 400/3.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from ray_serve_cai.workspace.errors import invalid_argument, not_found

ROOT_ALIASES = frozenset({"", ".", "/"})


def relative_path(raw: str) -> PurePosixPath:
    """The project-relative path a request names (leading `/` and `/home/cdsw/` are accepted)."""
    text = raw.strip()
    if text.startswith("/home/cdsw"):
        text = text[len("/home/cdsw") :]
    text = text.lstrip("/")
    if text in ROOT_ALIASES:
        return PurePosixPath(".")
    path = PurePosixPath(text)
    if ".." in path.parts:
        raise invalid_argument(f"path {raw!r} must stay inside the project (no '..')")
    return path


def resolve(project_dir: Path, raw: str, *, must_exist: bool = True) -> Path:
    """The file or directory `raw` names inside `project_dir` (404 when `must_exist` and it is absent).

    The answer is not resolved (a symlink stays a symlink), but where it leads must be in the project."""
    root = project_dir.resolve()
    target = root / relative_path(raw)
    real = target.resolve()
    if real != root and root not in real.parents:
        raise invalid_argument(f"path {raw!r} must stay inside the project")
    if must_exist and not (target.exists() or target.is_symlink()):
        raise not_found(f"no file or directory {raw!r} in the project")
    return target


def file_info(project_dir: Path, path: Path) -> dict[str, Any]:
    """`FileInfo`: `path` relative to the project root, `is_dir`, `file_size` (int64 string, files only)."""
    root = project_dir.resolve()
    relative = path.relative_to(root).as_posix() if path != root else "."
    if path.is_dir():
        return {"path": relative, "is_dir": True}
    return {"path": relative, "is_dir": False, "file_size": str(path.stat().st_size)}


def list_files(project_dir: Path, raw: str) -> dict[str, Any]:
    """`ListProjectFilesResponse` for a directory (its entries, sorted by name) or a file (itself)."""
    target = resolve(project_dir, raw)
    if target.is_dir():
        entries = sorted(target.iterdir(), key=lambda p: p.name)
        return {"files": [file_info(project_dir, entry) for entry in entries if entry.exists()]}
    return {"files": [file_info(project_dir, target)]}


def read_file(project_dir: Path, raw: str) -> Path:
    """The file `DownloadProjectFile` sends (a directory is refused: 400/3)."""
    target = resolve(project_dir, raw)
    if target.is_dir():
        raise invalid_argument(f"{raw!r} is a directory; download its files one by one")
    return target


def write_file(project_dir: Path, raw: str, content: bytes) -> Path:
    """One `UploadFile` part: write `content` to `raw` (parents created, replaced atomically)."""
    relative = relative_path(raw)
    if str(relative) == ".":
        raise invalid_argument("an uploaded file needs a destination path (the form field name)")
    target = resolve(project_dir, raw, must_exist=False)
    if target.is_dir():
        raise invalid_argument(f"{raw!r} is a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".upload")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(content)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def delete_file(project_dir: Path, raw: str) -> None:
    """`DeleteProjectFile`: a file, or a directory with everything in it (never the project root)."""
    target = resolve(project_dir, raw)
    if target == project_dir.resolve():
        raise invalid_argument("the project root cannot be deleted through the files API")
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    else:
        target.unlink()


def rename_file(project_dir: Path, raw: str, new_raw: str) -> dict[str, Any]:
    """`UpdateProjectFileMetadata`: move `raw` to `new_raw` (parents created; an existing file there is
    replaced, an existing directory is refused); answers the new `FileInfo`."""
    source = resolve(project_dir, raw)
    if source == project_dir.resolve():
        raise invalid_argument("the project root cannot be renamed")
    if str(relative_path(new_raw)) == ".":
        raise invalid_argument("path (the new name) is required")
    destination = resolve(project_dir, new_raw, must_exist=False)
    if destination.is_dir():
        raise invalid_argument(f"path {new_raw!r} is an existing directory")
    destination.parent.mkdir(parents=True, exist_ok=True)
    os.replace(source, destination)
    return file_info(project_dir, destination)
