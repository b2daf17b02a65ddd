#!/usr/bin/env bash
# A throw-away one-node SLURM cluster on localhost, for tests and for trying
# the templates in slurm/ by hand.
#
#   tests/e2e/slurm_cluster.sh start    install (apt) if needed, configure, start, wait until idle
#   tests/e2e/slurm_cluster.sh stop     stop exactly the daemons this script started
#   tests/e2e/slurm_cluster.sh status   say what runs; exit 0 only when the node answers
#   tests/e2e/slurm_cluster.sh env      print 'export SLURM_CONF=...' for eval
#
# Everything lives in one state folder, ${DTL_SLURM_STATE:-/tmp/dtl-slurm}:
# slurm.conf, spool/state dirs, daemon logs and pid files.  The daemons and the
# clients find the config through SLURM_CONF, so after `start` run
#   export SLURM_CONF=/tmp/dtl-slurm/slurm.conf      (or: eval "$(tests/e2e/slurm_cluster.sh env)")
# Jobs inherit SLURM_CONF from sbatch's environment, so srun inside a job finds it too.
# A freshly started controller cancels the jobs it recovers from an earlier life of the cluster.
#
# Needs root (it installs packages and starts munged as the munge user) and no
# systemd.  Tested with Debian bookworm's Slurm 22.05 / munge 0.5.15.
set -euo pipefail

STATE=${DTL_SLURM_STATE:-/tmp/dtl-slurm}
CONF="$STATE/slurm.conf"
WAIT_S=${DTL_SLURM_WAIT:-60}
CONF_CHANGED=""
HOST=$(hostname -s)
export SLURM_CONF="$CONF"

