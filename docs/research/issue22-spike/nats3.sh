#!/usr/bin/env bash
set -euo pipefail
N=/tmp/sec/debs/x/usr/sbin/nats-server; B=/tmp/sec/spike/nats; rm -rf $B; mkdir -p $B
for i in 1 2 3; do
  d=$B/n$i; mkdir -p $d/js
  routes=""; for j in 1 2 3; do [ $j = $i ] || routes="$routes, nats-route://127.0.0.1:$((26220+j))"; done
  cat > $d/nats.conf <<CONF
server_name: gn$i
listen: 127.0.0.1:$((24220+i))
http: 127.0.0.1:$((28220+i))
jetstream { store_dir: "$d/js", max_memory_store: 256MB, max_file_store: 2GB }
cluster { name: galvani, listen: 127.0.0.1:$((26220+i)), routes: [${routes#, }] }
mqtt { listen: 127.0.0.1:$((21890+i)), stream_replicas: 3, consumer_replicas: 3 }
accounts {
  GALVANI { jetstream: enabled, users: [
    {user: dev-1, password: p1, permissions: {publish: ["galvani.v1.d.dev-1.>"], subscribe: ["galvani.v1.d.dev-1.>", "\$MQTT.sub.>"]}},
    {user: svc, password: s1} ] }
  SYS { users: [{user: sys, password: sys}] }
}
system_account: SYS
CONF
  chown -R postgres $d
  nice -n 19 runuser -u postgres -- $N -c $d/nats.conf -l $d/nats.log &
  echo $! >> /tmp/sec/spike/nats.pids
done
