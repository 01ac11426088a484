"""Ray plumbing of a search: connecting, the address check, the artifact inbox, the recovery
book and the measurement service (used by :mod:`autocompress.tune._ray_backend`)."""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from autocompress.config import Experiment
from autocompress.tune._trial import RecoveryBook


def _driver_actor(cls: type) -> Any:
    """An instance of ``cls`` as a Ray actor on the driver's node (no CPU); it belongs to the
    driver's job and goes away with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(num_cpus=0)(cls).options(scheduling_strategy=here).remote()


class ArtifactInbox:
    """Each trial's artifacts until the driver logs them.

    Trials put ``{file name: bytes}`` there through Ray's object store, from whichever node
    they run on; the driver's callback pops them.
    """

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}

    def put(self, key: str, files: dict[str, bytes]) -> None:
        self.files[key] = files

    def pop(self, key: str) -> dict[str, bytes] | None:
        return self.files.pop(key, None)


def _artifact_inbox() -> Any:
    """The search's :class:`ArtifactInbox`, an actor on the driver's node."""
    return _driver_actor(ArtifactInbox)


def _recovery_book() -> Any:
    """The search's :class:`~autocompress.tune._trial.RecoveryBook`, an actor on the driver's
    node."""
    return _driver_actor(RecoveryBook)


def _check_address(address: str | None) -> None:
    """Refuses a Ray address that cannot work, before anything starts.

    A ``HOST:PORT`` is probed with a plain TCP connection: Ray itself waits minutes for an
    unreachable GCS and then exits the process.
    """
    from autocompress._errors import ConfigError

    if address in (None, "auto", "local"):
        return
    assert address is not None
    if address.startswith("ray://"):
        raise ConfigError(
            f"{address!r}: run_search needs a direct Ray address (auto or HOST:PORT) on a node "
            f"of the cluster (it is the search's driver and MLflow writer); to search through "
            f"Ray Client, use the command line, which runs the whole search on the cluster: "
            f"autocompress search EXPERIMENT.yaml --address {address} --tracking-uri "
            f"http://SERVER:5000 (or autocompress.tune.run_remote_search)",
            key="--address")
    host, port = host_port(address)
    if not host or port is None:
        raise ConfigError(f"{address!r} is not a Ray address; allowed: auto or HOST:PORT of the "
                          f"head node (e.g. 10.0.0.1:6379)", key="--address")
    try:
        socket.create_connection((host, port), timeout=10).close()
    except OSError as e:
        raise ConfigError(f"cannot reach a Ray head node at {address} ({e.strerror or e}); start "
                          f"one with 'ray start --head' or give its HOST:PORT", key="--address") from None



def host_port(address: str) -> tuple[str, int | None]:
    """``HOST:PORT`` (``[v6]:PORT`` too) as ``(host, port)``; the port is None if not a number."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else None



def _measurement_service(exp: Experiment, echo: Callable[[str], None]) -> tuple[Any, Any]:
    """Starts the search's measurement service and keeps this (the driver's) process off its
    core; see :mod:`autocompress.tune._service`."""
    from autocompress.tune._service import isolation_for, keep_off, start_service

    isolation = isolation_for(exp.target, exp.search.concurrency * exp.search.cpus_per_trial)
    service, reserved = start_service(exp.target, isolation, exp.search.cpus_per_trial)
    keep_off(reserved)
    if exp.target.device == "remote":
        echo(f"latency: measured by the device agent at {exp.target.url}, one at a time, not "
             f"paired with the baseline (the agent times one model per request)")
    elif reserved.core is None and reserved.gate_dir is not None:
        echo(f"latency: measured one at a time on a core freed for it (no core is spare: the "
             f"trials share them all, and while a model is timed at most "
             f"{reserved.gate_slots - 1} training step(s) run beside it)")
    elif reserved.core is None:
        echo("latency: this node has a single core, so measurements share it with training "
             "(expect noisy timings)")
    else:
        echo(f"latency: measured one at a time on core {reserved.core}, reserved (trials and this "
             f"process run on the other cores)")
    return service, reserved



def _connect_ray(exp: Experiment, address: str | None, num_cpus: int | None) -> bool:
    """Starts a local Ray, or connects to the cluster at ``address``; True if this call did.

    Trials must import the user's task module as the driver did, on every node: the driver's
    working directory and ``sys.path`` go to the workers as ``PYTHONPATH`` (with a cluster,
    the code must be at the same paths there, or shipped with ``ray job submit --working-dir``).
    """
    import ray

    from autocompress._errors import ConfigError

    if ray.is_initialized():
        return False
    if address == "local":
        address = None
    # Without an address: a new local Ray ("local"), never one that happens to run on this
    # machine (ray.init() would join the last `ray start`ed cluster), unless RAY_ADDRESS says
    # so, as it does inside `ray job submit`.
    local = not address and not os.environ.get("RAY_ADDRESS")
    # One Ray CPU more than the trials need: the measurement service's reserved core.
    cpus = num_cpus or 1 + max(os.cpu_count() or 1,
                               int(exp.search.concurrency * exp.search.cpus_per_trial + 0.999))
    path = os.pathsep.join(p for p in [os.getcwd(), *sys.path] if p and Path(p).is_dir())
    try:
        ray.init(address="local" if local else address, num_cpus=cpus if local else None,
                 include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                 configure_logging=True, runtime_env={"env_vars": {"PYTHONPATH": path}})
    except (ConnectionError, ValueError) as e:
        if not address:
            raise
        raise ConfigError(f"cannot connect to Ray at {address!r}: {e}", key="--address") from None
    return True
