#!/bin/sh
# /init of the busybox PV guest: netfront up, ping 169.254.1.1 (its backend domain) forever; on request (dom0 writes
# data/please-forge) write nonsense into its own frontend nodes, as a hostile guest would.
# It leaves device/vif/0/state alone: a guest may legitimately close its own vif that way
# (netback then moves the backend to Closing, which the inventory follows as it should).
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
insmod /lib/modules/xen-netfront.ko
d=$(xenstore-read domid 2>/dev/null || echo 0)
for i in $(seq 1 50); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set eth0 up
ip addr add "169.254.1.$((10 + d))/24" dev eth0
forged=0
asked=0
hammered=0
dd_last=
pings=0
# has FLAG: dom0 wrote data/FLAG, from one listing of data/ per round. Under TCG every process
# costs the guest tens to hundreds of ms; a xenstore-read per request kind and round kept
# each idle guest busy while dom0 waited for another guest to boot.
has() { case " $flags " in *" $1 "*) return 0 ;; esac; return 1; }
while true; do
    ping -c 1 -W 1 169.254.1.1 >/dev/null 2>&1 && pings=$((pings + 1))
    flags=
    for f in $(xenstore-list data 2>/dev/null); do case $f in please-*) flags="$flags $f" ;; esac; done
    # On request (dom0 writes data/please-count): how many of its pings were answered so far.
    has please-count && xenstore-write data/pings "$pings"
    if [ "$forged" = 0 ] && has please-forge; then
        xenstore-write device/vif/0/mac de:ad:be:ef:00:01 \
                       device/vif/0/backend /local/domain/0/backend/vif/999/0 \
                       device/vif/0/backend-id 7 device/vif/0/handle 77 \
                       device/vif/0/ip "0.0.0.0/0"
        # Attempts on nodes the guest does not own must fail.
        xenstore-write "/local/domain/0/backend/vif/$d/0/mac" de:ad:be:ef:00:02 2>/dev/null && echo "GUEST WROTE BACKEND"
        xenstore-write name evil 2>/dev/null && echo "GUEST WROTE NAME"
        xenstore-write data/forged 1
        forged=1
    fi
    # On request (dom0 writes data/please-request): ask virtsec, through the service's
    # XenStore request directory, to release this guest. It must be refused.
    if [ "$asked" = 0 ] && has please-request; then
        if xenstore-write "/local/domain/0/virtsec/request/guest-$d" \
            "{\"op\":\"release\",\"target\":\"$(xenstore-read name)\",\"reason\":\"let me out\"}" 2>/dev/null; then
            xenstore-write data/request-result written
        else
            xenstore-write data/request-result denied
        fi
        asked=1
    fi
    # On request (data/please-hammer): hammer XenStore as a hostile guest would: a burst of
    # writes, values over the size limit, a deep path, nonsense in its frontend.
    # The 300 writes are one client's burst: one process (Debian's xenstore-write sends every
    # pair inside one transaction, so the service sees 300 changes at its commit). A process
    # per write kept guest2 busy past the check's 60 s in CI (2 cores under TCG), its pings
    # stopped, and the quarantine checks after it failed.
    if [ "$hammered" = 0 ] && has please-hammer; then
        big=AAAAAAAA; for _ in 1 2 3 4 5 6 7 8 9; do big="$big$big"; done
        deep=data; for _ in $(seq 1 120); do deep="$deep/d"; done
        pairs=; for i in $(seq 1 300); do pairs="$pairs data/h$i $i"; done
        # shellcheck disable=SC2086 # the pairs are meant to split
        xenstore-write $pairs 2>/dev/null
        ok=0; for f in $(xenstore-list data 2>/dev/null); do case $f in h[0-9]*) ok=$((ok + 1)) ;; esac; done
        xenstore-write data/big "$big" 2>/dev/null && echo "GUEST WROTE 4 KiB"
        xenstore-write "$deep" x 2>/dev/null
        xenstore-write device/vif/0/mac "$big" 2>/dev/null; xenstore-write device/vif/0/handle "-1" device/vif/0/backend-id nonsense 2>/dev/null
        xenstore-write data/hammered "$ok"
        hammered=1
    fi
    # On request (dom0 writes data/please-dd = "ID DD GUEST OP"): do what the virtsec of
    # network driver domain DD does with the directory dom0's virtsec keeps for it (or, when
    # this guest is not DD, try to): read GUEST's published identity, try to overwrite it, ask
    # dom0 for OP (pause/unpause) on GUEST and collect the answer. What happened goes to
    # data/dd-ID.
    dd=
    has please-dd && dd=$(xenstore-read data/please-dd 2>/dev/null)
    if [ -n "$dd" ] && [ "$dd" != "$dd_last" ]; then
        dd_last=$dd
        set -- $dd
        dir=/local/domain/0/virtsec/dd/$2
        r="read=$(xenstore-read "$dir/vm/$3" 2>/dev/null || echo denied)"
        if xenstore-write "$dir/vm/$3" '{"uuid":"00000000-0000-4000-8000-00000000000f","name":"forged"}' 2>/dev/null; then
            r="$r forge=WRITTEN"
        else
            r="$r forge=denied"
        fi
        if xenstore-write "$dir/request/e2e-$1" "{\"op\":\"$4\",\"domid\":$3}" 2>/dev/null; then
            a=none
            for _ in $(seq 1 60); do
                a=$(xenstore-read "$dir/response/e2e-$1" 2>/dev/null) && break
                a=none
                sleep 0.25
            done
            xenstore-rm "$dir/response/e2e-$1" 2>/dev/null
            r="$r request=written response=$a"
        else
            r="$r request=denied"
        fi
        xenstore-write "data/dd-$1" "$r"
    fi
    sleep 0.5
done
