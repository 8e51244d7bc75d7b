"""The download config: which entities, assets and expressions to fetch from the release.

Same JSON as the seed's ``download_config.json`` (reference section 2.2)::

    {"entity": ["6795937"], "image": true, "mesh": true, "texture": true,
     "metadata": true, "audio": true, "expression": ["E057_Cheeks_Puffed", "E061_Lips_Puffed"]}

Every key is required. Unknown keys are refused (a misspelt ``"images"`` would otherwise select
nothing without a word), and so is a config that selects no tar at all. Repeated entities or
expressions are kept once (the seed's full config lists ``GAZ_G4_Head_movement_Partial`` twice).
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.download.errors import ConfigError

ENTITY_ID_RE = re.compile(r"^[0-9A-Za-z]+$")
RELEASE_EXPRESSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]*$")
"""Expression names in the release: letters, digits, ``_`` and ``-`` (``SEN_a_voice_spoke_near-at-hand``)."""

ASSET_KEYS = ("image", "mesh", "texture", "metadata", "audio")
PER_EXPRESSION_KEYS = ("image", "mesh", "texture")
ALL_KEYS = ("entity", *ASSET_KEYS, "expression")
EXAMPLE = (
    '{"entity": ["6795937"], "image": true, "mesh": true, "texture": true, "metadata": true, '
    '"audio": true, "expression": ["E057_Cheeks_Puffed", "E061_Lips_Puffed"]}'
)


@dataclass(frozen=True)
class DownloadConfig:
    """A validated download config.

    Attributes:
        entities: entity ids, e.g. ``("6795937",)``, in config order, each once.
        image: fetch ``images--<EXP>[_cam<CAM>].tar`` of the selected expressions.
        mesh: fetch ``tracked_mesh--<EXP>.tar`` of the selected expressions.
        texture: fetch ``unwrapped_uv_1024--<EXP>[_cam<CAM>].tar`` of the selected expressions.
        metadata: fetch ``metadata.tar`` (KRT, frame list, means and variances).
        audio: fetch ``audio.tar`` (the ``SEN_*`` sentences' wav files).
        expressions: expression names, in config order, each once.
    """

    entities: tuple[str, ...]
    image: bool
    mesh: bool
    texture: bool
    metadata: bool
    audio: bool
    expressions: tuple[str, ...]

    def __post_init__(self) -> None:
        for entity in self.entities:
            if not isinstance(entity, str) or not ENTITY_ID_RE.match(entity):
                raise ConfigError(
                    f"entity: {entity!r} is not an entity id; use the release folder's id such as "
                    '"6795937" (letters and digits, as a string: "002645310" keeps its zeros)',
                    key="entity",
                )
        for expression in self.expressions:
            if not isinstance(expression, str) or not RELEASE_EXPRESSION_RE.match(expression):
                raise ConfigError(
                    f"expression: {expression!r} is not an expression name; use names such as "
                    '"E057_Cheeks_Puffed" (letters, digits, "_" and "-")',
                    key="expression",
                )
        if not self.entities:
            raise ConfigError(
                'entity: the list is empty; name at least one entity, e.g. ["6795937"]', key="entity"
            )
        if not any(getattr(self, key) for key in ASSET_KEYS):
            raise ConfigError(
                f"the config selects nothing: all of {', '.join(ASSET_KEYS)} are false; set at least one to true"
            )
        per_expression = [key for key in PER_EXPRESSION_KEYS if getattr(self, key)]
        if per_expression and not self.expressions:
            raise ConfigError(
                f"expression: the list is empty, so {', '.join(per_expression)} would download nothing; "
                'list expressions such as ["E057_Cheeks_Puffed"] or set those keys to false',
                key="expression",
            )

    @classmethod
    def from_dict(cls, data: Any, source: str = "download config") -> DownloadConfig:
        """Validate a parsed JSON config.

        Args:
            data: the parsed JSON object.
            source: where it came from (a file name), used in error messages.

        Raises:
            ConfigError: naming the key, what was expected and how to fix it.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a JSON object like {EXAMPLE}, found {type(data).__name__}")
        for key in data:
            if key not in ALL_KEYS:
                close = difflib.get_close_matches(str(key), ALL_KEYS, n=1)
                hint = f'; did you mean "{close[0]}"?' if close else ""
                raise ConfigError(
                    f"{source}: unknown key {key!r}{hint} The keys are: {', '.join(ALL_KEYS)}", key=str(key)
                )
        for key in ALL_KEYS:
            if key not in data:
                kind = "true or false" if key in ASSET_KEYS else "a list of strings"
                raise ConfigError(
                    f'{source}: missing key "{key}"; add "{key}": {kind} (example: {EXAMPLE})', key=key
                )
        for key in ASSET_KEYS:
            if not isinstance(data[key], bool):
                raise ConfigError(
                    f'{source}: "{key}" must be true or false (JSON booleans), found {data[key]!r}', key=key
                )
        lists = {key: _string_list(data[key], key, source) for key in ("entity", "expression")}
        try:
            return cls(
                entities=tuple(dict.fromkeys(lists["entity"])),
                expressions=tuple(dict.fromkeys(lists["expression"])),
                **{key: data[key] for key in ASSET_KEYS},
            )
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}", key=error.key) from None

    def to_dict(self) -> dict[str, Any]:
        """The config as the seed's JSON object."""
        return {
            "entity": list(self.entities),
            **{key: getattr(self, key) for key in ASSET_KEYS},
            "expression": list(self.expressions),
        }


def _string_list(value: Any, key: str, source: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(
            f'{source}: "{key}" must be a list of strings, e.g. "{key}": '
            + ('["6795937"]' if key == "entity" else '["E057_Cheeks_Puffed"]')
            + f", found {value!r}",
            key=key,
        )
    return value


def load_config(path: str | Path) -> DownloadConfig:
    """Read and validate a download config file.

    Raises:
        ConfigError: the file is missing, is not JSON, or does not validate; the message names the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            f"{path}: cannot read the download config ({error.strerror}); check --config"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{path}, line {error.lineno} column {error.colno}: not valid JSON ({error.msg}); example: {EXAMPLE}"
        ) from None
    return DownloadConfig.from_dict(data, source=str(path))


def as_config(config: DownloadConfig | Mapping[str, Any] | str | Path) -> DownloadConfig:
    """Accept a config object, a parsed JSON mapping, or a path to a JSON file."""
    if isinstance(config, DownloadConfig):
        return config
    if isinstance(config, Mapping):
        return DownloadConfig.from_dict(config)
    return load_config(config)
