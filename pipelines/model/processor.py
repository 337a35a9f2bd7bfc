"""Curia's image processor: its settings file, and its normalisation in the exact order.

A backbone folder carries ``preprocessor_config.json``: the options Raidium's image processor
ran with when the backbone (and the heads on it) saw their inputs. Ignoring it silently feeds
a head differently normalised pixels, so the node reads it, honours what it says and refuses a
key it does not know (naming it) rather than guessing what that key changed.

Two published versions of the processor normalise differently, and a head must get the one it
was trained with, so the variant is a setting:

- ``slice`` (the newer processor): per slice, bicubic antialiased resize (align_corners False)
  -> clamp below air (when on) -> ``(x - m) / s`` with the slice's mean and unbiased standard
  deviation (ddof 1), only centring when ``s < 1e-6``. The clamp acts on resized values, so a
  scanner's padding outside the field of view is smoothed into the edge before it is clamped.
- ``volume`` (the older processor): values cast to int16 (truncating) and scaled by 1/32767,
  resized per slice, then ONE mean and standard deviation over the whole series. The clamp,
  when on, acts on the resized values as in ``slice`` (the older processor had none: a head
  that needs it says so on its card).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch
import torch.nn.functional as F

PROCESSOR_FILE = "preprocessor_config.json"

#: Lowest meaningful CT value; ``clip_below_air`` raises padding (-2048, -3024) to it.
AIR_HU = -1000.0
#: Below this standard deviation a slice (or volume) is only centred, not scaled.
STD_FLOOR = 1e-6
#: The older processor's scaling after its int16 cast.
INT16_SCALE = 32767.0

ProcessorVariant = Literal["slice", "volume"]
PROCESSOR_VARIANTS: tuple[str, ...] = get_args(ProcessorVariant)

#: ``normalization`` values in a processor config, and the variant each names.
_NORMALIZATIONS = {"per-slice z-score": "slice", "volume z-score": "volume"}
#: Keys that only identify the processor class or record the layout, with no effect on pixels.
_DESCRIPTIVE_KEYS = frozenset({"image_processor_type", "processor_class", "auto_map"})
#: Every key the node understands; anything else is refused by name.
KNOWN_KEYS = _DESCRIPTIVE_KEYS | {
    "clip_below_air",
    "do_resize",
    "size",
    "crop_size",
    "resample",
    "do_normalize",
    "normalization",
    "num_channels",
    "num_slices",
}


class ProcessorConfigError(ValueError):
    """A ``preprocessor_config.json`` the node cannot honour; the message names the key."""


@dataclass(frozen=True)
class ProcessorSettings:
    """What the image processor does to a slice: clamp, variant, output size, slice count.

    ``num_slices`` is the processor's even sampling of a volume (None: every slice); window
    heads sample by their own card, so it is recorded rather than applied to every head.
    """

    clip_below_air: bool = False
    variant: ProcessorVariant = "slice"
    size: int = 512
    num_slices: int | None = None

    def to_config(self, num_channels: int = 1) -> dict[str, Any]:
        """The ``preprocessor_config.json`` that :func:`read_processor_config` reads back."""
        config: dict[str, Any] = {
            "clip_below_air": self.clip_below_air,
            "do_resize": True,
            "size": self.size,
            "resample": "bicubic",
            "do_normalize": True,
            "normalization": next(k for k, v in _NORMALIZATIONS.items() if v == self.variant),
            "num_channels": num_channels,
        }
        if self.num_slices is not None:
            config["num_slices"] = self.num_slices
        return config


def _size(value: Any, key: str, where: str) -> int:
    """A size as HF processors write it: an int, or {height, width} / {shortest_edge}."""
    if isinstance(value, dict):
        sides = {value.get("height"), value.get("width")} - {None}
        if not sides:
            sides = {value.get("shortest_edge")} - {None}
        if len(sides) != 1:
            raise ProcessorConfigError(
                f"{where}: {key} {value!r} is not square; the node resizes to a square input"
            )
        value = sides.pop()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ProcessorConfigError(f"{where}: {key} is {value!r}, expected a positive size")
    return value


def _flag(raw: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise ProcessorConfigError(f"{where}: {key} is {value!r}, expected true or false")
    return value


def parse_processor_config(
    raw: Mapping[str, Any], where: str, *, image_size: int, num_channels: int = 1
) -> ProcessorSettings:
    """Settings from a processor config; unknown keys and unsupported values are refused."""
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ProcessorConfigError(
            f"{where}: unknown key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + "; the node does not know what it changes in the input, so it refuses the folder"
        )
    if not _flag(raw, "do_resize", where, True):
        raise ProcessorConfigError(f"{where}: do_resize is false; the node always resizes")
    if not _flag(raw, "do_normalize", where, True):
        raise ProcessorConfigError(f"{where}: do_normalize is false; Curia's input is z-scored")
    sizes = {_size(raw[k], k, where) for k in ("size", "crop_size") if k in raw}
    if len(sizes) > 1:
        raise ProcessorConfigError(f"{where}: size and crop_size differ ({sorted(sizes)})")
    size = sizes.pop() if sizes else image_size
    if size != image_size:
        raise ProcessorConfigError(
            f"{where}: size {size} but the backbone's config.json says image_size {image_size}"
        )
    resample = raw.get("resample", "bicubic")
    if resample not in (3, "bicubic", "bicubic (antialiased)"):
        raise ProcessorConfigError(
            f"{where}: resample {resample!r}; the node resizes with antialiased bicubic (3)"
        )
    normalization = raw.get("normalization", "per-slice z-score")
    if normalization not in _NORMALIZATIONS:
        raise ProcessorConfigError(
            f"{where}: normalization {normalization!r}, expected one of {sorted(_NORMALIZATIONS)}"
        )
    channels = raw.get("num_channels", num_channels)
    if channels != num_channels:
        raise ProcessorConfigError(
            f"{where}: num_channels {channels!r} but the backbone takes {num_channels}"
        )
    slices = raw.get("num_slices")
    if slices is not None and (
        isinstance(slices, bool) or not isinstance(slices, int) or slices < 1
    ):
        raise ProcessorConfigError(f"{where}: num_slices is {slices!r}, expected a positive int")
    variant: ProcessorVariant = "volume" if _NORMALIZATIONS[normalization] == "volume" else "slice"
    return ProcessorSettings(
        clip_below_air=_flag(raw, "clip_below_air", where, False),
        variant=variant,
        size=size,
        num_slices=slices,
    )


def read_processor_config(
    folder: Path, *, image_size: int, num_channels: int = 1
) -> ProcessorSettings | None:
    """The folder's processor settings, or None when it has no ``preprocessor_config.json``."""
    path = Path(folder) / PROCESSOR_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProcessorConfigError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(raw, dict):
        raise ProcessorConfigError(f"{path}: expected a JSON object")
    return parse_processor_config(raw, str(path), image_size=image_size, num_channels=num_channels)


