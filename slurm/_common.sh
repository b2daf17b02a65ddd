# shellcheck shell=bash disable=SC2034  # sets variables for the templates that source it
# Shared by every slurm/*.sbatch (sourced, never run): repo location, the stable run folder, the job log
# with its header, and the signal -> checkpoint -> requeue logic.  See slurm/README.md.
#
# Knobs (environment variables; sbatch passes the submitting shell's environment to the job):
#   DTL_ROOT          the repo (holds train.py); default: the folder sbatch was run from (SLURM_SUBMIT_DIR)
#   PYTHON            interpreter with dtl's dependencies; default: python (else python3) on PATH
#   OUTPUT_ROOT       parent of run folders; default: runs (relative to DTL_ROOT)
#   RUN_DIR           the run folder itself; default: $OUTPUT_ROOT/slurm-$SLURM_JOB_ID.  Set it to an old
#                     job's folder to continue that run in a new job.
#   DTL_MAX_REQUEUES  how often a preempted job requeues itself; default 3
#   DTL_PORT          rendezvous port; default 20000 + SLURM_JOB_ID % 20000 (two jobs on a node differ)
#   GLOO_SOCKET_IFNAME  network interface of dtl's gloo control group; default: NCCL_SOCKET_IFNAME when set
#   DTL_PREFLIGHT     1: run `dtl doctor` on every rank through the same srun line before training (devices,
#                     versions, network, a timed all-reduce); training starts only when its verdict is OK
#   DTL_PREFLIGHT_ARGS  extra flags for the doctor, e.g. "--timeout 120 --sizes-mb 1,64"

# ---- where we are ------------------------------------------------------------------------------------
DTL_ROOT=$(cd "${DTL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}" && pwd)
if [[ ! -f $DTL_ROOT/train.py ]]; then
    echo "dtl: no train.py in $DTL_ROOT: run sbatch from the repo root or set DTL_ROOT=/path/to/repo" >&2
    exit 2
fi
cd "$DTL_ROOT" || exit 2

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    echo "dtl: not inside a SLURM job: submit with sbatch (see slurm/README.md)" >&2
    exit 2
fi

if [[ -z ${PYTHON:-} ]]; then
    PYTHON=$(command -v python || command -v python3 || echo python3)
fi

DTL_MAX_REQUEUES=${DTL_MAX_REQUEUES:-3}
DTL_PORT=${DTL_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
DTL_RESTART=${SLURM_RESTART_COUNT:-0}
# dtl agrees on stop flags and waits for rank 0's writes over a gloo group beside NCCL. gloo binds to the
# address of the hostname unless told otherwise, which on many clusters is 127.0.1.1 or the wrong network
# (ranks on other nodes then hang at start): use the interface NCCL was told to use (gloo has no "^exclude").
if [[ -z ${GLOO_SOCKET_IFNAME:-} && -n ${NCCL_SOCKET_IFNAME:-} && ${NCCL_SOCKET_IFNAME} != ^* ]]; then
    export GLOO_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME#=}
fi
# the first host of the allocation: rendezvous / main process
DTL_HEAD=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname -s)}" 2>/dev/null | head -n1)
DTL_HEAD=${DTL_HEAD:-$(hostname -s)}
# Slurm 22.05-23.02 srun does not inherit the job's --cpus-per-task: pass it on explicitly
DTL_SRUN_CPUS=()
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    DTL_SRUN_CPUS=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
fi

# ---- the run folder: the same across requeues of this job --------------------------------------------
RUN_DIR=${RUN_DIR:-${OUTPUT_ROOT:-runs}/slurm-$SLURM_JOB_ID}
mkdir -p "$RUN_DIR" || exit 2
RUN_DIR=$(cd "$RUN_DIR" && pwd)
DTL_LOG=$RUN_DIR/job.log

