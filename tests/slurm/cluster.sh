#!/usr/bin/env bash
# The project's Slurm test cluster on this one host (Debian/Ubuntu, root, no systemd).
#
#   tests/slurm/cluster.sh up       start (idempotent; already up -> rewrite the config and, if it
#                                   changed, `scontrol reconfigure`: running jobs are kept)
#   tests/slurm/cluster.sh down     cancel jobs, stop the daemons it started
#   tests/slurm/cluster.sh status   print daemon and node state; exit 0 if up, 1 if not
#
# Nodes (all on 127.0.0.1, each slurmd in its own UTS namespace so `hostname` differs):
#   partition v100: node1,node2  Gres=gpu:2 each (Default)
#   partition a100: node3,node4  Gres=gpu:4 each
#   partition short: node1,node2, MaxTime=15 min (jobs must fit the partition: issue 21)
# GPUs are fake character devices (major 195), enough for Slurm's GRES bookkeeping.
#
# All state lives under $LLMENERGY_SLURM_DIR (default /tmp/llmenergy-slurm). The
# client tools read /etc/slurm/slurm.conf, which `up` writes (with a marker line)
# and refuses to overwrite when it belongs to someone else.
set -euo pipefail

DIR="${LLMENERGY_SLURM_DIR:-/tmp/llmenergy-slurm}"
CLUSTER="llmenergy"
MARKER="# llmenergy test cluster (tests/slurm/cluster.sh)"
ETC_CONF="/etc/slurm/slurm.conf"
NODES=(node1 node2 node3 node4)
CTLD_PORT="${LLMENERGY_SLURM_CTLD_PORT:-6817}"
DBD_PORT="${LLMENERGY_SLURM_DBD_PORT:-6819}"
NODE_PORT_BASE="${LLMENERGY_SLURM_NODE_PORT_BASE:-17000}"
DB_NAME="slurm_acct_db"
DB_USER="slurm"
DB_PASS="llmenergy-test"
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
UP_TIMEOUT_S="${LLMENERGY_SLURM_UP_TIMEOUT_S:-120}"

