"""The order in which an epoch visits the training slices: a full permutation, or TensorFlow's shuffle buffer.

``epoch_order(n, generator, buffer_size)`` is a pure function of the generator's state:

- ``buffer_size=None`` (the project's default): ``torch.randperm`` -- every order equally likely.
- ``buffer_size=B``: the order of TensorFlow's ``Dataset.shuffle(B)`` over the slices in their
  stored order (patient by patient, slice by slice), as in the ILN author's code (``SHUFFLE = 500``,
  ``dataset.shuffle(SHUFFLE)``). A buffer is filled with the first B items; each step emits an item
  drawn uniformly from the buffer and refills its place with the next input item, until the input
  is exhausted and the buffer drains. So item i cannot come out before step i - B + 1, and with B
  much smaller than the dataset an epoch walks through the patients roughly in stored order --
  each batch mixes only nearby patients. B >= n is a uniform permutation (drawn the same way).

The random draws differ from TensorFlow's (another generator); the distribution of orders is the same.
"""

from __future__ import annotations

import torch


def epoch_order(num_items: int, generator: torch.Generator, buffer_size: int | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """A visiting order of ``range(num_items)`` as a CPU int64 tensor (see the module docstring).

    ``generator`` (on ``device``) supplies the randomness: the same state gives the same order.
    """
    if buffer_size is None:
        return torch.randperm(num_items, generator=generator, device=device).cpu()
    if buffer_size < 1:
        raise ValueError(f"shuffle buffer size must be at least 1, got {buffer_size}")
    # at step t the buffer holds min(B, n - t) items: one uniform draw per step, all at once
    sizes = torch.clamp(torch.arange(num_items, 0, -1), max=buffer_size)
    uniforms = torch.rand(num_items, generator=generator, device=device).cpu().double()
    picks = torch.minimum((uniforms * sizes).long(), sizes - 1).tolist()
    buffer = list(range(min(buffer_size, num_items)))
    upcoming = len(buffer)
    order = []
    for pick in picks:
        order.append(buffer[pick])
        if upcoming < num_items:  # the next input item takes the emitted one's place
            buffer[pick] = upcoming
            upcoming += 1
        else:  # the input is exhausted: the buffer drains
            buffer[pick] = buffer[-1]
            buffer.pop()
    return torch.tensor(order, dtype=torch.int64)
