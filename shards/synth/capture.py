"""What a synthetic capture session contains: entity name, expressions and frame numbers.

Everything here derives from the seed and the requested counts, so two runs with the same
arguments name every folder and file identically.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import numpy as np

EXPRESSIONS = (
    "E057_Cheeks_Puffed",
    "E061_Lips_Puffed",
    "SEN_approach_your_interview_with_statuesque_composure",
    "EXP_ROM07_Facial_Expressions",
    "E001_Neutral_Eyes_Open",
    "E008_Smile_Mouth_Closed",
    "E006_Jaw_Drop_Brows_Up",
    "SEN_allow_each_child_to_have_an_ice_pop",
    "EXP_free_face",
    "E019_Frown",
    "E022_Raise_Inner_Eyebrows",
    "E026_Oooo",
    "E009_Smile_Mouth_Open",
    "SEN_dont_ask_me_to_carry_an_oily_rag_like_that",
    "E064_Raise_Right_Eyebrow",
    "E012_Jaw_Open_Huge_Smile",
    "E058_Right_Cheek_Puffed",
    "E035_Lips_Together_Pushed_Forward",
    "SEN_she_had_your_dark_suit_in_greasy_wash_water_all_year",
    "E005_Eyes_Wide_Open",
)
"""Expressions in the order they are used: the first two are the seed's mini set, the third
is a read sentence (with audio), the fourth a range-of-motion take (the seed's default test
prefix ``EXP_ROM``)."""

FRAME_STEP = 3
"""The release keeps every third frame of the 30 fps capture (e.g. 021897, 021900, ...)."""

MAX_FRAMES = 10000


@dataclass(frozen=True)
class CapturePlan:
    """Names of one synthetic entity's folders and files.

    Attributes:
        root_name: ``m--YYYYMMDD--HHMM--<ENTITY_ID>--GHS``.
        expressions: expression names, in frame-list order.
        frames: per expression, its 6-digit frame numbers in capture order.
    """

    root_name: str
    expressions: tuple[str, ...]
    frames: tuple[tuple[str, ...], ...]

    @property
    def entity_id(self) -> str:
        return self.root_name.split("--")[3]

    def frame_list(self) -> list[tuple[str, str]]:
        """(expression, frame) pairs in the order of ``frame_list.txt``."""
        return [
            (expression, frame)
            for expression, frames in zip(self.expressions, self.frames, strict=True)
            for frame in frames
        ]


def capture_plan(seed: int, num_expressions: int, num_frames: int) -> CapturePlan:
    """Name the entity and number its frames.

    Frame numbers count up through the session: each expression is a run of consecutive
    kept frames (step 3), separated from the next by a pause of a few hundred frames.
    """
    rng = np.random.default_rng([seed, 1])
    day = datetime.date(2017, 10, 1) + datetime.timedelta(days=int(rng.integers(0, 800)))
    clock = "0000" if rng.random() < 0.7 else f"{int(rng.integers(8, 19)):02d}{int(rng.integers(0, 60)):02d}"
    entity_id = str(int(rng.integers(1_000_000, 10_000_000)))
    root_name = f"m--{day:%Y%m%d}--{clock}--{entity_id}--GHS"

    frames = []
    first = int(rng.integers(100, 20000))
    for _ in range(num_expressions):
        frames.append(tuple(f"{first + FRAME_STEP * k:06d}" for k in range(num_frames)))
        first += FRAME_STEP * (num_frames + int(rng.integers(100, 600)))
    return CapturePlan(root_name, EXPRESSIONS[:num_expressions], tuple(frames))