log() { printf 'cluster.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

now_s() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.1f", b - a }'; }

pid_alive() {  # pid_alive FILE -> 0 if the pid in FILE is a running process
  local f="$1" pid
  [[ -s "$f" ]] || return 1
  pid="$(cat "$f" 2>/dev/null)" || return 1
  [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
  # a killed daemon not yet reaped is a zombie: not running
  [[ "$(awk '{ print $3 }' "/proc/$pid/stat" 2>/dev/null)" != "Z" ]]
}

need_root() {
  [[ "$(id -u)" == 0 ]] || die "must run as root (it starts munge, mariadb and the Slurm daemons)"
}

install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
      missing+=("$p")
    fi
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  command -v apt-get >/dev/null || die "packages missing (${missing[*]}) and no apt-get"
  log "installing ${missing[*]}"
  local t0; t0="$(now_s)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$DIR/log/apt.log" 2>&1 \
    || { tail -n 30 "$DIR/log/apt.log" >&2; die "apt-get install failed"; }
  log "installed in $(elapsed "$t0") s"
}

write_configs() {
  mkdir -p "$DIR"/{etc,run,log,state,spool,dev}
  # Fake GPU devices: Slurm wants character devices; major 195 is NVIDIA's.
  local i
  for i in 0 1 2 3; do
    [[ -c "$DIR/dev/nvidia$i" ]] || { rm -f "$DIR/dev/nvidia$i"; mknod "$DIR/dev/nvidia$i" c 195 "$i"; }
  done
  local host; host="$(hostname -s)"
  local nodelines="" n port
  for i in "${!NODES[@]}"; do
    n="${NODES[$i]}"
    port=$((NODE_PORT_BASE + i + 1))
    if (( i < 2 )); then gres="gpu:2"; else gres="gpu:4"; fi
    nodelines+="NodeName=$n NodeHostname=localhost NodeAddr=127.0.0.1 Port=$port"
    nodelines+=" CPUs=16 Boards=1 SocketsPerBoard=1 CoresPerSocket=16 ThreadsPerCore=1"
    nodelines+=" RealMemory=12000 Gres=$gres State=UNKNOWN"$'\n'
  done
  cat >"$DIR/etc/slurm.conf" <<EOF
$MARKER
# state dir: $DIR
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd.%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
GresTypes=gpu
MinJobAge=300
MailProg=/bin/true
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
$nodelines
PartitionName=v100 Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
PartitionName=a100 Nodes=node[3-4] MaxTime=INFINITE State=UP
PartitionName=short Nodes=node[1-2] MaxTime=15 State=UP
EOF
  cat >"$DIR/etc/gres.conf" <<EOF
$MARKER
AutoDetect=off
NodeName=node[1-2] Name=gpu File=$DIR/dev/nvidia[0-1]
NodeName=node[3-4] Name=gpu File=$DIR/dev/nvidia[0-3]
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=$DB_NAME
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
  # Client tools (sinfo, sbatch, sacct, submitit) read the default path.
  mkdir -p /etc/slurm
  if [[ -e "$ETC_CONF" ]] && ! grep -qF "$MARKER" "$ETC_CONF"; then
    die "$ETC_CONF exists and is not ours; remove it or point SLURM_CONF elsewhere"
  fi
  cp "$DIR/etc/slurm.conf" "$ETC_CONF"
  cp "$DIR/etc/gres.conf" /etc/slurm/gres.conf
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then return 0; fi
  if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then mungekey --create --keyfile=/etc/munge/munge.key
    else dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none; fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/run/started-munge"
  local i
  for i in $(seq 50); do
    munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "munged did not answer"
}

mariadb_init() {  # Debian 12 / Ubuntu 22.04+: mariadb; older: mysql
  if [[ -x /etc/init.d/mariadb ]]; then echo /etc/init.d/mariadb; else echo /etc/init.d/mysql; fi
}

start_mariadb() {
  if ! mysqladmin ping >/dev/null 2>&1; then
    # setsid: a signal to the caller's process group (timeout, Ctrl-C) must not reach mariadb.
    setsid "$(mariadb_init)" start >"$DIR/log/mariadb-start.log" 2>&1 </dev/null \
      || { cat "$DIR/log/mariadb-start.log" >&2; die "mariadb did not start"; }
    touch "$DIR/run/started-mariadb"
  fi
  mysql -u root <<EOF
CREATE DATABASE IF NOT EXISTS $DB_NAME;
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
GRANT ALL PRIVILEGES ON $DB_NAME.* TO '$DB_USER'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurmdbd() {
  pid_alive "$DIR/run/slurmdbd.pid" && return 0
  SLURM_CONF="$DIR/etc/slurm.conf" /usr/sbin/slurmdbd
  local i
  for i in $(seq 100); do
    sacctmgr -n -P show cluster >/dev/null 2>&1 && break
    sleep 0.2
  done
  sacctmgr -n -P show cluster >/dev/null 2>&1 || { tail -n 20 "$DIR/log/slurmdbd.log" >&2; die "slurmdbd did not answer"; }
  if ! sacctmgr -n -P show cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
  fi
}

start_slurmctld() {
  pid_alive "$DIR/run/slurmctld.pid" && return 0
  SLURM_CONF="$DIR/etc/slurm.conf" /usr/sbin/slurmctld
  touch "$DIR/run/cold-start"
}

cancel_recovered_jobs() {
  # A cold start begins with no jobs. A controller that died with jobs (a machine image
  # taken mid-run, a killed test run) brings them back from its saved state; they hold
  # their nodes in `mix` with no process behind them until SlurmdTimeout. Cancelling
  # (rather than wiping the state) keeps job ids rising, so sacct's records stay unique.
  [[ -f "$DIR/run/cold-start" ]] || return 0
  rm -f "$DIR/run/cold-start"
  local jobs i
  for i in $(seq 50); do squeue -h >/dev/null 2>&1 && break; sleep 0.2; done
  jobs="$(squeue -h -o %i 2>/dev/null || true)"
  [[ -z "$jobs" ]] && return 0
  log "cold start: cancelling jobs recovered from saved state: $(tr '\n' ' ' <<<"$jobs")"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
}

start_slurmd() {
  local n
  for n in "${NODES[@]}"; do
    pid_alive "$DIR/run/slurmd.$n.pid" && continue
    rm -rf "${DIR:?}/spool/slurmd.$n"  # job scripts and step state of a dead slurmd
    mkdir -p "$DIR/spool/slurmd.$n"
    # Own UTS namespace: `hostname` inside jobs on this node prints $n.
    SLURM_CONF="$DIR/etc/slurm.conf" unshare --uts /bin/sh -c "hostname $n && exec /usr/sbin/slurmd -N $n"
  done
}

nodes_idle() {  # all nodes listed and idle
  local out
  out="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
  local n
  for n in "${NODES[@]}"; do
    grep -qE "^$n idle$" <<<"$out" || return 1
  done
}

resume_stuck_nodes() {
  local n st
  while read -r n st; do
    case "$st" in
      down*|drain*|drng*|fail*) scontrol update NodeName="$n" State=RESUME 2>/dev/null || true ;;
    esac
  done < <(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)
}

wait_ready() {
  local t0="$1" deadline resumed=0
  deadline=$(( $(date +%s) + UP_TIMEOUT_S ))
  until nodes_idle && sacct -n -X -S now >/dev/null 2>&1; do
    if (( $(date +%s) > deadline )); then
      sinfo -N >&2 || true
      for f in "$DIR"/log/slurmctld.log "$DIR"/log/slurmd.node1.log; do
        [[ -f "$f" ]] && { log "tail of $f"; tail -n 15 "$f" >&2; }
      done
      die "cluster not ready after ${UP_TIMEOUT_S} s"
    fi
    if (( resumed == 0 )) && awk -v a="$t0" -v b="$(now_s)" 'BEGIN { exit !(b - a > 8) }'; then
      resume_stuck_nodes; resumed=1
    fi
    sleep 0.3
  done
}

all_daemons_alive() {
  pid_alive "$DIR/run/slurmdbd.pid" && pid_alive "$DIR/run/slurmctld.pid" || return 1
  local n
  for n in "${NODES[@]}"; do pid_alive "$DIR/run/slurmd.$n.pid" || return 1; done
}

reconfigure_if_changed() {  # a running cluster takes a changed slurm.conf (e.g. a new partition)
  local before; before="$(cat "$DIR/etc/slurm.conf" 2>/dev/null || true)"
  write_configs
  if [[ "$before" != "$(cat "$DIR/etc/slurm.conf")" ]]; then
    scontrol reconfigure || die "scontrol reconfigure failed (see $DIR/log/slurmctld.log)"
    log "slurm.conf changed: reconfigured, running jobs kept: $(sinfo -h -o '%P:%l' | tr '\n' ' ')"
  fi
}

cmd_up() {
  need_root
  local t0; t0="$(now_s)"
  if all_daemons_alive && nodes_idle_or_busy && mysqladmin ping >/dev/null 2>&1; then
    reconfigure_if_changed
    log "already up ($DIR)"; return 0
  fi
  mkdir -p "$DIR/log" "$DIR/run"
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  cancel_recovered_jobs
  wait_ready "$t0"
  log "up in $(elapsed "$t0") s: $(sinfo -h -o '%P:%D' | tr '\n' ' ')(state in $DIR)"
}

nodes_idle_or_busy() {  # answering, every node in a usable state
  local out n
  out="$(sinfo -h -N -o '%N %t' 2>/dev/null | sort -u)" || return 1
  for n in "${NODES[@]}"; do
    grep -qE "^$n (idle|mix|alloc|comp)$" <<<"$out" || return 1
  done
}

stop_pidfiles() {  # stop_pidfiles FILE... : TERM them all, wait, then KILL stragglers
  local f pids=() files=() i pid
  for f in "$@"; do
    if pid_alive "$f"; then pids+=("$(cat "$f")"); files+=("$f"); else rm -f "$f"; fi
  done
  [[ ${#pids[@]} -eq 0 ]] && return 0
  kill -TERM "${pids[@]}" 2>/dev/null || true
  for i in $(seq 150); do
    local left=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
    (( left == 0 )) && break
    sleep 0.1
  done
  for pid in "${pids[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored TERM; killing"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -f "${files[@]}"
}

cmd_down() {
  need_root
  local t0; t0="$(now_s)"
  if pid_alive "$DIR/run/slurmctld.pid"; then
    local jobs i
    jobs="$(squeue -h -o %i 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
      log "cancelling jobs: $(tr '\n' ' ' <<<"$jobs")"
      # shellcheck disable=SC2086
      scancel $jobs 2>/dev/null || true
      for i in $(seq 150); do
        [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
        sleep 0.2
      done
    fi
  fi
  local n slurmd_pids=()
  for n in "${NODES[@]}"; do slurmd_pids+=("$DIR/run/slurmd.$n.pid"); done
  stop_pidfiles "${slurmd_pids[@]}"
  stop_pidfiles "$DIR/run/slurmctld.pid" "$DIR/run/slurmdbd.pid"
  if [[ -f "$DIR/run/started-mariadb" ]]; then
    "$(mariadb_init)" stop >/dev/null 2>&1 || true
    rm -f "$DIR/run/started-mariadb"
  fi
  if [[ -f "$DIR/run/started-munge" ]]; then
    stop_pidfiles /run/munge/munged.pid
    rm -f "$DIR/run/started-munge"
  fi
  log "down in $(elapsed "$t0") s"
}

cmd_status() {
  local f name rc=0
  for f in "$DIR"/run/slurmdbd.pid "$DIR"/run/slurmctld.pid "$DIR"/run/slurmd.*.pid; do
    [[ -e "$f" ]] || continue
    name="$(basename "$f" .pid)"
    if pid_alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: dead"; rc=1; fi
  done
  if ! mysqladmin ping >/dev/null 2>&1; then echo "mariadb: not answering (sacct will fail)"; rc=1; fi
  if sinfo -h >/dev/null 2>&1; then
    sinfo -N -o '%N %P %t %c %m %G'
    nodes_idle_or_busy || rc=1
  else
    echo "sinfo: no answer"; rc=1
  fi
  return "$rc"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) cmd_status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
