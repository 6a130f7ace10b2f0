"""img2img and inpainting: the input image and mask as tensors, and what they add to each step.

Inputs are read as diffusers' VaeImageProcessor reads them (PIL images resized with Lanczos when a
size is asked for, [0, 1] -> [-1, 1]; masks converted to grey, binarised at 0.5), so the same image
and seed give diffusers' picture. Every check here runs before any model work and names the
argument. Inpainting conditions the denoising loop in one of two ways, chosen by the UNet:
  9 input channels (inpainting checkpoints): [latents, mask, masked-image latents] each step;
  4 input channels (any model): the known region is put back after each step, noised to the next
  step's level, as diffusers' StableDiffusionInpaintPipeline does.
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

MODES = ("txt2img", "img2img", "inpaint")
DEFAULT_STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' defaults for its two pipelines


def read_image(name: str, value):
    """`value` (a PIL image, a numpy array or a file path) as a PIL image or a float32 array
    [H, W, C] in [0, 1]; a ValueError names `name` for anything else or an unreadable file."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        if value.width == 0 or value.height == 0:
            raise ValueError(f"{name}: the image is empty ({value.width}x{value.height})")
        return value
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"{name}={str(value)!r}: no such file")
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{name}={str(value)!r}: not a readable image ({e})") from None
    if isinstance(value, np.ndarray):
        return array_image(name, value)
    raise ValueError(f"{name}: got a {type(value).__name__}; give a PIL image, a numpy array [H, W(, C)] or a file path")


def array_image(name: str, a: np.ndarray) -> np.ndarray:
    """A numpy image as float32 [H, W, C] in [0, 1]: uint8 (0-255) or float (0-1), [H, W] or
    [H, W, C] with C in 1, 3, 4."""
    if a.ndim == 2:
        a = a[:, :, None]  # [H, W, 1]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"{name}: a numpy image must be [H, W] or [H, W, C] with C in 1, 3, 4; got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name}: a numpy image must be uint8 (0-255) or float (0-1); got {a.dtype}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name}: a float numpy image must hold values in [0, 1] (got {a.min():g} to {a.max():g})")
    return a.astype(np.float32)


def size_of(image) -> tuple[int, int]:
    """(height, width) of what `read_image` returned."""
    return (image.height, image.width) if not isinstance(image, np.ndarray) else image.shape[:2]


def to_tensor(image, height: int, width: int, *, grey: bool) -> torch.Tensor:
    """[1, C, height, width] float32 in [0, 1], C = 1 if grey else 3 (alpha dropped, grey repeated).
    PIL images are resized with Lanczos as diffusers does; arrays with bicubic antialiasing."""
    from PIL import Image

    if not isinstance(image, np.ndarray):
        image = image.convert("L" if grey else "RGB")
        if (image.height, image.width) != (height, width):
            image = image.resize((width, height), resample=Image.LANCZOS)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255)
        x = x[None, None] if grey else x.permute(2, 0, 1)[None]  # [1, C, H, W]
        return x.contiguous()
    x = torch.from_numpy(image).permute(2, 0, 1)[None]  # [1, C, H, W]
    channels = x.shape[1]
    if grey and channels >= 3:  # ITU-R 601-2 luma, as PIL's convert("L")
        x = (x[:, 0:1] * 299 + x[:, 1:2] * 587 + x[:, 2:3] * 114) / 1000
    elif not grey:
        x = x[:, :3] if channels >= 3 else x.expand(-1, 3, -1, -1)
    if tuple(x.shape[-2:]) != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", antialias=True).clamp(0, 1)
    return x.contiguous()


@dataclass(frozen=True)
class EditInputs:
    """A call's image (and mask), read and checked: tensors at the output size."""

    mode: str  # "img2img" | "inpaint"
    strength: float
    height: int
    width: int
    image: torch.Tensor  # [1, 3, H, W] in [-1, 1]
    mask: torch.Tensor | None  # [1, 1, H, W] in {0, 1}: 1 = repaint
    latent_mask: torch.Tensor | None  # [1, 1, H / f, W / f]: the mask at latent size (nearest, as diffusers)


def check_strength(strength, mode: str) -> float:
    if strength is None:
        return DEFAULT_STRENGTH.get(mode, 1.0)
    if mode == "txt2img":
        raise ValueError(f"strength={strength!r}: applies to img2img and inpainting only; give image= too")
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ValueError(f"strength={strength!r}: must be a number in (0, 1]")
    return float(strength)


