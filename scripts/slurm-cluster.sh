#!/usr/bin/env bash
# A private one-node Slurm cluster (munged + slurmctld + slurmd) living entirely in DIR, for testing
# the launch/ scripts against a real Slurm on a workstation or CI machine (Slurm 22.05 + munge; install
# them with `FERROFOLD_WITH_SLURM=1 scripts/setup.sh`). Needs root (slurmd runs jobs as any user).
#
#   scripts/slurm-cluster.sh start  DIR   write DIR/slurm.conf for this host, start the daemons, wait
#                                         until the node is idle (idempotent: a running cluster is kept)
#   scripts/slurm-cluster.sh stop   DIR   cancel its jobs, stop the daemons by the pids in DIR/*.pid
#                                         (never by name: other clusters may run beside it); idempotent
#   scripts/slurm-cluster.sh status DIR   print which daemons run and `sinfo`; exit 1 if not all run
#
# FERROFOLD_SLURM_OWNER=PID (start): also start a watcher that stops the cluster once process PID is
# gone, so a test killed hard (no destructors run) leaves no daemons behind.
#
# Then point the clients at it:  export SLURM_CONF=DIR/slurm.conf  (or `source DIR/env.sh`).
#
# Several clusters can run side by side (e.g. parallel test runs): each has its own munged (socket
# DIR/munge/munge.socket, its own key), its own ports (a free pair picked at first start, kept in
# DIR/ports; FERROFOLD_SLURM_PORT=P forces P and P+1), its own state and spool directories.
# The node line (CPUs, cores, memory) comes from `slurmd -C`, so a job asking for more CPUs than this
# machine has stays PENDING, as on a real cluster.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
mkdir -p "$2"
DIR=$(cd "$2" && pwd)
export SLURM_CONF=$DIR/slurm.conf

alive() { # alive PIDFILE: the pid in the file names a running process
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1" 2>/dev/null) || return 1
  [[ $pid =~ ^[0-9]+$ ]] && running "$pid"
}

running() { # running PID: exists and is not a zombie (a container's pid 1 may never reap daemons)
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

pick_ports() {
  if [ -s "$DIR/ports" ]; then return; fi
  local p
  if [ -n "${FERROFOLD_SLURM_PORT:-}" ]; then
    p=$FERROFOLD_SLURM_PORT
  else
    # Below the kernel's ephemeral range (outgoing connections, e.g. mpirun's, take ports from
    # there and could grab ours between this check and the daemons' bind).
    local lo
    lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "${lo:-0}" -gt 12000 ] 2>/dev/null || lo=32768
    for _ in $(seq 50); do
      p=$((10000 + RANDOM % (lo - 10002)))
      if port_free "$p" && port_free $((p + 1)); then break; fi
    done
  fi
  echo "$p" >"$DIR/ports"
}

write_conf() {
  local host node port
  host=$(hostname -s)
  # `slurmd -C` prints this machine's node line (NodeName=... CPUs=... RealMemory=...).
  node=$(slurmd -C 2>/dev/null | head -1 || true)
  if [[ $node != NodeName=* ]]; then
    node="NodeName=$host CPUs=$(nproc) RealMemory=1000"
  fi
  port=$(cat "$DIR/ports")
  cat >"$DIR/slurm.conf" <<EOF
# Written by scripts/slurm-cluster.sh: a private one-node cluster in $DIR
ClusterName=ferrofold
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=pmix
ReturnToService=2
KillWait=5
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
  echo "export SLURM_CONF=$DIR/slurm.conf" >"$DIR/env.sh"
}

start_munged() {
  alive "$DIR/munge/munged.pid" && return
  mkdir -p "$DIR/munge"
  chown munge:munge "$DIR/munge"
  # munged (running as the munge user) must reach its socket; clients need execute on every dir.
  chmod 0755 "$DIR" "$DIR/munge"
  if [ ! -s "$DIR/munge/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$DIR/munge/munge.key"
  fi
  runuser -u munge -- /usr/sbin/munged \
    --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" \
    --seed-file="$DIR/munge/munged.seed" </dev/null >>"$DIR/munge/munged.out" 2>&1 || {
    echo "slurm-cluster: munged failed to start:" >&2
    tail -n 3 "$DIR/munge/munged.log" >&2 || true
    exit 1
  }
}

