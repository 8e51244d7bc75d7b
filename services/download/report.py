"""What a download run did: per entity, the final state of every release tar."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.download.index import TarRecord


@dataclass
class EntityReport:
    """What happened to one entity.

    Attributes:
        entity_id: e.g. ``6795937``.
        root: the entity folder under ``dest`` (None if no tar was extracted).
        index_path: its ``index.json``.
        tars: every tar of the release with its final state.
    """

    entity_id: str
    root: Path | None
    index_path: Path
    tars: list[TarRecord]

    @property
    def failed(self) -> list[TarRecord]:
        return [tar for tar in self.tars if tar.state == "failed"]


@dataclass
class DownloadReport:
    """Outcome of :func:`download_release`.

    Attributes:
        dest: the destination folder.
        entities: one report per entity, in config order.
        warnings: settings that selected nothing, tar names this downloader does not know.
    """

    dest: Path
    entities: list[EntityReport] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[tuple[str, TarRecord]]:
        """(entity id, record) of every selected tar that was not extracted."""
        return [(entity.entity_id, tar) for entity in self.entities for tar in entity.failed]

    @property
    def ok(self) -> bool:
        return not self.failed
