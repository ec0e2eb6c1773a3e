# On erase (not upgrade) stop the service; quarantine rules and records stay.
if [ "$1" -eq 0 ]; then
    if [ -d /var/lib/virtsec/quarantine ] && [ -n "$(find /var/lib/virtsec/quarantine -name '*.json' 2>/dev/null)" ]; then
        echo "virtsec: quarantined VMs stay isolated in the kernel; records kept in /var/lib/virtsec" >&2
    fi
    if [ -d /run/systemd/system ]; then
        systemctl --no-reload disable --now virtsecd.service >/dev/null 2>&1 || :
    fi
fi
