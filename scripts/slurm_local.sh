#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, from Debian's slurm-wlm and munge packages: the real scheduler, so that
# the SLURM launchers (hydra/launcher=slurm, slurm_multigpu) are tested the way users run them.
#
#   bash scripts/slurm_local.sh start     # install the packages if missing (apt-get, root), start munged, slurmctld
#                                         # and slurmd; wait until the node is idle; idempotent
#   eval "$(bash scripts/slurm_local.sh env)"   # SLURM_CONF for sbatch / squeue / scontrol in this shell
#   bash scripts/slurm_local.sh status    # the daemons' pids and sinfo; exit 0 only if the cluster is up
#   bash scripts/slurm_local.sh stop      # stop every daemon and remove the folder: nothing left running
#
# Everything (config, munge key and socket, state, spool, logs, pid files) lives under one folder,
# $OPD_SLURM_DIR (default /tmp/opd-slurm); the ports are $OPD_SLURM_PORT and the one after it (default 6817, 6818).
# The node is this machine: its short hostname, every CPU (nproc) and its memory less 1 GiB, in one partition
# `local` (the default). Process tracking is plain /proc (proctrack/linuxproc, task/none): no cgroups needed.
# There is no accounting database (sacct reports that accounting is disabled); submitit then reads a job's end
# from its result file, which it always writes.
#
# `start` exits 3 with one line saying why when the cluster cannot be brought up here (no apt-get or not root and
# the packages missing, or a daemon that does not start): tests/run/test_slurm.py skips on that line, never silently.
set -euo pipefail

ROOT=${OPD_SLURM_DIR:-/tmp/opd-slurm}
PORT=${OPD_SLURM_PORT:-6817}
CONF=$ROOT/etc/slurm.conf
HOST=$(hostname -s)

cannot() { echo "slurm_local: cannot start a local SLURM cluster: $*" >&2; exit 3; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  command -v apt-get >/dev/null || cannot "slurm-wlm/munge are not installed and there is no apt-get"
  [ "$(id -u)" = 0 ] || cannot "slurm-wlm/munge are not installed and installing them needs root (apt-get)"
  echo "slurm_local: installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >"$ROOT/apt.log" 2>&1 \
    || { apt-get update -q >>"$ROOT/apt.log" 2>&1 && \
         apt-get install -y -q --no-install-recommends slurm-wlm munge >>"$ROOT/apt.log" 2>&1; } \
    || cannot "apt-get install slurm-wlm munge failed (see $ROOT/apt.log)"
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

write_config() {
  local mem_mb cpus
  cpus=$(nproc)
  mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$ROOT"/{etc,munge,ctld,spool,log,run}
  chmod 700 "$ROOT/munge"
  cat >"$CONF" <<EOF
# written by scripts/slurm_local.sh: a one-node cluster under $ROOT
ClusterName=opdlab
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$ROOT/munge/munge.socket,cred_expire=10
StateSaveLocation=$ROOT/ctld
SlurmdSpoolDir=$ROOT/spool/%n
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobRequeue=1
KillWait=2
MinJobAge=300
InactiveLimit=0
SchedulerParameters=sched_interval=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=local Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

start_munge() {
  alive "$ROOT/run/munged.pid" && return 0
  if [ ! -f "$ROOT/munge/munge.key" ]; then
    dd if=/dev/urandom of="$ROOT/munge/munge.key" bs=1024 count=1 status=none
    chmod 400 "$ROOT/munge/munge.key"
  fi
  munged --force --key-file="$ROOT/munge/munge.key" --socket="$ROOT/munge/munge.socket" \
    --pid-file="$ROOT/run/munged.pid" --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munge.seed" \
    || cannot "munged did not start (see $ROOT/log/munged.log)"
}

wait_idle() {
  local state=""
  for _ in $(seq 1 60); do
    state=$(SLURM_CONF=$CONF sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1 || true)
    case "$state" in
      idle|mix|alloc) return 0 ;;
      down*|drain*|unk*) SLURM_CONF=$CONF scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
  done
  cannot "the node did not become idle (state '${state:-none}'; see $ROOT/log/slurmctld.log and slurmd.log)"
}

cmd_start() {
  mkdir -p "$ROOT"
  install_packages
  [ -f "$CONF" ] || write_config
  start_munge
  alive "$ROOT/run/slurmctld.pid" || slurmctld -f "$CONF" \
    || cannot "slurmctld did not start (see $ROOT/log/slurmctld.log)"
  alive "$ROOT/run/slurmd.pid" || slurmd -f "$CONF" || cannot "slurmd did not start (see $ROOT/log/slurmd.log)"
  wait_idle
  echo "slurm_local: cluster up under $ROOT (node $HOST, $(nproc) CPUs, partition local); export SLURM_CONF=$CONF"
}

cmd_stop() {
  [ -d "$ROOT" ] || { echo "slurm_local: nothing to stop ($ROOT does not exist)"; return 0; }
  if [ -f "$CONF" ] && command -v scancel >/dev/null; then
    SLURM_CONF=$CONF scancel --full --quiet --user="$(id -un)" 2>/dev/null || true
  fi
  for name in slurmd slurmctld munged; do
    local pidfile="$ROOT/run/$name.pid"
    if alive "$pidfile"; then
      local pid; pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -9 "$pid" 2>/dev/null || true
    fi
  done
  # job steps left behind by slurmd (slurmstepd) belong to this folder's cluster
  pkill -f "slurmstepd.*$ROOT" 2>/dev/null || true
  rm -rf "$ROOT"
  echo "slurm_local: stopped; $ROOT removed"
}

cmd_status() {
  local up=0
  for name in munged slurmctld slurmd; do
    if alive "$ROOT/run/$name.pid"; then echo "$name: running (pid $(cat "$ROOT/run/$name.pid"))"
    else echo "$name: not running"; up=1; fi
  done
  [ "$up" = 0 ] && SLURM_CONF=$CONF sinfo
  return $up
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start | stop | status | env" >&2; exit 2 ;;
esac
