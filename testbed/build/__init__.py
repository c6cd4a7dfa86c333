"""Build stage: kernels, guest programs and initramfs images, cached by content hash."""
