"""Local SGD in your own training loop with coopsgd's wrapper, launched by torchrun.

    torchrun --nproc-per-node 4 examples/torchrun_local_sgd.py --tau 8 --epochs 1

Each process is one worker: it trains its own copy of a small MLP on its shard of the bundled MNIST
split and averages the models every ``tau`` steps (one all_reduce of one flat buffer). Add
``--preset easgd`` (or dpsgd, lsgd, ...) to try another algorithm, ``--net-latency-ms 5
--net-bandwidth-mbps 100`` to feel a slow network. Rank 0 prints the centre model's test accuracy.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import coopsgd.algorithms as algorithms
from coopsgd.data import WorkerLoader, load_dataset, partition
from coopsgd.models import make_model
from coopsgd.wrapper import CooperativeSGD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="local_sgd")
    parser.add_argument("--tau", type=int, default=8)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--net-latency-ms", type=float, default=None)
    parser.add_argument("--net-bandwidth-mbps", type=float, default=None)
    args = parser.parse_args()
    if "RANK" not in os.environ:
        raise SystemExit("launch with: torchrun --nproc-per-node 4 examples/torchrun_local_sgd.py")

    dist.init_process_group("gloo")  # "nccl" for one GPU per process
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)

    # data: every rank builds the same partition and reads only its own shard
    train = load_dataset("mnist_bundled", split="train")
    test = load_dataset("mnist_bundled", split="test")
    parts = partition(train.y, world, "iid", seed=0)
    loader = WorkerLoader(train, parts, args.batch_size, seed=0)

    torch.manual_seed(0)
    model = make_model("mlp", num_classes=10, input_shape=train.input_shape)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    spec = algorithms.make_preset(args.preset, world, tau=args.tau)
    steps = int(args.epochs * loader.steps_per_epoch)
    # leaving the block completes a pending non-blocking round and hands the model its own storage back
    with CooperativeSGD(model, opt, spec=spec, net_latency_ms=args.net_latency_ms,
                        net_bandwidth_mbps=args.net_bandwidth_mbps) as coop:
        t0 = time.perf_counter()
        for k in range(steps):
            x, y = loader.batch(k // loader.steps_per_epoch, rank, k % loader.steps_per_epoch)
            loss = None
            if coop.is_active():  # FedAvg samples clients; every other preset: always True
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
            coop.step(loss=None if loss is None else loss.item())  # communicates when the schedule says so
        # the centre model (collective: every rank) is read inside the block
        center = coop.load_center(make_model("mlp", num_classes=10, input_shape=train.input_shape))
    if rank == 0:
        with torch.no_grad():
            acc = (center(test.x).argmax(dim=1) == test.y).float().mean().item()
        s = coop.stats
        print(f"{args.preset} tau={args.tau} workers={world}: {steps} steps in {time.perf_counter() - t0:.1f} s, "
              f"{s['rounds']} rounds, {s['communication_s']:.2f} s communicating, test accuracy {acc:.3f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
