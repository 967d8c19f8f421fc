#!/bin/sh
# Starts one member of the Redis high-availability set (deploy/compose.yaml and
# deploy/k8s/release-service.yaml run it in the official redis image):
#
#   redis-ha.sh node [redis-server options...]   a data node (primary or replica)
#   redis-ha.sh sentinel                         a Sentinel
#
# Environment (host:port values; hostnames everywhere, never addresses):
#   REDIS_MASTER_NAME    the name the sentinels monitor (release-service's
#                        RELEASE_SERVICE_REDIS_SENTINEL_MASTER)
#   REDIS_FIRST_PRIMARY  the data node that is primary before any failover
#   REDIS_SENTINELS      every sentinel, comma-separated (RELEASE_SERVICE_REDIS_SENTINELS)
#   REDIS_SELF           this member, as the others reach it
#   SENTINEL_QUORUM, SENTINEL_DOWN_AFTER_MS, SENTINEL_FAILOVER_TIMEOUT_MS (sentinel only)
#   SENTINEL_CONFIG      the sentinel's config file (default /data/sentinel.conf)
#   REDIS_SENTINEL_WAIT_SECONDS  how long a data node waits for a sentinel (default 30)
#
# The sentinels' word decides the role: a node that restarts after a failover comes back
# as a replica of the current primary (a promoted replica as the primary), never as
# whatever it was configured as on its first start. A data node waits for that word (the
# whole set may be restarting at once, sentinels too, and a sentinel answers from its
# kept config as soon as it is up); only when no sentinel answers within
# REDIS_SENTINEL_WAIT_SECONDS does REDIS_FIRST_PRIMARY decide. So a node restarted after
# a failover while every sentinel stays down that long may come back in the wrong role.
set -eu

host_of() { echo "${1%:*}"; }
port_of() { echo "${1##*:}"; }

# "host port" of the current primary according to the first sentinel that knows it;
# nothing when none does.
sentinels_primary() {
  for sentinel in $(echo "$REDIS_SENTINELS" | tr ',' ' '); do
    [ "$sentinel" = "$REDIS_SELF" ] && continue
    answer=$(timeout 3 redis-cli -h "$(host_of "$sentinel")" -p "$(port_of "$sentinel")" \
             --raw sentinel get-master-addr-by-name "$REDIS_MASTER_NAME" 2>/dev/null) \
      || continue
    # Two lines, host then port; anything else (no answer, an error) is no word.
    host=$(echo "$answer" | sed -n 1p)
    port=$(echo "$answer" | sed -n 2p)
    case "$port" in ''|*[!0-9]*) continue ;; esac
    echo "$host $port"
    return
  done
}

# The sentinels' answer, asked for up to $1 seconds; else the first primary.
current_primary() {
  deadline=$(($(date +%s) + $1))
  while :; do
    primary=$(sentinels_primary)
    if [ -n "$primary" ]; then
      echo "$primary"
      return
    fi
    [ "$(date +%s)" -lt "$deadline" ] || break
    sleep 1
  done
  echo "redis-ha: no sentinel answered; first primary $REDIS_FIRST_PRIMARY" >&2
  echo "$(host_of "$REDIS_FIRST_PRIMARY") $(port_of "$REDIS_FIRST_PRIMARY")"
}

# The image's entrypoint takes a root container down to the redis user; elsewhere
# (a non-root pod, a plain host) redis-server runs as it is.
run_redis() {
  if command -v docker-entrypoint.sh >/dev/null; then
    exec docker-entrypoint.sh redis-server "$@"
  fi
  exec redis-server "$@"
}

role=${1:?usage: redis-ha.sh node [redis-server options...] | redis-ha.sh sentinel}
shift
case "$role" in
  node)
    primary=$(current_primary "${REDIS_SENTINEL_WAIT_SECONDS:-30}")
    set -- --port "$(port_of "$REDIS_SELF")" \
      --replica-announce-ip "$(host_of "$REDIS_SELF")" \
      --replica-announce-port "$(port_of "$REDIS_SELF")" "$@"
    if [ "$primary" != "$(host_of "$REDIS_SELF") $(port_of "$REDIS_SELF")" ]; then
      # shellcheck disable=SC2086 # "host port": two arguments
      set -- "$@" --replicaof $primary
    fi
    echo "redis-ha: starting $REDIS_SELF; primary: $primary" >&2
    run_redis "$@"
    ;;
  sentinel)
    # Sentinel rewrites its config file as it learns (the current primary, replicas,
    # other sentinels, the epoch), so the file lives on the data volume: written once,
    # then kept across restarts. The settings below take effect on that first start.
    config=${SENTINEL_CONFIG:-/data/sentinel.conf}
    if [ ! -s "$config" ]; then
      # Its peers' word if they have one (this sentinel lost its volume), else the first
      # primary; no waiting, since on the very first start they all start together.
      primary=$(current_primary 0)
      cat >"$config.tmp" <<EOF
port $(port_of "$REDIS_SELF")
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $(host_of "$REDIS_SELF")
sentinel announce-port $(port_of "$REDIS_SELF")
sentinel monitor $REDIS_MASTER_NAME $primary ${SENTINEL_QUORUM:?}
sentinel down-after-milliseconds $REDIS_MASTER_NAME ${SENTINEL_DOWN_AFTER_MS:-5000}
sentinel failover-timeout $REDIS_MASTER_NAME ${SENTINEL_FAILOVER_TIMEOUT_MS:-60000}
sentinel parallel-syncs $REDIS_MASTER_NAME 1
EOF
      mv "$config.tmp" "$config"
    fi
    echo "redis-ha: starting sentinel $REDIS_SELF" >&2
    run_redis "$config" --sentinel "$@"
    ;;
  *)
    echo "redis-ha.sh: unknown role $role (expected node or sentinel)" >&2
    exit 2
    ;;
esac
