#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, for the tests of the slurm profile.
#   tests/slurm/cluster.sh up      install (Debian packages) if needed, configure, start, wait until idle
#   tests/slurm/cluster.sh down    stop the daemons by their PIDs
#   tests/slurm/cluster.sh status  print the node state (exit 1 when the cluster is not up)
# Needs root and Debian's slurm packages (installed on first `up` from the package registry).
# Slurm 22.05 + munge + slurmdbd on a local MariaDB (so `sacct`, the executor's default status
# command, works); one node with all CPUs, 90 % of the memory and one fake GPU (gres File=/dev/null).
# No systemd: the daemons are started by hand and stopped by PID. `up` is idempotent.
set -euo pipefail

NODE=$(hostname -s)
CPUS=$(nproc)
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)
PKGS=(munge slurmctld slurmd slurm-client slurmdbd mariadb-server)
DB_PASS=ncd-slurmdb
log() { echo "[cluster.sh] $*" >&2; }

pid_alive() {  # pid_alive PIDFILE NAME: the PID in the file runs a process called NAME
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local secs=$1 what=$2; shift 2
    for _ in $(seq $((secs * 5))); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    log "timed out after ${secs}s waiting for $what"
    return 1
}

install_packages() {
    local missing=()
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" -eq 0 ] || { log "need root to install ${missing[*]}"; exit 1; }
    log "installing ${missing[*]}"
    # no service starts during installation: there is no init system, and we start them below
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' RETURN
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

write_if_changed() {  # write_if_changed FILE MODE OWNER < content
    local file=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp)
    cat > "$tmp"
    if ! cmp -s "$tmp" "$file" 2>/dev/null; then
        install -m "$mode" -o "${owner%:*}" -g "${owner#*:}" "$tmp" "$file"
    fi
    rm -f "$tmp"
}

configure() {
    mkdir -p /etc/slurm /run/munge /run/slurm /run/mysqld /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    chown munge:munge /run/munge
    chown slurm:slurm /run/slurm /var/spool/slurmctld /var/log/slurm
    chown mysql:mysql /run/mysqld
    write_if_changed /etc/slurm/slurm.conf 0644 root:root <<CONF
ClusterName=ncdtest
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/affinity
SwitchType=switch/none
ReturnToService=2
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
AccountingStorageEnforce=associations
AccountingStorageTRES=gres/gpu
GresTypes=gpu
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=60
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${MEM_MB} State=UNKNOWN Gres=gpu:1
PartitionName=debug Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP
CONF
    # a fake GPU: without File= slurmd reports no GPU and the node drains
    write_if_changed /etc/slurm/gres.conf 0644 root:root <<CONF
NodeName=${NODE} Name=gpu File=/dev/null
CONF
    write_if_changed /etc/slurm/slurmdbd.conf 0600 slurm:slurm <<CONF
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=slurm
LogFile=/var/log/slurm/slurmdbd.log
PidFile=/run/slurm/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StoragePort=3306
StorageUser=slurm
StoragePass=${DB_PASS}
StorageLoc=slurm_acct_db
CONF
    [ -s /etc/munge/munge.key ] || mungekey --create --keyfile /etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
}

start_daemons() {
    if ! pid_alive /run/munge/munged.pid munged; then
        runuser -u munge -- /usr/sbin/munged --force
        wait_for 10 munged munge -n
    fi
    if ! pid_alive /run/mysqld/mysqld.pid mariadbd; then
        setsid /usr/sbin/mariadbd --user=mysql --pid-file=/run/mysqld/mysqld.pid --bind-address=127.0.0.1 \
            >/var/log/slurm/mariadb.log 2>&1 < /dev/null &
        wait_for 30 mariadb mysqladmin ping
    fi
    mysql -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '${DB_PASS}';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
SQL
    if ! pid_alive /run/slurm/slurmdbd.pid slurmdbd; then
        /usr/sbin/slurmdbd
        wait_for 30 slurmdbd sacctmgr -n list cluster
    fi
    sacctmgr -i -Q add cluster ncdtest >/dev/null 2>&1 || true
    sacctmgr -i -Q add account default >/dev/null 2>&1 || true
    sacctmgr -i -Q add user "$(id -un)" Account=default DefaultAccount=default >/dev/null 2>&1 || true
    if ! pid_alive /run/slurm/slurmctld.pid slurmctld; then
        /usr/sbin/slurmctld
        wait_for 30 slurmctld scontrol ping
    fi
    if ! pid_alive /run/slurm/slurmd.pid slurmd; then
        /usr/sbin/slurmd
    fi
}

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -1; }

wait_idle() {
    for _ in $(seq 150); do
        case "$(node_state)" in
            idle|mix|alloc) return 0 ;;
            drain*|drng|inval|down*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.2
    done
    log "node $NODE is not idle: $(node_state); see /var/log/slurm/slurmd.log and slurmctld.log"
    return 1
}

up() {
    install_packages
    configure
    start_daemons
    wait_idle
    srun -N1 -n1 -t 1 true
    log "up: node $NODE $(node_state), $CPUS CPUs, ${MEM_MB} MB, gres gpu:1 (fake)"
}

down() {
    local pidfile name pid
    for pair in /run/slurm/slurmd.pid:slurmd /run/slurm/slurmctld.pid:slurmctld /run/slurm/slurmdbd.pid:slurmdbd \
                /run/mysqld/mysqld.pid:mariadbd /run/munge/munged.pid:munged; do
        pidfile=${pair%%:*} name=${pair##*:}
        if pid_alive "$pidfile" "$name"; then
            pid=$(cat "$pidfile")
            kill "$pid"
            wait_for 30 "$name to stop" sh -c "! [ -d /proc/$pid ]" || kill -9 "$pid" 2>/dev/null || true
        fi
    done
    log "down"
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) state=$(node_state); echo "${state:-down}"; [ -n "$state" ] ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
