"""Finish decoding a batch on the training device: the texture and photo arithmetic of
``shards.decode.decode_sample``, done once per batch on the GPU instead of per sample on the CPU.

With ``ShardStream(device_finish=True)`` the DataLoader workers only decompress images
(``shards.decode.decode_stored``: uint8, as stored; ``delta-zstd`` images still row-filtered,
``delta-rice`` images still packed, decoded here by ``trainer.gpu_rice``)
and the batch crosses pinned memory and PCIe as uint8, a quarter of the float32 bytes.
:func:`undo_up_filter` restores the pixels of a row-filtered batch on the device. After ``to_device``, :func:`finish_on_device`
flips, masks, normalises and (only when ``tex_size`` differs from the stored side) resizes, and
returns the same fields as ``decode_sample``: bit-exact without a resize (IEEE float32 on CPU
and CUDA), within float32 rounding of ``cv2.resize`` with one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as functional

from shards.decode import IMAGE_SHAPES_FIELD, ROW_FILTER_FIELD, EntityMetadata, packed_shapes

IMAGE_FIELDS = ("photo", "tex", "avg_tex")


@dataclass
class TextureStatistics:
    """The texture statistics at the stored resolution, on the training device.

    Attributes:
        texmean: (T, T, 3) float32 mean texture, flipped vertically (as ``EntityMetadata``).
        texstd: () float32 standard deviation (a tensor so division is IEEE float32 division,
            as numpy's, not a multiplication by a reciprocal).
    """

    texmean: torch.Tensor
    texstd: torch.Tensor
    byte_max: torch.Tensor | None = None

    def __post_init__(self) -> None:
        # 255 as a device tensor, made once: photo / 255 is then IEEE division, as numpy's, and
        # no batch pays a host-to-device copy (from pageable memory that waits for the GPU).
        if self.byte_max is None:
            self.byte_max = torch.tensor(255.0, dtype=torch.float32, device=self.texstd.device)

    @classmethod
    def build(cls, meta: EntityMetadata, device: torch.device) -> TextureStatistics:
        return cls(
            texmean=torch.from_numpy(meta.texmean).to(device),
            texstd=torch.tensor(meta.texstd, dtype=torch.float32, device=device),
        )


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, T, T) -> (N, C, size, size), cv2.resize INTER_LINEAR semantics (half-pixel, no antialias)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images  # cv2.resize to the same size is a copy
    return functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


def normalise_textures(
    textures: torch.Tensor, stats: TextureStatistics, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of stored textures -> (normalised, unseen mask), as ``shards.decode.normalise_texture``.

    Args:
        textures: (N, T, T, 3) uint8 as stored (not flipped), on the device.
        stats: texture statistics at T, same device.
        size: output side.

    Returns:
        (normalised (N, 3, size, size) float32 with unseen texels 0, unseen (N, 3, size, size)
        float32 resized; 1 where the texel was unseen).
    """
    flipped = torch.flip(textures, dims=(1,))
    unseen = flipped == 0
    normalised = (flipped.to(torch.float32) - stats.texmean) / stats.texstd
    normalised = normalised.masked_fill_(unseen, 0.0).permute(0, 3, 1, 2)
    unseen_chw = unseen.permute(0, 3, 1, 2).to(torch.float32)
    return _resize(normalised, size).contiguous(), _resize(unseen_chw, size).contiguous()


def undo_up_filter(images: torch.Tensor) -> torch.Tensor:
    """Pixels of a batch of row-filtered images (``shards.codecs.decompress_dzst``): each row is
    the sum of the filtered rows above it and itself, modulo 256 (exact integer arithmetic).

    Args:
        images: (N, H, W, C) uint8, row r holding row r minus row r - 1 (mod 256).

    Returns:
        (N, H, W, C) uint8 pixels.
    """
    return torch.cumsum(images, dim=1, dtype=torch.int32).bitwise_and_(255).to(torch.uint8)


def unpack_rice(batch: dict, filters: list[str], shapes: list[str] | None) -> None:
    """Decode a batch's packed ``delta-rice`` images in place (``trainer.gpu_rice``).

    Every sample of the batch must be packed and of one shape per image (one manifest holds
    one image form, and a batch of packed images of different sizes cannot be collated).
    """
    from trainer.gpu_rice import decode_batch

    if shapes is None or any(kind != "rice" for kind in filters) or len(set(shapes)) != 1:
        raise ValueError(
            "a batch mixing delta-rice samples with other forms or image sizes: "
            f"forms {sorted(set(filters))}, shapes {sorted(set(shapes or []))}"
        )
    for name, shape in packed_shapes(shapes[0]).items():
        batch[name] = decode_batch(batch[name], shape)


def finish_on_device(batch: dict, stats: TextureStatistics, tex_size: int) -> dict:
    """Turn a batch of ``decode_stored`` samples into ``decode_sample``'s fields, in place.

    Args:
        batch: a collated batch on the device: ``tex``, ``avg_tex`` (N, T, T, 3) uint8 and
            ``photo`` (N, H, W, 3) uint8 where present, plus the small fields (unchanged).
        stats: texture statistics at the stored side T, on the same device.
        tex_size: the model's texture side.

    Returns:
        ``batch`` with ``tex``, ``avg_tex`` (N, 3, S, S) float32 normalised, ``mask``
        (N, 3, S, S) float32 (present when ``tex`` is) and ``photo`` (N, H, W, 3) float32 in [0, 1].
    """
    filters = batch.pop(ROW_FILTER_FIELD, None)  # per sample "up", "rice" or "none" (host strings)
    shapes = batch.pop(IMAGE_SHAPES_FIELD, None)
    if filters is not None and "rice" in filters:
        unpack_rice(batch, filters, shapes)
    elif filters is not None and "up" in filters:
        rows = [index for index, kind in enumerate(filters) if kind == "up"]
        for name in IMAGE_FIELDS:
            if name in batch:
                images = batch[name]
                if len(rows) == len(filters):
                    batch[name] = undo_up_filter(images)
                else:  # never within one manifest (one image form); kept exact all the same
                    chosen = torch.tensor(rows, device=images.device)
                    batch[name] = images.index_copy(0, chosen, undo_up_filter(images[chosen]))
    if "avg_tex" in batch:
        batch["avg_tex"], _ = normalise_textures(batch["avg_tex"], stats, tex_size)
    if "tex" in batch:
        batch["tex"], unseen = normalise_textures(batch["tex"], stats, tex_size)
        batch["mask"] = 1.0 - unseen
    if "photo" in batch:
        batch["photo"] = batch["photo"].to(torch.float32) / stats.byte_max
    return batch
