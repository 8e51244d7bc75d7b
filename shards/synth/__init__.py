"""A synthetic Multiface entity generator: a faithful, small stand-in for the 65 TB release.

It writes one entity in the exact layout and formats of the real data (reference sections
1-2): KRT, frame list, statistics, photos, per-view and average textures, tracked meshes
(.bin, .obj, head pose) and sentence audio. Photos are rendered from the ground-truth mesh and
per-view texture with the seed's projection and nvdiffrast's rules, so a renderer fed the
files reproduces them.

Run ``multiface synth OUT_DIR`` (see ``multiface synth --help``) or call :func:`synthesize`.
Defects for tests (missing frames, corrupt files) live in :mod:`shards.synth.defects`.
"""

from shards.synth.entity import synthesize

__all__ = ["synthesize"]
