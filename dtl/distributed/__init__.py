"""Distribution: who this process is (`env`), the process groups and their collectives (`group`: `setup`
returns a `ProcessGroups`), the model wrappers (`wrappers`), gradient compression (`compress`), FSDP2 (`fsdp`)
and stop signals (`signals`). The package exports what the rest of dtl calls."""

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
    ProcessGroups,
    exit_process,
    peer_failure,
    setup,
    teardown,
)
from dtl.distributed.wrappers import ddp_of, local_module, no_sync, unwrap, wrap

__all__ = [
    "Agreement", "ddp_of", "detect", "DETERMINISM_HINT", "DistEnv", "exit_process", "first_slurm_host", "fsdp",
    "gpu_index", "GradCompression", "local_module", "MAIN_IO_TIMEOUT_S", "network_env", "NETWORK_VARS", "no_sync",
    "peer_failure", "pick_device", "prepare_determinism", "ProcessGroups", "setup", "setup_logging", "slurm_port",
    "teardown", "unwrap", "wrap",
]