def read_inputs(image, mask_image, strength, height: int | None, width: int | None, *, scale: int,
                multiple: int, max_pixels: int | None = None) -> EditInputs | None:
    """The image and mask of one call, read, sized and checked before any model work (None for
    text to image). The output size is the image's unless height / width are given (then the image
    and mask are resized to it); either way it must be a multiple of `multiple` px and at most
    `max_pixels` (checked before the pixels are converted). `scale`: the VAE's pixels per latent cell."""
    if image is None:
        if mask_image is not None:
            raise ValueError("mask_image: inpainting needs the image too (image=...)")
        check_strength(strength, "txt2img")
        return None
    mode = "inpaint" if mask_image is not None else "img2img"
    strength = check_strength(strength, mode)
    picture = read_image("image", image)
    size = size_of(picture)
    mask = None
    if mask_image is not None:
        mask = read_image("mask_image", mask_image)
        if size_of(mask) != size:
            raise ValueError(
                f"mask_image is {size_of(mask)[1]}x{size_of(mask)[0]} px, image is {size[1]}x{size[0]}: give them the same size"
            )
    out = (int(height) if height is not None else size[0], int(width) if width is not None else size[1])
    for side, v, given in (("height", out[0], height), ("width", out[1], width)):
        if v % multiple:
            where = f"{side}={v}" if given is not None else f"image: its {side} {v} px"
            raise ValueError(f"{where} is not a multiple of {multiple} px (this model's and backend's size step); "
                             f"resize or crop the image, or give height= and width=")
    if max_pixels is not None and out[0] * out[1] > max_pixels:
        raise ValueError(f"image: {out[1]}x{out[0]} px is over the limit of {max_pixels} pixels per image; "
                         "give a smaller height= and width= (or raise FASTDIFF_MAX_PIXELS)")
    x = to_tensor(picture, *out, grey=False) * 2 - 1  # [1, 3, H, W] in [-1, 1]
    m = small = None
    if mask is not None:
        m = (to_tensor(mask, *out, grey=True) >= 0.5).float()  # [1, 1, H, W]: binarised as diffusers
        if not m.any():
            raise ValueError("mask_image is all black: it marks nothing to repaint (white = repaint, black = keep)")
        small = torch.nn.functional.interpolate(m, size=(out[0] // scale, out[1] // scale))  # [1, 1, h, w]
        if not small.any():
            raise ValueError(f"mask_image: its white region misses every {scale}x{scale} px latent cell's sample point "
                             "once resized to latent size, so nothing would be repainted; enlarge it")
    return EditInputs(mode, strength, out[0], out[1], x, m, small)


@dataclass
class Inpainting:
    """What inpainting adds to each denoising step, as device tensors (all capturable).

    concat: [(2)N, 1 + C, h, w] mask and masked-image latents appended to a 9-channel UNet's input.
    known / noise / mask: a 4-channel UNet's blend: after step i the latents outside the mask are
    replaced by the image's latents noised to step i + 1's level (clean after the last step).
    """

    concat: torch.Tensor | None = None
    known: torch.Tensor | None = None  # [N, C, h, w] clean image latents
    noise: torch.Tensor | None = None  # [N, C, h, w] the initial noise, reused for each re-noising
    mask: torch.Tensor | None = None  # [N, 1, h, w] 1 = repaint

    @property
    def kind(self) -> str:
        """Part of a CUDA graph's key: which of the two the step does."""
        return "concat" if self.concat is not None else "blend"

    def unet_input(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.concat], dim=1) if self.concat is not None else x  # [(2)N, 9, h, w]

    def blend(self, sched, latents: torch.Tensor, i) -> torch.Tensor:
        """The latents after step i with the known region put back; `i` an int or a 0-dim device
        tensor (no sync: the last step is selected on the device)."""
        if self.known is None:
            return latents
        last = len(sched) - 1
        if isinstance(i, torch.Tensor):
            noised = sched.add_noise(self.known, self.noise, torch.clamp(i + 1, max=last))
            proper = torch.where(i < last, noised, self.known)
        else:
            proper = sched.add_noise(self.known, self.noise, i + 1) if i < last else self.known
        return (1 - self.mask) * proper + self.mask * latents

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if v is not None}
