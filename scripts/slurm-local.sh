#!/usr/bin/env bash
# A single-node SLURM on this machine, for trying the SLURM deploy mode and for the tests.
#
#   bash scripts/slurm-local.sh start    # install (Debian packages) if missing, configure, start
#   bash scripts/slurm-local.sh status   # exit 0 when the node is up and idle/mixed/allocated
#   bash scripts/slurm-local.sh stop     # stop slurmd, slurmctld and munged
#
# Idempotent: a second `start` finds everything running and only waits for the node; a cold start
# begins with an empty queue. Needs root (it installs packages and starts daemons) on
# Debian/Ubuntu; no systemd: the daemons are started directly. Memory limits are enforced by polling (jobacct_gather/linux + OverMemoryKill), so a
# job that outgrows its --mem is killed by SLURM, as on a real cluster.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_SOCKET=/run/munge/munge.socket.2
WAIT_SECONDS=${SLURM_LOCAL_WAIT:-60}

log() { echo "slurm-local: $*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    log "must run as root (it installs packages and starts daemons); try: sudo $0 $*"
    exit 1
  fi
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

install_packages() {
  local missing=()
  for cmd in munged slurmctld slurmd sbatch; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing munge slurmctld slurmd slurm-client (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client \
    >/tmp/slurm-local-apt.log 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends munge slurmctld slurmd slurm-client \
      >/tmp/slurm-local-apt.log 2>&1 || { cat /tmp/slurm-local-apt.log >&2; exit 1; }
  fi
}

start_munge() {
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    install -d -o munge -g munge -m 0700 /etc/munge
    if command -v mungekey >/dev/null 2>&1; then
      runuser -u munge -- mungekey --create --keyfile /etc/munge/munge.key
    else
      dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
  fi
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return 0
  fi
  log "starting munged"
  runuser -u munge -- /usr/sbin/munged --force
  for _ in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  log "munged did not answer on $MUNGE_SOCKET"
  exit 1
}

write_config() {
  # The node line comes from the hardware slurmd sees (CPUs, sockets, memory), renamed to
  # localhost; a little memory is held back for the daemons and the flow process.
  local node mem
  node=$(slurmd -C | head -n 1)
  mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$node")
  node=$(sed -e 's/^NodeName=[^ ]*/NodeName=localhost NodeAddr=127.0.0.1/' \
    -e "s/RealMemory=[0-9]*/RealMemory=$((mem - 512))/" <<<"$node")
  mkdir -p "$CONF_DIR" "$STATE" "$SPOOL" "$LOGS"
  local tmp
  tmp=$(mktemp)
  cat >"$tmp" <<EOF
# Written by zarr-parallel scripts/slurm-local.sh: a single-node SLURM for tests and trials.
ClusterName=zarr-parallel-local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=1024
JobAcctGatherType=jobacct_gather/linux
# Poll every second so a job over its --mem is killed promptly.
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0
ReturnToService=2
MailProg=/bin/true
KillWait=5
MinJobAge=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  if ! cmp -s "$tmp" "$CONF"; then
    mv "$tmp" "$CONF"
    chmod 0644 "$CONF"
    CONFIG_CHANGED=1
  else
    rm -f "$tmp"
  fi
}

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n 1 | tr -d '*~#!%$@^-'; }

wait_idle() {
  local state=""
  for _ in $(seq $((WAIT_SECONDS * 2))); do
    state=$(node_state || true)
    case "$state" in
      idle | mixed | allocated | completing) log "node localhost is $state"; return 0 ;;
      down | drained | draining | drain)
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  log "node localhost is not idle after ${WAIT_SECONDS}s (state: ${state:-unknown}); see $LOGS"
  tail -n 20 "$LOGS/slurmctld.log" "$LOGS/slurmd.log" >&2 || true
  exit 1
}

start() {
  need_root start
  install_packages
  start_munge
  CONFIG_CHANGED=0
  write_config
  if [ "$CONFIG_CHANGED" = 1 ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
    log "configuration changed: restarting the daemons"
    stop_slurm
  fi
  if ! alive "$CTLD_PID"; then
    # -c: a cold start forgets the jobs of an earlier life of this machine's SLURM (a killed test
    # run's workers), which slurmctld would otherwise recover and hold the node with.
    log "starting slurmctld (clean state)"
    slurmctld -c
  fi
  if ! alive "$SLURMD_PID"; then
    log "starting slurmd"
    slurmd -N localhost
  fi
  wait_idle
}

stop_pid() {
  local file=$1 name=$2
  if alive "$file"; then
    local pid
    pid=$(cat "$file")
    log "stopping $name ($pid)"
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

stop_slurm() {
  stop_pid "$SLURMD_PID" slurmd
  stop_pid "$CTLD_PID" slurmctld
}

stop() {
  need_root stop
  stop_slurm
  stop_pid /run/munge/munged.pid munged
}

status() {
  if ! command -v sinfo >/dev/null 2>&1; then
    log "not installed (run: $0 start)"
    return 1
  fi
  if ! alive "$CTLD_PID" || ! alive "$SLURMD_PID"; then
    log "not running (run: $0 start)"
    return 1
  fi
  local state
  state=$(node_state || true)
  sinfo
  case "$state" in
    idle | mixed | allocated | completing) return 0 ;;
    *) log "node localhost is ${state:-unknown}"; return 1 ;;
  esac
}

case "${1:-status}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|status|restart" >&2; exit 2 ;;
esac
