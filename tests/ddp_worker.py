"""One replica of the DistributedDataParallel test (tests/test_models.py::test_ddp_replicas_stay_identical).

Usage: python ddp_worker.py RANK WORLD_SIZE PORT OUT_PATH. Trains a small TransformerVAE for a
few steps on rank-specific data over gloo on 127.0.0.1 and saves its parameters to OUT_PATH.
"""

import datetime
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from vae_ext.models import TransformerVAE

STEPS = 3


def main(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(1234 + rank)  # different initial weights: DDP must broadcast rank 0's
        model = TransformerVAE(vocab_size=12, d_model=16, nhead=2, num_encoder_layers=1, num_decoder_layers=1,
                               dim_feedforward=32, latent_dim=4, max_len=10, dropout=0.1)
        ddp = DistributedDataParallel(model)
        initial = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(100 + rank)  # different data (and noise) on each rank
        losses = []
        for _ in range(STEPS):
            tokens = torch.randint(3, 12, (4, 8), generator=g)
            tokens[:, 0] = model.bos_id
            tokens[:, 6] = model.eos_id
            tokens[:, 7:] = model.pad_id
            out = ddp(tokens)
            opt.zero_grad()
            out.loss.backward()
            opt.step()
            losses.append(out.loss.item())
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"initial": initial, "params": params, "losses": losses}, out_path)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
