#!/bin/bash
# The srun task on each node:  srun ... bash slurm/_task.sh CMD...   (CMD: torchrun, accelerate launch, or
# train.py itself in per_task.sbatch).  It makes the batch shell's stop request reach train.py without
# killing the launcher in between.
#
# How a stop request travels: the batch shell gets SIGUSR1 (--signal=B:USR1@90, or scancel --signal=USR1
# --batch) and sends SIGUSR1 to srun; srun forwards it to every process of the step (slurmstepd signals
# the whole step: this wrapper, the launcher, the workers, their DataLoader workers).
#   - The torchrun agent (also inside `accelerate launch`) handles only SIGTERM/SIGINT/SIGHUP/SIGQUIT: a
#     SIGUSR1 kills it, and its workers are then SIGKILLed without a checkpoint.  So CMD starts with SIGUSR1
#     ignored; train.py installs its own handler, so it still gets the signal.
#   - This wrapper sends CMD one SIGTERM as well: torchrun passes it on to each worker and waits (30 s) for
#     them to write the checkpoint; where Slurm signals only the task's process group (proctrack/pgid),
#     that is how the workers hear of it.  train.py treats repeated stop signals as one.
# (Sending SIGTERM to srun instead makes srun cancel the whole step at once: no checkpoint.)
#
# Also replaces the literal argument text @SLURM_NODEID@ by this node's index (accelerate's --machine_rank).

args=()
for a in "$@"; do
    args+=("${a//@SLURM_NODEID@/${SLURM_NODEID:-0}}")
done

pid="" want="" done_or_term=""
# shellcheck disable=SC2329  # called from the trap below
on_usr1() {
    [[ -z $done_or_term ]] || return 0
    want=1
    echo "dtl task on $(hostname -s): got SIGUSR1, sending SIGTERM to the launcher" >&2
    if [[ -n $pid ]]; then
        kill -TERM "$pid" 2>/dev/null || true
        done_or_term=1
    fi
}
# SIGTERM reaches this wrapper only when Slurm signals every process of the step (scancel, time limit,
# preemption, scontrol requeue): torchrun got it too, and a second SIGTERM would cut its wait for the
# workers short.  So just remember it.
trap 'on_usr1' USR1
trap 'done_or_term=1' TERM

# SIGUSR1 ignored in CMD (kept across exec); exec, so $! is CMD itself
(
    trap '' USR1
    exec "${args[@]}"
) &
pid=$!
if [[ -n $want && -z $done_or_term ]]; then # SIGUSR1 came before the launcher started
    kill -TERM "$pid" 2>/dev/null || true
    done_or_term=1
fi
while :; do
    rc=0
    wait "$pid" || rc=$?
    if ((rc > 128)) && kill -0 "$pid" 2>/dev/null; then
        continue
    fi
    break
done
exit "$rc"