wait_for() { # wait_for SECONDS CMD...: poll CMD every 0.1 s
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    [ $SECONDS -lt $deadline ] || return 1
    sleep 0.1
  done
}

node_idle() { [ "$(sinfo -h -o %T 2>/dev/null | head -1)" = idle ]; }

start() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null || {
    echo "slurm-cluster: slurmctld/munged not found: run FERROFOLD_WITH_SLURM=1 scripts/setup.sh" >&2
    exit 1
  }
  [ "$(id -u)" = 0 ] || { echo "slurm-cluster: must run as root" >&2; exit 1; }
  mkdir -p "$DIR/state" "$DIR/spool"
  pick_ports
  [ -s "$DIR/slurm.conf" ] || write_conf
  start_munged
  wait_for 10 test -S "$DIR/munge/munge.socket" || { echo "slurm-cluster: munged did not start (see $DIR/munge/munged.log)" >&2; exit 1; }
  if ! alive "$DIR/slurmctld.pid"; then
    slurmctld </dev/null >>"$DIR/slurmctld.out" 2>&1
  fi
  if ! alive "$DIR/slurmd.pid"; then
    slurmd </dev/null >>"$DIR/slurmd.out" 2>&1
  fi
  if ! wait_for 30 node_idle; then
    echo "slurm-cluster: node not idle after 30 s; logs in $DIR" >&2
    sinfo >&2 || true
    tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
    exit 1
  fi
  if [ -n "${FERROFOLD_SLURM_OWNER:-}" ] && ! alive "$DIR/watch.pid"; then
    local self
    self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
    # Its own session, so nothing that kills the caller's process group takes it along.
    setsid bash -c 'echo $$ >"$1/watch.pid"
      while [ -e "/proc/$2" ] && [ "$(awk "{print \$3}" "/proc/$2/stat" 2>/dev/null)" != Z ] && [ -e "$1/watch.pid" ]; do sleep 1; done
      if [ -e "$1/watch.pid" ]; then rm -f "$1/watch.pid"; "$3" stop "$1"; fi' \
      _ "$DIR" "$FERROFOLD_SLURM_OWNER" "$self" </dev/null >>"$DIR/watch.out" 2>&1 &
  fi
  echo "slurm-cluster: up in $DIR (SLURM_CONF=$SLURM_CONF, ports $(cat "$DIR/ports")/$(($(cat "$DIR/ports") + 1)))"
}

stop_pidfile() { # stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
  local f=$1 pid
  alive "$f" || { rm -f "$f"; return 0; }
  pid=$(cat "$f")
  kill -TERM "$pid" 2>/dev/null || true
  if ! wait_for 10 eval "! running $pid"; then
    echo "slurm-cluster: $2 ($pid) ignored SIGTERM; killing" >&2
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

stop() {
  if alive "$DIR/slurmctld.pid" && [ -s "$DIR/slurm.conf" ]; then
    # Cancel what still runs, so no job step outlives its slurmd.
    if [ -n "$(squeue -h -o %i 2>/dev/null)" ]; then
      scancel --full --quiet $(squeue -h -o %i) 2>/dev/null || true
      wait_for 15 eval '[ -z "$(squeue -h -t R,CG -o %i 2>/dev/null)" ]' || true
    fi
  fi
  # The owner watcher (if any) ends by itself once its pid file is gone.
  rm -f "$DIR/watch.pid"
  stop_pidfile "$DIR/slurmd.pid" slurmd
  stop_pidfile "$DIR/slurmctld.pid" slurmctld
  stop_pidfile "$DIR/munge/munged.pid" munged
  echo "slurm-cluster: stopped ($DIR)"
}

status() {
  local ok=0 f
  for f in munge/munged.pid slurmctld.pid slurmd.pid; do
    if alive "$DIR/$f"; then echo "$f: running ($(cat "$DIR/$f"))"; else echo "$f: not running"; ok=1; fi
  done
  [ $ok = 0 ] && sinfo || true
  return $ok
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) usage ;;
esac