# --- normalisation ------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeStatistics:
    """The one mean and standard deviation the ``volume`` variant normalises a series with."""

    mean: float
    std: float


def resize_slices(x: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, size, size): bicubic, antialiased, align_corners False."""
    if tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)


def _volume_input(x: torch.Tensor) -> torch.Tensor:
    """The older processor's int16 cast (truncating towards zero) and 1/32767 scaling."""
    return x.trunc().clamp(-32768, 32767) / INT16_SCALE


def _clamp(x: torch.Tensor, variant: ProcessorVariant) -> torch.Tensor:
    floor = AIR_HU / INT16_SCALE if variant == "volume" else AIR_HU
    return x.clamp_min(floor)


def _zscore(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(x - m) / s``, or only ``x - m`` where ``s`` is below :data:`STD_FLOOR`."""
    centred = x - mean
    return torch.where(std < STD_FLOOR, centred, centred / std.clamp_min(STD_FLOOR))


def scaled_slices(
    pixels: np.ndarray | torch.Tensor,
    *,
    size: int,
    clip_below_air: bool,
    variant: ProcessorVariant,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Every step before the z-score: (N, H, W) -> (N, 1, size, size) float32."""
    x = torch.as_tensor(pixels)
    if x.ndim != 3:
        raise ValueError(f"expected slices as (N, H, W), got shape {tuple(x.shape)}")
    x = x.to(device=device or x.device, dtype=torch.float32)
    if variant == "volume":
        x = _volume_input(x)
    x = resize_slices(x.unsqueeze(1), size)
    return _clamp(x, variant) if clip_below_air else x


def normalise_slices(
    pixels: np.ndarray | torch.Tensor,
    *,
    size: int = 512,
    clip_below_air: bool = False,
    variant: ProcessorVariant = "slice",
    volume: VolumeStatistics | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The processor on a stack of slices: (N, H, W) -> (N, 1, size, size) float32.

    ``volume`` is required for the ``volume`` variant: the statistics of the whole series
    (:func:`volume_statistics`), since one chunk's own would differ from them.
    """
    x = scaled_slices(
        pixels, size=size, clip_below_air=clip_below_air, variant=variant, device=device
    )
    if variant == "volume":
        if volume is None:
            raise ValueError("the volume variant needs the series' volume statistics")
        mean = torch.tensor(volume.mean, dtype=torch.float32, device=x.device)
        std = torch.tensor(volume.std, dtype=torch.float32, device=x.device)
        return _zscore(x, mean, std)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    std = x.std(dim=(-2, -1), keepdim=True, correction=1)
    return _zscore(x, mean, std)


def volume_statistics(
    chunks: Iterable[np.ndarray | torch.Tensor],
    *,
    size: int = 512,
    clip_below_air: bool = False,
    device: torch.device | str | None = None,
) -> VolumeStatistics:
    """Mean and unbiased standard deviation of a whole series as the ``volume`` variant sees it.

    Accumulated chunk by chunk in float64 (sum and sum of squares about the first chunk's
    mean, so a large offset costs no precision), so a long series is never whole in memory.
    """
    count = 0
    shift: float | None = None
    total = 0.0
    squares = 0.0
    for pixels in chunks:
        x = scaled_slices(
            pixels, size=size, clip_below_air=clip_below_air, variant="volume", device=device
        ).double()
        if shift is None:
            shift = float(x.mean())
        d = x - shift
        total += float(d.sum())
        squares += float((d * d).sum())
        count += d.numel()
    if count < 2 or shift is None:
        raise ValueError("volume statistics need at least two pixels")
    mean_d = total / count
    variance = max(squares - count * mean_d * mean_d, 0.0) / (count - 1)
    return VolumeStatistics(mean=shift + mean_d, std=variance**0.5)
