"""Small result types shared by the ops and the references."""

from typing import NamedTuple

import torch


class ELBO(NamedTuple):
    """Negative ELBO and its parts; each follows the loss's `reduction`."""

    loss: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
