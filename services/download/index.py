"""The release index: what the downloader knows about each tar of an entity, kept on disk.

Written to ``<dest>/.release/<entity_id>/index.json`` atomically (temp + fsync + rename) after
every state change, so the data service can report which release tars are absent while a
download runs, and a rerun knows what is already extracted. Schema::

    {
      "format": "multiface-release-index", "version": 1,
      "entity_id": "6795937",
      "base_url": "https://.../identities/",
      "index_url": "https://.../identities/6795937/index.html",
      "root": "m--20180227--0000--6795937--GHS",       (null until a tar has been extracted)
      "tars": [
        {"name": "metadata.tar", "md5": "<hex>" | null, "selected": true,
         "state": "absent" | "downloaded" | "verified" | "extracted" | "failed",
         "error": null | "<why it failed>", "bytes": 12345 | null},
        ...
      ]
    }

States: ``absent`` (not on disk: not selected, or not fetched yet), ``downloaded`` (all bytes
on disk, md5 not yet checked), ``verified`` (md5 matches CHECKSUM), ``extracted`` (its files are
in the entity folder; the tar itself is deleted unless ``keep_tars``), ``failed`` (``error``
says why: md5 mismatch, hostile member, HTTP error, no CHECKSUM line). Tars are listed in
``index.html`` order.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from shards.manifest import write_atomic

INDEX_FORMAT = "multiface-release-index"
INDEX_VERSION = 1
RELEASE_DIR = ".release"
INDEX_JSON = "index.json"
STATES = ("absent", "downloaded", "verified", "extracted", "failed")


@dataclass
class TarRecord:
    """State of one release tar, as stored in ``index.json``."""

    name: str
    md5: str | None
    selected: bool
    state: str = "absent"
    error: str | None = None
    bytes: int | None = None


@dataclass
class ReleaseIndex:
    """The release index of one entity (see the module docstring for the JSON schema)."""

    entity_id: str
    base_url: str
    index_url: str
    root: str | None = None
    tars: list[TarRecord] = field(default_factory=list)

    def record(self, name: str) -> TarRecord:
        for tar in self.tars:
            if tar.name == name:
                return tar
        raise KeyError(name)

    def to_json(self) -> dict:
        return {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "entity_id": self.entity_id,
            "base_url": self.base_url,
            "index_url": self.index_url,
            "root": self.root,
            "tars": [asdict(tar) for tar in self.tars],
        }


def release_dir(dest: Path, entity_id: str) -> Path:
    """``<dest>/.release/<entity_id>``: index.json, tars being downloaded and the staging folder."""
    return dest / RELEASE_DIR / entity_id


def index_path(dest: Path, entity_id: str) -> Path:
    return release_dir(dest, entity_id) / INDEX_JSON


def load_index(path: Path) -> ReleaseIndex | None:
    """Read an index written by an earlier run; None when absent or unreadable (it is then rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            return None
        tars = [TarRecord(**tar) for tar in data["tars"]]
        return ReleaseIndex(data["entity_id"], data["base_url"], data["index_url"], data.get("root"), tars)
    except (OSError, ValueError, KeyError, TypeError):
        return None


class IndexWriter:
    """Rewrites one entity's ``index.json`` atomically; safe to call from several threads."""

    def __init__(self, path: Path, index: ReleaseIndex, notify: Callable[[TarRecord], None] | None = None):
        self.path = path
        self.index = index
        self._notify = notify
        self._lock = threading.Lock()

    def update(self, name: str, persist: bool = True, **changes: object) -> TarRecord:
        """Change fields of one tar's record, rewrite the file, then tell the listener.

        Args:
            name: the tar's release name.
            persist: rewrite ``index.json`` now; False for a state that the next change follows
                at once (``downloaded`` before ``verified``), to save an fsync.
            **changes: new values of :class:`TarRecord` fields.
        """
        with self._lock:
            record = self.index.record(name)
            for key, value in changes.items():
                setattr(record, key, value)
            assert record.state in STATES, record.state
            if persist:
                self._write()
        if self._notify is not None:
            self._notify(record)
        return record

    def set_root(self, root: str) -> None:
        with self._lock:
            self.index.root = root
            self._write()

    def write(self) -> None:
        with self._lock:
            self._write()

    def _write(self) -> None:
        text = json.dumps(self.index.to_json(), indent=2, sort_keys=False) + "\n"
        write_atomic(self.path, text.encode("utf-8"))
