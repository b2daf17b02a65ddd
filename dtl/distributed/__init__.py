"""Distribution: who this process is (`env`), the process group and its collectives (`group`), the model
wrappers (`wrappers`) and stop signals (`signals`). The package exports what the rest of dtl calls."""

from dtl.distributed import fsdp
from dtl.distributed.compress import GradCompression
from dtl.distributed.env import (
    NETWORK_VARS,
    DistEnv,
    detect,
    first_slurm_host,
    gpu_index,
    network_env,
    pick_device,
    prepare_determinism,
    setup_logging,
    slurm_port,
)
from dtl.distributed.group import (
    DETERMINISM_HINT,
    MAIN_IO_TIMEOUT_S,
    Agreement,
    all_gather_tensor,
    all_reduce_sum,
    barrier,
    broadcast_str,
    exit_process,
    main_first,
    monitored_barrier,
    peer_failure,
    setup,
    teardown,
    wait_for_main,
)
from dtl.distributed.wrappers import ddp_of, local_module, no_sync, unwrap, wrap

__all__ = [
    "Agreement", "all_gather_tensor", "all_reduce_sum", "barrier", "broadcast_str", "ddp_of", "detect",
    "DETERMINISM_HINT", "DistEnv", "exit_process", "first_slurm_host", "fsdp", "gpu_index", "GradCompression",
    "local_module", "main_first", "MAIN_IO_TIMEOUT_S", "monitored_barrier", "network_env", "NETWORK_VARS",
    "no_sync", "peer_failure", "pick_device", "prepare_determinism", "setup", "setup_logging", "slurm_port",
    "teardown", "unwrap", "wait_for_main", "wrap",
]
