#!/usr/bin/env bash
sleep 6
for i in 1 2 3; do curl -s 127.0.0.1:$((28220+i))/healthz?js-enabled-only=true; echo " node $i"; done
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21891 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/telemetry -m x; echo "own topic pub rc=$?"
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21891 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-2/telemetry -m x; echo "other topic pub rc=$? (NATS acks and drops)"
mosquitto_pub -V mqttv5 -h 127.0.0.1 -p 21891 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/telemetry -m x; echo "mqtt5 connect rc=$?"
mosquitto_pub -V mqttv311 -h 127.0.0.1 -p 21891 -u svc -P s1 -i galvani-api -q 1 -r -t galvani/v1/d/dev-1/config -m cfg1; echo "retained pub rc=$?"
echo "node1 sub:"; timeout 5 mosquitto_sub -V mqttv311 -h 127.0.0.1 -p 21891 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/config -C 1 -v; echo "rc=$?"
echo "node2 sub:"; timeout 5 mosquitto_sub -V mqttv311 -h 127.0.0.1 -p 21892 -u dev-1 -P p1 -i dev-1 -q 1 -t galvani/v1/d/dev-1/config -C 1 -v; echo "rc=$?"
