#!/usr/bin/env bash
# 3-node RabbitMQ 3.10.8 cluster on loopback from the unpacked .deb, run as user postgres,
# own epmd port, own cookie, own data dirs, ports; prints pids to /tmp/sec/spike/rmq.pids
set -euo pipefail
RH=/tmp/sec/debs/rmq/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8
B=/tmp/sec/spike/rmq; rm -rf $B; mkdir -p $B
U=postgres
EPMD=14369
echo -n "galvanispikecookie0123456789" > $B/.erlang.cookie; chmod 400 $B/.erlang.cookie
for i in 1 2 3; do
  d=$B/n$i; mkdir -p $d/{mnesia,log}
  cat > $d/rabbitmq.conf <<CONF
listeners.tcp.default = 127.0.0.1:$((25670+i))
mqtt.listeners.tcp.default = 127.0.0.1:$((21880+i))
mqtt.allow_anonymous = false
mqtt.durable_queue_type = quorum
loopback_users = none
cluster_formation.peer_discovery_backend = classic_config
cluster_formation.classic_config.nodes.1 = gsp1@localhost
cluster_formation.classic_config.nodes.2 = gsp2@localhost
cluster_formation.classic_config.nodes.3 = gsp3@localhost
prometheus.tcp.port = $((25690+i))
prometheus.tcp.ip = 127.0.0.1
CONF
  echo "[rabbitmq_mqtt,rabbitmq_prometheus,rabbitmq_auth_backend_http]." > $d/enabled_plugins
done
chown -R $U $B
for i in 1 2 3; do
  d=$B/n$i
  nice -n 19 runuser -u $U -- env -i PATH=/usr/bin:/bin HOME=$B LANG=C.UTF-8 ERL_EPMD_PORT=$EPMD ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_NODENAME=gsp$i@localhost RABBITMQ_DIST_PORT=$((25680+i)) \
    RABBITMQ_CONFIG_FILE=$d/rabbitmq.conf RABBITMQ_ENABLED_PLUGINS_FILE=$d/enabled_plugins \
    RABBITMQ_MNESIA_BASE=$d/mnesia RABBITMQ_LOG_BASE=$d/log RABBITMQ_CONF_ENV_FILE=/dev/null \
    RABBITMQ_ADVANCED_CONFIG_FILE=$d/advanced.config RABBITMQ_PLUGINS_DIR=$RH/plugins \
    ERL_FLAGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    $RH/sbin/rabbitmq-server > $d/stdout.log 2>&1 &
  echo $! >> /tmp/sec/spike/rmq.pids
done
