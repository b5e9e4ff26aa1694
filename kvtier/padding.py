"""Reading a forward's attention mask: which leading tokens of each row are pads (left padding, as decoder-only
generation uses), and a clear error for any other mask (right padding, holes, or a mask that disagrees with what the
cache already holds)."""
from __future__ import annotations

import torch

_LEFT = 'pad on the left: tokenizer.padding_side = "left" before tokenizer(prompts, padding=True, return_tensors="pt")'


def leading_pads(mask: torch.Tensor) -> torch.Tensor:
    """mask [B, T] (1 = real token, 0 = pad) -> the pads before each row's first real token [B] (CPU, long); a
    ValueError for right padding or a row whose real tokens are not contiguous."""
    if mask.dim() != 2:
        raise ValueError(f"the attention mask must be 2-D [batch, tokens] (1 = token, 0 = pad), got shape {tuple(mask.shape)}")
    real = mask.detach().to("cpu").bool()  # [B, T]
    pads = (~real).long().cumprod(1).sum(1)  # [B]
    trailing = (~real).flip(1).long().cumprod(1).sum(1)  # [B]
    gaps = (pads + real.sum(1) != real.shape[1]).nonzero().flatten().tolist()
    right = [row for row in gaps if trailing[row] > 0 and pads[row] + trailing[row] + real[row].sum() == real.shape[1]]
    if right:
        raise ValueError(f"rows {right} of the attention mask are padded on the right; kvtier needs every row's tokens "
                         f"to end at the last column: {_LEFT}")
    if gaps:
        raise ValueError(f"rows {gaps} of the attention mask have pads between tokens (holes); kvtier takes pads only "
                         f"before a row's first token: {_LEFT}, and append later turns to every row unpadded")
    return pads


class Padding:
    """What a cache knows of its rows' padding: None until the first forward with a mask; then each row's count of
    leading pads, fixed once the row's first real token has been fed. `plan` checks each forward's mask against it and
    says how many of the forward's new tokens are pads in each row."""

    def __init__(self) -> None:
        self._pads: torch.Tensor | None = None  # [B] leading pads of each row (CPU, long)
        self._edges: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}  # see _unchanged, per mask device

    @property
    def pads(self) -> torch.Tensor | None:
        return self._pads

    @pads.setter
    def pads(self, pads: torch.Tensor | None) -> None:
        self._pads, self._edges = pads, {}

    @property
    def padded(self) -> bool:
        """Whether some row starts with pads (then the cache runs row by row)."""
        return self.pads is not None and bool(self.pads.any())

    def plan(self, mask: torch.Tensor | None, held: int, new: int) -> list[int]:
        """mask [B, held + new] of a forward bringing `new` tokens to a cache holding `held` -> the pads among the new
        tokens of each row [B]. Raises, changing nothing, for a mask that is not left padding or that disagrees with
        the tokens already held."""
        if mask is None:
            if self.padded:
                raise ValueError("this cache holds a padded batch: pass the attention_mask with every forward")
            return [0] * (0 if self.pads is None else len(self.pads))
        if mask.shape[-1] != held + new:
            raise ValueError(f"the attention mask covers {mask.shape[-1]} tokens, but the cache holds {held} and this "
                             f"forward brings {new}: pass the mask of every token so far (held + new)")
        if self.pads is not None and bool((self.pads < held).all()) and self._unchanged(mask, held):
            return [0] * len(self.pads)  # every row under way and no pad among the new tokens: nothing to re-read
        pads = leading_pads(mask)
        if self.pads is not None:
            settled = self.pads < held  # rows whose first real token the cache has already fed
            if len(pads) != len(self.pads) or not torch.equal(pads[settled], self.pads[settled]):
                raise ValueError("the attention mask disagrees with the tokens this cache holds (a row's padding "
                                 f"changed); {_LEFT}, and pass the mask of all tokens so far (the earlier mask + 1s)")
        self.pads = pads
        return (pads - held).clamp(0, new).tolist()

    def _unchanged(self, mask: torch.Tensor, held: int) -> bool:
        """Whether the new tokens are all real and each row still turns from pad to token where it did: one read from
        the mask's device per forward, instead of the whole mask (decode steps)."""
        if mask.device not in self._edges:
            edge = torch.stack(((self.pads - 1).clamp(min=0), self.pads), 1)  # [B, 2] the last pad, the first token
            expected = torch.stack(((self.pads == 0).long(), torch.ones_like(self.pads)), 1)  # [B, 2]
            self._edges[mask.device] = edge.to(mask.device), expected.to(mask.device)
        edge, expected = self._edges[mask.device]
        return bool(mask[:, held:].all() & (mask.gather(1, edge).long() == expected).all())
