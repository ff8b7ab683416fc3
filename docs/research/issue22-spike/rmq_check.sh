#!/usr/bin/env bash
# after rmq3.sh: cluster status, users, {username} topic perms, retained across nodes
RH=/tmp/sec/debs/rmq/usr/lib/rabbitmq/lib/rabbitmq_server-3.10.8; B=/tmp/sec/spike/rmq
ctl() { runuser -u postgres -- env HOME=$B ERL_EPMD_PORT=14369 LANG=C.UTF-8 PATH=/usr/bin:/bin $RH/sbin/rabbitmqctl -n gsp1@localhost "$@"; }
for i in 1 2 3; do timeout 120 runuser -u postgres -- env HOME=$B ERL_EPMD_PORT=14369 LANG=C.UTF-8 PATH=/usr/bin:/bin $RH/sbin/rabbitmqctl -n gsp$i@localhost await_startup >/dev/null 2>&1 && echo "node $i up"; done
ctl cluster_status --formatter json | python3 -c 'import json,sys; d=json.load(sys.stdin); print("running:", d["running_nodes"])'
ctl add_user dev-1 p1 >/dev/null; ctl set_permissions -p / dev-1 '^mqtt-subscription-dev-1.*' '^(amq\.topic|mqtt-subscription-dev-1.*)$' '^(amq\.topic|mqtt-subscription-dev-1.*)$' >/dev/null
ctl set_topic_permissions -p / dev-1 amq.topic '^galvani\.v1\.d\.{username}\.' '^galvani\.v1\.d\.{username}\.' >/dev/null
ctl add_user svc s1 >/dev/null; ctl set_permissions -p / svc '.*' '.*' '.*' >/dev/null
# own topic ok, other device's topic refused
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21881 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/telemetry -m x; echo "own topic pub rc=$?"
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21881 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-2/telemetry -m x; echo "other topic pub rc=$?"
mosquitto_pub -V mqttv5 -h 127.0.0.1 -p 21881 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/telemetry -m x; echo "mqtt5 connect rc=$?"
# retained published on node 1, subscriber on node 2 and node 1
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21881 -u svc -P s1 -i galvani-api -q 1 -r -t galvani/v1/d/dev-1/config -m cfg1; echo "retained pub rc=$?"
echo "node1 sub:"; timeout 3 mosquitto_sub -V mqttv311 -h 127.0.0.1 -p 21881 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/config -C 1 -v; echo "rc=$?"
echo "node2 sub:"; timeout 3 mosquitto_sub -V mqttv311 -h 127.0.0.1 -p 21882 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/config -C 1 -v; echo "rc=$?"
