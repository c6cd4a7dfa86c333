"""Boot stage: host capabilities, QEMU machine control and the guest command channel."""
