"""Pictures of a training run: image grids, a latent interpolation strip, loss curves.

matplotlib with the Agg backend (no display needed). Images are tensors (N, C, H, W) with
values in [0, 1]; C is 1 (grey) or 3 (RGB).
"""

from __future__ import annotations

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def tile(images: torch.Tensor, nrow: int, pad: int = 1, pad_value: float = 1.0) -> torch.Tensor:
    """Tile (N, C, H, W) images into one (rows*H', nrow*W', C) array, row by row, with `pad`
    pixels of `pad_value` between them (and around the edge)."""
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    nrow = max(1, min(nrow, n))
    rows = (n + nrow - 1) // nrow
    out = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.float32)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        out[:, top:top + h, left:left + w] = images[i].detach().float().cpu().clamp(0, 1)
    return out.permute(1, 2, 0)


def _show(ax, grid: torch.Tensor) -> None:
    if grid.shape[2] == 1:
        ax.imshow(grid[:, :, 0].numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(grid.numpy(), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _figsize(grid: torch.Tensor, scale: float, extra_h: float = 0.5) -> tuple[float, float]:
    h, w = grid.shape[:2]
    return max(2.0, w * scale), max(1.0, h * scale + extra_h)


def save_image_grid(path: str, images: torch.Tensor, nrow: int = 8, title: str | None = None) -> None:
    """A grid of images, nrow per row."""
    plt = _plt()
    grid = tile(images, nrow, pad_value=0.3 if images.shape[1] == 1 else 1.0)
    scale = 6.0 / grid.shape[1]  # about 6 inches wide
    fig, ax = plt.subplots(figsize=_figsize(grid, scale))
    _show(ax, grid)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_reconstruction_grid(path: str, inputs: torch.Tensor, recons: torch.Tensor, title: str | None = None,
                             per_row: int = 8) -> None:
    """Inputs and their reconstructions: rows of inputs, each followed by the row of its
    reconstructions."""
    if inputs.shape != recons.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and recons {tuple(recons.shape)} differ in shape")
    n = inputs.shape[0]
    rows = []
    for start in range(0, n, per_row):
        a, b = inputs[start:start + per_row], recons[start:start + per_row]
        if a.shape[0] < per_row:  # pad the last pair of rows with blanks
            blank = torch.zeros((per_row - a.shape[0], *a.shape[1:]))
            a, b = torch.cat([a.cpu(), blank]), torch.cat([b.cpu(), blank])
        rows += [a.cpu(), b.cpu()]
    save_image_grid(path, torch.cat(rows), nrow=per_row,
                    title=title or "validation inputs (odd rows) and their reconstructions (even rows)")


def save_interpolation_strip(path: str, strips: torch.Tensor, title: str | None = None) -> None:
    """Rows of images decoded along straight lines in latent space: `strips` is
    (rows, steps, C, H, W) (or (steps, C, H, W) for one row)."""
    if strips.dim() == 4:
        strips = strips.unsqueeze(0)
    rows, steps = strips.shape[:2]
    save_image_grid(path, strips.reshape(rows * steps, *strips.shape[2:]), nrow=steps,
                    title=title or "latent interpolation: each row decodes points on the line between two "
                                   "encoded validation images")


def save_loss_curves(path: str, history: list[dict], step_losses: list[tuple[int, float]] | None = None,
                     title: str | None = None) -> None:
    """Per-epoch train and validation loss, reconstruction and KL (and β), three panels.

    history: one dict per epoch with keys epoch, train_loss, train_recon, train_kl, beta and
    optionally val_loss, val_recon, val_kl. step_losses: (step, loss) pairs of the training
    batches, drawn faintly behind the train loss per epoch (x in epochs).
    """
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    epochs = [h["epoch"] for h in history]
    for ax, key, label in zip(axes, ("loss", "recon", "kl"),
                              ("loss = −ELBO (β-weighted KL)", "reconstruction NLL", "KL(q(z|x) ‖ p(z))")):
        if key == "loss" and step_losses and history:
            steps_per_epoch = max(1, history[-1].get("steps", 1))
            xs = [s / steps_per_epoch for s, _ in step_losses]
            ax.plot(xs, [v for _, v in step_losses], color="tab:blue", alpha=0.25, lw=0.7, label="train (batches)")
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", ms=3, color="tab:blue", label="train")
        if history and f"val_{key}" in history[0]:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", ms=3, color="tab:orange", label="validation")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if history and any(h.get("beta") is not None for h in history):
        twin = axes[2].twinx()
        twin.plot(epochs, [h.get("beta") for h in history], ":", color="gray")
        twin.set_ylabel("β at epoch end", color="gray", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
