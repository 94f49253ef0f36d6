"""The torchrun entry point (CLI layer): ``torchrun --nproc-per-node N -m coopsgd.torchrun --config run.toml``.

Each process torchrun starts runs one rank of the run (:func:`coopsgd.train.distributed.rank_main`: the one
training loop on the distributed engine); rank 0 writes the run directory and prints the headline of the
summary as one JSON line. ``N`` x the number of nodes must equal the config's ``workers``. Several
machines::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        -m coopsgd.torchrun --config run.toml

Without torchrun's environment (no ``RANK``), ``python -m coopsgd.torchrun --config run.toml`` starts the
local processes itself, like ``coopsgd run --engine distributed``. A configuration error ends in one line
on stderr (from rank 0 only) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

__all__ = ["main"]

#: How long a rank other than 0 waits before exiting on a configuration error (rank 0 prints it).
_QUIET_EXIT_S = 3.0


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, then run one rank (under torchrun) or every rank locally."""
    parser = argparse.ArgumentParser(prog="python -m coopsgd.torchrun",
                                     description="coopsgd distributed run (launch with torchrun)")
    parser.add_argument("--config", required=True, help="TOML/YAML/JSON run configuration")
    parser.add_argument("--out", default=None, help="run directory (written by rank 0)")
    parser.add_argument("--timeout-s", type=float, default=60.0, help="communication timeout in seconds (default 60)")
    parser.add_argument("--net-latency-ms", type=float, default=None, help="emulated latency per message")
    parser.add_argument("--net-bandwidth-mbps", type=float, default=None, help="emulated bandwidth")
    parser.add_argument("--backend", default=None, choices=("gloo", "nccl"),
                        help="default: nccl for a config with device = \"cuda\", else gloo")
    parser.add_argument("--resume", default=None, help="continue from this checkpoint.pt (or run directory)")
    parser.add_argument("--auto-resume", action="store_true",
                        help="resume from the run directory's checkpoint.pt when there is one (torchrun --max-restarts)")
    ns = parser.parse_args(argv)

    import torch
    import torch.distributed as dist

    from coopsgd.errors import ConfigError, CoopSGDError
    from coopsgd.train.config import RunConfig, load_config
    from coopsgd.train.distributed import one_line, rank_main, run_distributed

    rank_env = os.environ.get("RANK")
    try:
        cfg = RunConfig.from_dict(load_config(ns.config), source=ns.config)
        if ns.auto_resume and ns.resume is None:
            out_dir = ns.out or cfg.out
            if out_dir is None:
                raise ConfigError.invalid("--auto-resume", True, "needs a run directory (--out or `out` in the config)")
            if (Path(out_dir) / "checkpoint.pt").is_file():
                ns.resume = str(Path(out_dir) / "checkpoint.pt")
        world_env = os.environ.get("WORLD_SIZE")
        if rank_env is not None and world_env is not None and int(world_env) != cfg.workers:
            raise ConfigError.invalid("workers", cfg.workers, f"the config asks for {cfg.workers} workers but torchrun "
                                                              f"started {world_env} processes (nproc-per-node x nnodes)")
        use_cuda = cfg.device.startswith("cuda")
        if ns.backend == "nccl" and not use_cuda:
            raise ConfigError.invalid("--backend", "nccl", f"NCCL needs the GPUs: the config has device = "
                                                           f"{cfg.device!r} (set device = \"cuda\")")
    except CoopSGDError as exc:
        if rank_env in (None, "0"):
            print(f"coopsgd: error: {exc}", file=sys.stderr, flush=True)
        else:
            # every rank finds the same error: give rank 0 the time to say it before torchrun's agent, seeing
            # this rank exit, stops the others (rank 0 included)
            time.sleep(_QUIET_EXIT_S)
        return 2
    if rank_env is None:
        summary = run_distributed(cfg, out=ns.out, timeout_s=ns.timeout_s, net_latency_ms=ns.net_latency_ms,
                                  net_bandwidth_mbps=ns.net_bandwidth_mbps, backend=ns.backend, resume=ns.resume)
        print(json.dumps(one_line(summary)))
        return 0
    backend = ns.backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:  # each local rank on its own GPU (rank_main checks there is one), current before NCCL starts
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    from coopsgd.engines.launch import init_torchrun_group  # a key space per torchrun restart attempt

    init_torchrun_group(backend, ns.timeout_s)
    rank = dist.get_rank()
    try:
        opts = {"out": ns.out or cfg.out, "timeout_s": ns.timeout_s, "net_latency_ms": ns.net_latency_ms,
                "net_bandwidth_mbps": ns.net_bandwidth_mbps, "resume": ns.resume}
        # the run directory records the engine that ran it (a config file may say "simulate")
        summary = rank_main(rank, dist.get_world_size(), {**cfg.to_dict(), "engine": "distributed"}, opts)
    except CoopSGDError as exc:
        if rank == 0:
            print(f"coopsgd: error: {exc}", file=sys.stderr, flush=True)
        raise
    except BaseException as exc:
        print(f"[coopsgd rank {rank}] {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if rank == 0:
        print(json.dumps(one_line(summary)))
    return 0


if __name__ == "__main__":
    # run inside the importable module (not __main__) so that the rank functions pickle by their real name
    from coopsgd.torchrun import main as _main

    sys.exit(_main())
