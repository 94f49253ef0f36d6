"""The torchrun entry point (CLI layer): ``torchrun --nproc-per-node N -m coopsgd.torchrun --config run.toml``.

Each process torchrun starts runs one rank of the run (:func:`coopsgd.train.distributed.rank_main`: the one
training loop on the distributed engine); global rank 0 (``RANK``) writes the run directory and prints the
headline of the summary as one JSON line. ``N`` x the number of nodes must equal the config's ``workers``.
Several machines::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29400 --rdzv-id job1 \\
        -m coopsgd.torchrun --config run.toml

Ranks are global (``RANK``: worker, data shard, who writes); a rank's GPU is that of its local rank
(``LOCAL_RANK``). Two agents on one machine with ``--rdzv-endpoint 127.0.0.1:PORT`` form a multi-node job
on loopback (gloo then binds to loopback, see :func:`coopsgd.engines.distributed.launch.init_torchrun_group`).

Without torchrun's environment (no ``RANK``), ``python -m coopsgd.torchrun --config run.toml`` starts the
local processes itself, like ``coopsgd run --engine distributed``. A configuration error ends in one line
on stderr, printed by rank 0 only (every rank exits with status 2): errors in the config file and flags
are found by every rank alike; the checks before training (the run directory, on rank 0; the checkpoint;
the data against the model; a local rank's GPU) are shared between the ranks before their first
collective, so a check that fails on one rank only stops every rank at once. A rank that fails while
training prints one line naming itself and exits with status 1 (an unexpected exception: with its
traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from coopsgd.train.config import RunConfig

__all__ = ["main"]

#: How long a rank other than 0 waits before exiting on a configuration error found after the ranks agreed
#: on their checks (rank 0 prints it).
_QUIET_EXIT_S = 3.0


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _exit_together(status: int) -> NoReturn:
    """Every rank has the same error and rank 0 has printed it: leave at the same moment with the same status.

    torchrun's agent stops every rank (SIGTERM) as soon as it sees one exit, so a rank that left first would
    get the others killed (exit status -15, and maybe before rank 0 had printed). The ranks meet in a barrier
    and leave at once, without the interpreter's teardown.
    """
    import torch.distributed as dist

    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 -- a peer already gone: leave anyway
        pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _parser() -> argparse.ArgumentParser:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, then run one rank (under torchrun) or every rank locally."""
    ns = _parser().parse_args(argv)
    from coopsgd.errors import CoopSGDError

    rank_env = os.environ.get("RANK")
    try:
        cfg = _checked_config(ns, under_torchrun=rank_env is not None)
    except CoopSGDError as exc:  # every rank finds the same error in the file and the flags
        if rank_env in (None, "0"):
            print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        if rank_env is not None:  # under torchrun: join the group only to leave together
            from coopsgd.engines.distributed.launch import init_torchrun_group

            try:
                init_torchrun_group("gloo", 60.0)
            except Exception:  # noqa: BLE001 -- no group: leave now
                os._exit(2)
            _exit_together(2)
        return 2
    if rank_env is None:  # no torchrun: the local launcher (which checks everything before any rank starts)
        return _run_local(cfg, ns)
    return _run_rank(cfg, ns)