say() { printf '[slurm_cluster] %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# pid file -> pid, only if that process is still alive and is the named program
alive() { # alive NAME -> prints pid, returns 0 when running
    local f="$STATE/$1.pid" pid
    [[ -s $f ]] || return 1
    pid=$(<"$f")
    [[ -d /proc/$pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$1" ]] || return 1
    printf '%s\n' "$pid"
}

install_packages() {
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && [[ -x /usr/sbin/munged ]]; then
        return 0
    fi
    command -v apt-get >/dev/null || die "sbatch/slurmctld missing and no apt-get to install them"
    [[ $(id -u) -eq 0 ]] || die "installing slurm needs root"
    local pkgs=(slurmctld slurmd slurm-client munge)
    say "installing ${pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${pkgs[@]}" >"$STATE/apt.log" 2>&1; then
        say "apt-get install failed; running apt-get update and retrying"
        apt-get update >>"$STATE/apt.log" 2>&1 || true
        apt-get install -y --no-install-recommends "${pkgs[@]}" >>"$STATE/apt.log" 2>&1 \
            || { tail -n 20 "$STATE/apt.log" >&2; die "apt-get install failed (log: $STATE/apt.log)"; }
    fi
}

write_conf() {
    local cpus mem_mib real_mem tmp
    # what slurmd counts (not `nproc`, which obeys OMP_NUM_THREADS and CPU affinity)
    cpus=$(getconf _NPROCESSORS_ONLN 2>/dev/null || nproc --all)
    mem_mib=$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)
    # leave headroom: slurmd marks the node invalid if RealMemory > what it finds
    real_mem=$(( mem_mib > 2048 ? mem_mib - 1024 : mem_mib * 3 / 4 ))
    mkdir -p "$STATE/ctld" "$STATE/spool" "$STATE/log"
    tmp=$(mktemp "$STATE/slurm.conf.XXXXXX")
    chmod 644 "$tmp"
    cat >"$tmp" <<EOF
# written by tests/e2e/slurm_cluster.sh - one node on localhost
ClusterName=dtl
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.daemon.pid
SlurmdPidFile=$STATE/slurmd.daemon.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
KillWait=5
# fast scheduling so a requeued job restarts in seconds, not minutes
SchedulerParameters=sched_interval=5,bf_interval=5
MinJobAge=600
NodeName=$HOST CPUs=$cpus RealMemory=$real_mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    if [[ -f $CONF ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$CONF"
        CONF_CHANGED=1
        say "wrote $CONF (CPUs=$cpus RealMemory=${real_mem}M)"
    fi
}

munge_works() { munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; }

start_munge() {
    if munge_works; then
        return 0
    fi
    id munge >/dev/null 2>&1 || die "no munge user (is the munge package installed?)"
    if [[ ! -s /etc/munge/munge.key ]]; then
        say "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null; then
            mungekey --create --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
        chown munge:munge /etc/munge/munge.key
        chmod 400 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge
    # setpriv execs (no fork), so $! is munged itself; -F keeps it in the foreground
    setsid setpriv --reuid=munge --regid=munge --init-groups /usr/sbin/munged -F \
        </dev/null >>"$STATE/log/munged.out" 2>&1 &
    echo $! >"$STATE/munged.pid"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_works && { say "munged up (pid $(<"$STATE/munged.pid"))"; return 0; }
        sleep 0.2
    done
    tail -n 20 "$STATE/log/munged.out" >&2 || true
    die "munged did not come up"
}

CTLD_STARTED=""
start_daemon() { # start_daemon slurmctld|slurmd
    local name=$1 pid
    if pid=$(alive "$name"); then
        say "$name already running (pid $pid)"
        return 0
    fi
    [[ $name != slurmctld ]] || CTLD_STARTED=1
    setsid "/usr/sbin/$name" -D -f "$CONF" </dev/null >>"$STATE/log/$name.out" 2>&1 &
    echo $! >"$STATE/$name.pid"
    say "started $name (pid $!)"
}

node_state() { sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1; }

wait_idle() {
    local start=$SECONDS st="" resumed=0
    while ((SECONDS - start < WAIT_S)); do
        st=$(node_state || true)
        case $st in
            idle | mixed | allocated | completing) say "node $HOST is $st ($((SECONDS - start)) s)"; return 0 ;;
            down* | drain* | fail*)
                if ((resumed == 0)); then
                    say "node is $st; resuming it"
                    scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi
                ;;
        esac
        for d in slurmctld slurmd; do
            alive "$d" >/dev/null || { tail -n 30 "$STATE/log/$d.out" "$STATE/log/$d.log" >&2 2>/dev/null || true; die "$d exited"; }
        done
        sleep 0.5
    done
    tail -n 30 "$STATE/log/slurmctld.log" "$STATE/log/slurmd.log" >&2 2>/dev/null || true
    die "node $HOST not idle after ${WAIT_S}s (state: '${st:-no answer}')"
}

cmd_start() {
    mkdir -p "$STATE/log"
    install_packages
    write_conf
    # a cluster that is not ours (other state folder, systemd, ...) would clash on ports 6817/6818
    if ! alive slurmctld >/dev/null && pgrep -x slurmctld >/dev/null; then
        die "a slurmctld not started from $STATE is running (pid $(pgrep -x slurmctld | tr '\n' ' ')); stop it first"
    fi
    start_munge
    if [[ -n $CONF_CHANGED ]] && { alive slurmctld || alive slurmd; } >/dev/null; then
        say "slurm.conf changed: restarting the daemons"
        stop_one slurmd
        stop_one slurmctld
    fi
    start_daemon slurmctld
    # slurmd registers with slurmctld; give slurmctld a moment to listen
    local i
    for ((i = 0; i < 40; i++)); do
        scontrol ping 2>/dev/null | grep -q 'is UP' && break
        sleep 0.25
    done
    start_daemon slurmd
    wait_idle
    # slurmctld recovers the jobs of its previous life from $STATE/ctld: left-overs of an interrupted test
    # run would start now and take the CPUs.  A fresh controller cancels them (job ids keep counting up).
    if [[ -n $CTLD_STARTED ]]; then
        local stale
        stale=$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')
        if [[ -n ${stale// /} ]]; then
            say "cancelling jobs left from an earlier run of this cluster: $stale"
            # shellcheck disable=SC2086  # a list of job ids
            scancel $stale || true
        fi
    fi
    say "ready. Use: export SLURM_CONF=$CONF"
}

stop_one() { # stop_one NAME
    local name=$1 pid i
    if pid=$(alive "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -d /proc/$pid ]] || break
            sleep 0.2
        done
        if [[ -d /proc/$pid ]]; then
            say "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$STATE/$name.pid"
}

cmd_stop() {
    # slurmd first: it ends its job steps; then the controller; munge last
    stop_one slurmd
    stop_one slurmctld
    stop_one munged
}

cmd_status() {
    local ok=0 d pid
    for d in munged slurmctld slurmd; do
        if pid=$(alive "$d"); then say "$d running (pid $pid)"; else say "$d not running (from $STATE)"; ok=1; fi
    done
    if [[ -f $CONF ]] && st=$(node_state) && [[ -n $st ]]; then
        say "node $HOST: $st"
    else
        say "no answer from sinfo"
        ok=1
    fi
    return "$ok"
}

case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) printf 'export SLURM_CONF=%q\n' "$CONF" ;;
    *) echo "usage: $0 start|stop|status|env   (state folder: $STATE)" >&2; exit 2 ;;
esac
