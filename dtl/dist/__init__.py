"""Distribution: who this process is (`env`), the process group and its collectives (`group`), the model
wrappers (`wrappers`) and stop signals (`signals`). The package exports what the rest of dtl calls."""

from dtl.dist.env import DistEnv, NETWORK_VARS, detect, first_slurm_host, gpu_index, network_env, pick_device, prepare_determinism, setup_logging, slurm_port
from dtl.dist.group import Agreement, DETERMINISM_HINT, MAIN_IO_TIMEOUT_S, all_gather_tensor, all_reduce_sum, barrier, broadcast_str, exit_process, main_first, monitored_barrier, peer_failure, setup, teardown, wait_for_main
from dtl.dist import fsdp
from dtl.dist.compress import GradCompression
from dtl.dist.wrappers import ddp_of, local_module, no_sync, unwrap, wrap

__all__ = [
    "Agreement", "DETERMINISM_HINT", "DistEnv", "GradCompression", "fsdp", "no_sync", "MAIN_IO_TIMEOUT_S", "NETWORK_VARS", "all_gather_tensor",
    "all_reduce_sum", "barrier", "broadcast_str", "ddp_of", "detect", "exit_process", "first_slurm_host",
    "gpu_index", "local_module", "main_first", "monitored_barrier", "network_env", "peer_failure", "pick_device",
    "prepare_determinism", "setup", "setup_logging", "slurm_port", "teardown", "unwrap", "wait_for_main", "wrap"
]
