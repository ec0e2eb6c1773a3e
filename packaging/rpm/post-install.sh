install -d -m 0700 /var/lib/virtsec /var/lib/virtsec/quarantine
install -d -m 0750 /var/log/virtsec
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || :
    if [ "$1" -eq 1 ]; then
        systemctl enable virtsecd.service >/dev/null 2>&1 || :
    else
        systemctl try-restart virtsecd.service >/dev/null 2>&1 || :
    fi
fi
