"""Version folders as TF Serving's file system source sees them: numeric names under a base path."""

from __future__ import annotations

import os


def numeric_versions(base_path: str) -> dict[int, str]:
    """Version number -> directory name of the numeric subdirectories of a base path.

    As TF Serving's file system source: a name made of digits is a version, leading zeros
    included ("00000123" is version 123); other names are ignored.
    """
    try:
        entries = os.listdir(base_path)
    except OSError:
        return {}
    found = {int(e): e for e in sorted(entries)
             if e.isascii() and e.isdigit() and os.path.isdir(os.path.join(base_path, e))}
    return dict(sorted(found.items()))


def has_saved_model(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("saved_model.pb", "saved_model.pbtxt"))


def disk_state(path: str) -> tuple:
    """What a version directory holds (names, sizes, modification times): a failed load is retried
    only once this changes, e.g. when a half-written copy completes."""
    state = []
    for root, _, files in os.walk(path):
        for name in files:
            try:
                info = os.stat(os.path.join(root, name))
            except OSError:
                continue
            state.append((os.path.relpath(os.path.join(root, name), path), info.st_size, info.st_mtime_ns))
    return tuple(sorted(state))
