#!/bin/sh
# /init of the network driver domain that checks.sh boots (check 9b): dom0's root file system
# with virtsec unpacked from this tree's .deb. netback and a bridge xenbr0 (169.254.1.1, the
# address the guests ping), `xl devd` to run the vif hotplug scripts for the vifs this domain
# backs, and virtsecd set up as docs/quarantine.md ("Driver domains") tells an administrator.
# Reports readiness in its own data/dd-ready; its console is dom0's
# /var/log/xen/console/guest-netdd.log.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts && mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /var/log/xen /var/lib/xen /var/run/xen /run/lock /var/log/virtsec /var/lib/virtsec
echo "dd: up, kernel $(uname -r)"
for m in xen-evtchn xenfs xen-gntdev xen-gntalloc xen-netback bridge sch_ingress cls_bpf nf_tables; do
    modprobe "$m" 2>/dev/null || echo "dd: modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen 2>/dev/null
hostname netdd
ip link set lo up
ip link add xenbr0 type bridge
ip addr add 169.254.1.1/24 dev xenbr0
ip link set xenbr0 up
cat > /run/dd.rules <<'RULES'
alert icmp any any -> 169.254.1.1 any (msg:"virtsec e2e: guest pings its driver domain"; content:"|00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 00|"; sid:9002; rev:1;)
RULES
sed -e 's|^path = "/run/xenstored/socket"|path = "/dev/xen/xenbus"|' \
    -e 's|^# dom0_identities = true|dom0_identities = true|' \
    -e 's|^domain_control = "auto"|domain_control = "dom0"|' \
    -e 's|^rules = \[\]|rules = ["/run/dd.rules"]|' \
    -e 's|^counters_interval_s = .*|counters_interval_s = 2|' /etc/virtsec/virtsecd.toml > /run/dd.toml
for k in 'path = "/dev/xen/xenbus"' 'dom0_identities = true' 'domain_control = "dom0"' 'rules = \["/run/dd.rules"\]'; do
    grep -q "^$k" /run/dd.toml || echo "dd: the sample configuration has no line for: $k"
done
virtsecd --config /run/dd.toml --stderr 2>&1 | sed 's/^/dd: /' &
xl devd -F 2>&1 | sed 's/^/dd: xl devd: /' &
(sleep 5; virtsec domains --follow --json | while IFS= read -r l; do
    echo "dd: $(cut -d' ' -f1 /proc/uptime) s: domains $(echo "$l" | jq -c 'map({domid, name, vifs: (.vifs | map_values({state, hotplug_status}))})')"
done) &
# What dom0's checks cannot see from outside, on the console every 10 s.
while true; do
    sleep 10
    st=$(virtsec status --json 2>&1)
    echo "dd: $(cut -d' ' -f1 /proc/uptime) s: $(echo "$st" | jq -c '{xs: (.xenstore | {connected, in_sync, reconciles, self_domid}), warnings}' 2>/dev/null || echo "$st" | head -c 300)"
    p=$(pidof virtsecd)
    [ -n "$p" ] && echo "dd: virtsecd threads: $(for t in /proc/$p/task/*; do echo "$(cat $t/comm):$(cat $t/wchan)"; done | tr '\n' ' ')"
    echo "dd: links $(ip -br link | tr -s ' ' | tr '\n' ';')"
done &
for _ in $(seq 1 300); do
    virtsec status --json 2>/dev/null | jq -e '.xenstore.in_sync' >/dev/null 2>&1 && break
    sleep 0.2
done
xenstore-write data/dd-ready "$(virtsec status --json | jq -c '{in_sync: .xenstore.in_sync, self_domid: .xenstore.self_domid}')"
echo "dd: ready"
while true; do sleep 1000; done