def _checked_config(ns: argparse.Namespace, *, under_torchrun: bool) -> RunConfig:
    """The run configuration with the flags checked against it (a :class:`CoopSGDError` names what is wrong);
    fills ``ns.resume`` for ``--auto-resume`` when the run directory holds a checkpoint."""
    from coopsgd.engines.distributed.communicator import NetEmulation
    from coopsgd.errors import ConfigError, check_float
    from coopsgd.train.config import MAX_TIMEOUT_S, RunConfig, flat_settings, load_config

    for flag, value in (("--config", ns.config), ("--out", ns.out), ("--resume", ns.resume)):
        if value is not None and not value.strip():  # e.g. an unset shell variable: never "the default"
            raise ConfigError.invalid(flag, value, "must not be an empty string (leave the flag out instead)")
    # the run is the distributed engine's whatever the file says (so a setting only another engine uses is
    # refused here, on every rank alike, as with `coopsgd run --engine distributed`)
    flat = flat_settings(load_config(ns.config), source=f"config {ns.config!r}")
    cfg = RunConfig.from_dict({**flat, "engine": "distributed"}, source=ns.config)
    ns.timeout_s = check_float("--timeout-s", ns.timeout_s, low=0.0, low_open=True, high=MAX_TIMEOUT_S)
    NetEmulation(ns.net_latency_ms, ns.net_bandwidth_mbps)  # checks both
    if ns.auto_resume and ns.resume is None:
        out_dir = ns.out or cfg.output.out
        if out_dir is None:
            raise ConfigError.invalid("--auto-resume", True, "needs a run directory (--out or `out` in the config)")
        if (Path(out_dir) / "checkpoint.pt").is_file():
            ns.resume = str(Path(out_dir) / "checkpoint.pt")
    world_env = os.environ.get("WORLD_SIZE")
    if under_torchrun and world_env is not None and int(world_env) != cfg.algorithm.workers:
        raise ConfigError.invalid("workers", cfg.algorithm.workers, f"the config asks for {cfg.algorithm.workers} "
                                  f"workers but torchrun started {world_env} processes (nproc-per-node x nnodes)")
    if ns.backend == "nccl" and not cfg.execution.device.startswith("cuda"):
        raise ConfigError.invalid("--backend", "nccl", f"NCCL needs the GPUs: the config has device = "
                                                       f"{cfg.execution.device!r} (set device = \"cuda\")")
    return cfg


def _run_local(cfg: RunConfig, ns: argparse.Namespace) -> int:
    """Every rank on this machine through the local launcher; exit status 0, 1 (a rank failed) or 2 (input)."""
    from coopsgd.errors import ConfigError, CoopSGDError, Interrupted
    from coopsgd.train.distributed import one_line, run_distributed

    try:
        summary = run_distributed(cfg, out=ns.out, timeout_s=ns.timeout_s, net_latency_ms=ns.net_latency_ms,
                                  net_bandwidth_mbps=ns.net_bandwidth_mbps, backend=ns.backend, resume=ns.resume)
    except ConfigError as exc:
        print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 2
    except CoopSGDError as exc:  # a rank failed (named in the message)
        print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except Interrupted as exc:  # SIGTERM / SIGINT: the ranks were stopped
        print(f"coopsgd: {exc}", file=sys.stderr, flush=True)
        return exc.exit_status
    print(json.dumps(one_line(summary)))
    return 0


def _run_rank(cfg: RunConfig, ns: argparse.Namespace) -> int:
    """This process's rank under torchrun; every rank leaves with the same status for an input error."""
    import torch
    import torch.distributed as dist

    from coopsgd.engines.distributed.launch import init_torchrun_group  # a key space per restart attempt
    from coopsgd.errors import ConfigError, CoopSGDError
    from coopsgd.train.distributed import RankCheckError, one_line, rank_main

    use_cuda = cfg.execution.device.startswith("cuda")
    backend = ns.backend or ("nccl" if use_cuda else "gloo")
    if use_cuda:  # each local rank on its own GPU (rank_main checks there is one), current before NCCL starts
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local < torch.cuda.device_count():
            torch.cuda.set_device(local)
    init_torchrun_group(backend, ns.timeout_s)
    rank = dist.get_rank()
    try:
        opts = {"out": ns.out or cfg.output.out, "timeout_s": ns.timeout_s, "net_latency_ms": ns.net_latency_ms,
                "net_bandwidth_mbps": ns.net_bandwidth_mbps, "resume": ns.resume, "agree_errors": True}
        # the run directory records the engine that ran it (a config file may say "simulate")
        summary = rank_main(rank, dist.get_world_size(), {**cfg.to_dict(), "engine": "distributed"}, opts)
    except RankCheckError as exc:  # every rank has it (the ranks agreed): rank 0 says it, once
        if rank == 0:
            print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        _exit_together(2)
    except ConfigError as exc:  # found later by every rank alike (a checkpoint's content)
        if rank == 0:
            print(f"coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        else:
            time.sleep(_QUIET_EXIT_S)
        return 2
    except CoopSGDError as exc:  # a run-time failure of this rank (non-finite values, a peer gone): one line
        print(f"[coopsgd rank {rank}] coopsgd: error: {_one_line(exc)}", file=sys.stderr, flush=True)
        return 1
    except BaseException as exc:  # a bug: its traceback follows
        print(f"[coopsgd rank {rank}] {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr, flush=True)
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