# dtl_gpus DEFAULT: GPUs per node from the allocation (--gpus-per-node=4 or a100:4), unless GPUS is set
dtl_gpus() {
    local n=${GPUS:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-$1}}}
    n=${n##*:}
    if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 1)); then
        echo "dtl: cannot tell how many GPUs per node ('$n'): set GPUS=N or sbatch --gpus-per-node=N" >&2
        exit 2
    fi
    echo "$n"
}

# dtl_train_args ARGS...: the trainer's flags from the sbatch command line, plus the run folder and
# --resume auto (always last, so they win).  Result in the array DTL_TRAIN_ARGS.
dtl_train_args() {
    local a
    for a in "$@"; do
        case $a in
            --output-dir | --output-dir=* | --resume | --resume=*)
                echo "dtl: do not pass $a to a SLURM template: it always runs --output-dir \$RUN_DIR" \
                    "--resume auto (set RUN_DIR=... or OUTPUT_ROOT=... instead)" >&2
                exit 2
                ;;
        esac
    done
    DTL_TRAIN_ARGS=("$@" --output-dir "$RUN_DIR" --resume auto)
}

_dtl_header() {
    local rev dirty=""
    rev=$(git -C "$DTL_ROOT" rev-parse HEAD 2>/dev/null) || rev="unknown (not a git checkout or no commit)"
    if [[ -n $(git -C "$DTL_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
        dirty=" (+ uncommitted changes)"
    fi
    echo "======== dtl job $SLURM_JOB_ID (${SLURM_JOB_NAME:-}) run $((DTL_RESTART + 1))," \
        "SLURM_RESTART_COUNT=$DTL_RESTART, $(date '+%F %T')"
    echo "nodes:     ${SLURM_JOB_NODELIST:-?} (${SLURM_JOB_NUM_NODES:-1} node(s)), batch host $(hostname -s)"
    echo "gpus:      ${DTL_GPUS_DESC:-none} (CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-unset})"
    echo "repo:      $DTL_ROOT @ $rev$dirty"
    echo "python:    $PYTHON ($("$PYTHON" --version 2>&1))"
    echo "run dir:   $RUN_DIR"
    echo "launcher:  $(printf '%q ' "$@")"
    local nccl
    nccl=$(env | grep -E '^(NCCL|TORCH_NCCL)_' | tr '\n' ' ')
    [[ -z $nccl ]] || echo "nccl env:  $nccl"
}

_dtl_on_signal() { # the batch shell got $1 (B:USR1 before the time limit, scancel --signal=USR1 --batch, TERM)
    DTL_STOP=$1
    [[ $1 != TERM ]] || DTL_GOT_TERM=1
    echo "dtl: batch shell got SIG$1 at $(date '+%T'): asking the trainer to checkpoint and stop"
    # srun forwards SIGUSR1 to its tasks, slurm/_task.sh on each node, which sends one SIGTERM to torchrun /
    # accelerate / train.py.  (SIGTERM to srun would cancel the step: SIGKILL, no checkpoint.)
    if [[ -n ${DTL_PID:-} ]]; then
        kill -USR1 "$DTL_PID" 2>/dev/null || true
    fi
}

# _dtl_resumable RC START: did the trainer stop on our request, so that a requeue continues the run?
#   - exit code 75 (train.py run directly: per_task);
#   - torchrun / accelerate exit 1 whatever their workers returned: a status.json written during this run
#     that says "preempted";
#   - a stop was requested and the launcher died of that very signal (SIGTERM 143 / SIGUSR1 138): it came
#     before train.py had started or installed its handlers; --resume auto starts from the last checkpoint.
_dtl_resumable() {
    local rc=$1 start=$2 status=$RUN_DIR/status.json
    ((rc == 75)) && return 0
    ((rc == 0 || rc == 2)) && return 1
    if [[ -n $DTL_STOP ]] && ((rc == 143 || rc == 138)); then
        return 0
    fi
    [[ -f $status ]] && (($(stat -c %Y "$status") >= start)) \
        && grep -Eq '"state": *"preempted"' "$status"
}

# _dtl_preflight LAUNCH...: with DTL_PREFLIGHT=1, `LAUNCH -m dtl.cli doctor` (every rank, the same srun line
# as training); a failed verdict ends the job (exit 1, no requeue) before any training starts.
_dtl_preflight() {
    [[ ${DTL_PREFLIGHT:-0} == 1 ]] || return 0
    local extra=()
    read -ra extra <<<"${DTL_PREFLIGHT_ARGS:-}"
    echo "dtl: preflight: $(printf '%q ' "$@" -m dtl.cli doctor "${extra[@]}")"
    if ! "$@" -m dtl.cli doctor "${extra[@]}"; then
        echo "dtl: preflight failed (the doctor's verdict is above): not training"
        exit 1
    fi
}

# dtl_launch LAUNCH...: print the header, run `LAUNCH train.py DTL_TRAIN_ARGS` (LAUNCH: an srun line ending in
# the launcher or the interpreter) in the background, forward stop signals to it, wait, then requeue the job
# if the trainer stopped resumably.  Exits the batch script.
dtl_launch() {
    local cmd=("$@" train.py "${DTL_TRAIN_ARGS[@]}")
    # everything from here on goes to the per-job log; the Slurm output file gets the header and a pointer
    _dtl_header "${cmd[@]}" | tee -a "$DTL_LOG"
    echo "dtl: job log: $DTL_LOG"
    exec >>"$DTL_LOG" 2>&1
    _dtl_preflight "$@"

    DTL_STOP="" DTL_PID="" DTL_GOT_TERM=""
    trap '_dtl_on_signal USR1' USR1
    trap '_dtl_on_signal TERM' TERM
    local start rc=0
    start=$(date +%s)
    "${cmd[@]}" &
    DTL_PID=$!
    [[ -z $DTL_STOP ]] || kill -USR1 "$DTL_PID" 2>/dev/null || true # a signal that came before the start
    # wait returns early (>128) when a trapped signal arrives: keep waiting for the launcher itself
    while :; do
        rc=0
        wait "$DTL_PID" || rc=$?
        if ((rc > 128)) && kill -0 "$DTL_PID" 2>/dev/null; then
            continue
        fi
        break
    done
    echo "dtl: launcher exited with $rc at $(date '+%T') after $(($(date +%s) - start)) s"

    if ((rc == 0)); then
        echo "dtl: training finished"
        exit 0
    fi
    if _dtl_resumable "$rc" "$start"; then
        if [[ -n $DTL_GOT_TERM ]]; then
            # scancel, the time limit itself, or the scheduler preempting/requeueing the job: SIGTERM to
            # everything.  A requeue here would bring back a job the user cancelled (scontrol requeue also
            # works on ended jobs); a scheduler preemption with PreemptMode=REQUEUE requeues by itself.
            echo "dtl: stopped with a checkpoint, but Slurm is ending this job (SIGTERM): not requeueing." \
                "Continue it with: RUN_DIR=$RUN_DIR sbatch <template> <same flags>"
        elif ((DTL_RESTART < DTL_MAX_REQUEUES)); then
            echo "dtl: stopped with a checkpoint; requeueing job $SLURM_JOB_ID" \
                "(requeue $((DTL_RESTART + 1)) of at most $DTL_MAX_REQUEUES); it resumes in $RUN_DIR"
            trap - USR1 TERM
            if scontrol requeue "$SLURM_JOB_ID"; then
                exit 0
            fi
            echo "dtl: scontrol requeue failed (was the job submitted with --requeue?)"
        else
            echo "dtl: stopped with a checkpoint, but the job was requeued $DTL_RESTART times already" \
                "(DTL_MAX_REQUEUES=$DTL_MAX_REQUEUES): not requeueing. Continue it with:" \
                "RUN_DIR=$RUN_DIR sbatch <template> <same flags>"
        fi
        exit 75
    fi
    echo "dtl: training failed (exit $rc): not requeueing"
    exit "$rc"
}
