"""The image history pool of Shrivastava et al. (2017), as used by CycleGAN.

The discriminators are updated on a mix of the latest generated images and older ones, which
damps the oscillation between generator and discriminator.
"""

from __future__ import annotations

import torch


class ImagePool:
    """Buffer of up to ``size`` previously generated images.

    Until the buffer is full every queried image is stored and returned as given. Once full,
    each image is, with probability 0.5, swapped with a uniformly chosen stored one (the
    stored one is returned, the new one takes its place); otherwise it is returned as given.
    Randomness comes from a private ``torch.Generator`` seeded with ``seed``, so the
    sequence of choices is reproducible and never touches the global RNG. ``size=0``
    disables the pool.

    >>> pool = ImagePool(size=2, seed=0)
    >>> pool.query(torch.zeros(2, 3, 4, 4)).shape
    torch.Size([2, 3, 4, 4])
    """

    def __init__(self, size: int = 50, seed: int = 0) -> None:
        if size < 0:
            raise ValueError(f"ImagePool: size={size}, expected >= 0")
        self.size = size
        self.images: list[torch.Tensor] = []
        self._rng = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        """Return a batch as large as ``images`` ``(B, C, H, W)``, mixed with history.

        The input is detached (the pool only feeds discriminator updates); returned images
        have the input's dtype and device.
        """
        images = images.detach()
        if self.size == 0:
            return images
        out = []
        for image in images:
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self._rng).item() < 0.5:
                index = int(torch.randint(self.size, (), generator=self._rng))
                # Stored images may come from another autocast dtype; match the current batch.
                out.append(self.images[index].to(device=image.device, dtype=image.dtype))
                self.images[index] = image.clone()
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The stored images ``(n, C, H, W)`` and the generator state: what a resumed run
        needs to make the same choices as an uninterrupted one."""
        images = torch.stack(self.images).cpu() if self.images else torch.empty(0)
        return {"images": images, "rng": self._rng.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        images = state["images"]
        self.images = [image.clone() for image in images] if images.numel() else []
        self._rng.set_state(state["rng"])
