#!/usr/bin/env bash
# A two-node Slurm cluster on this one machine, for tests and CI (needs root; Debian packages).
#   bash tests/slurm/cluster.sh start | stop | restart | status
# node1 and node2 are two slurmd daemons on 127.0.0.1 with distinct ports, named in /etc/hosts.
set -euo pipefail
CONF=/etc/slurm/slurm.conf
NODES=(node1 node2)
PORTS=(17001 17002)
CPUS=${SLURM_TEST_CPUS:-2}

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || { echo "cluster.sh: slurm is not installed and this is not root" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq slurmd slurmctld slurm-client munge >/dev/null
}

write_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm /run/munge
  for n in "${NODES[@]}"; do
    grep -qE "^[0-9.]+\s+.*\b$n\b" /etc/hosts || echo "127.0.0.1 $n" >> /etc/hosts
    mkdir -p "/var/spool/slurmd/$n"
  done
  local old
  old=$(cat "$CONF" 2>/dev/null || true)
  cat > "$CONF" <<CONF
ClusterName=clipforge-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits out the old job credential's lifetime before it may start (120 s by
# default); a short one keeps the preemption test quick.
AuthInfo=cred_expire=10
SlurmctldPort=16817
StateSaveLocation=/var/spool/slurmctld
SlurmctldPidFile=/run/slurmctld.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
MinJobAge=600
NodeName=node1 NodeAddr=127.0.0.1 Port=${PORTS[0]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeAddr=127.0.0.1 Port=${PORTS[1]} CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
  # Daemons started with another configuration would not see this one.
  [ "$old" = "$(cat "$CONF")" ] || stop
}

start() {
  install
  write_conf
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
  fi
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || runuser -u munge -- /usr/sbin/munged
  pgrep -x slurmctld >/dev/null || slurmctld
  for n in "${NODES[@]}"; do
    pgrep -f "slurmd -N $n" >/dev/null || slurmd -N "$n"
  done
  for _ in $(seq 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^idle|^mixed'; then
      scontrol update nodename=node1,node2 state=resume 2>/dev/null || true
      if [ "$(sinfo -h -N -o '%T' | grep -cE 'idle|mixed|allocated')" = 2 ]; then
        echo "slurm test cluster up: $(sinfo -h -N -o '%N:%T' | tr '\n' ' ')"
        return 0
      fi
    fi
    sleep 1
  done
  echo "cluster.sh: nodes did not come up" >&2
  sinfo -N >&2 || true
  tail -n 20 /var/log/slurm/*.log >&2 || true
  exit 1
}

stop() {
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 20); do pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || return 0; sleep 0.5; done
}

case "${1:-status}" in
  start) start ;;
  restart) stop; start ;;
  stop) stop ;;
  status) sinfo -N ;;
  *) echo "usage: $0 start|stop|restart|status" >&2; exit 2 ;;
esac
