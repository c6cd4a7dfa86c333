#!/bin/sh
# testbed's command port of recorded runs (no network: QEMU's record/replay does not
# replay SSH), run by rcS on a serial line in raw mode. The line is the checkpoint
# line too: while a command runs this script does not read it (the checkpoints'
# answers are theirs), and it writes only when the command has ended. The commands
# are in the image (/etc/testbed/cmd/N.sh): under record, input on a serial line must
# come in short pieces (QEMU drops what overflows the UART's 16-byte FIFO). One
# command at a time:
#   host -> guest: "run N"
#   guest -> host: "out", its stdout in base64 lines, "err", its stderr likewise,
#                  "end STATUS"
# Markers hold a space, base64 lines never do.
exec <"$1" >"$1" 2>/dev/null
while read -r verb arg; do
    case "$verb $arg" in
    run\ [0-9]|run\ [0-9][0-9]) ;;
    *) echo "end 127"; continue ;;
    esac
    sh "/etc/testbed/cmd/$arg.sh" </dev/null >/tmp/tb-cmd.out 2>/tmp/tb-cmd.err
    status=$?
    echo out
    base64 /tmp/tb-cmd.out
    echo err
    base64 /tmp/tb-cmd.err
    echo "end $status"
    rm -f /tmp/tb-cmd.out /tmp/tb-cmd.err
done
