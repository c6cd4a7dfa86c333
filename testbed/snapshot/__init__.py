"""Seeing inside the guest from the host.

Pure decoders over bytes (``pagetable``, ``migstream``, the HMP parser in
``cpustate``) and thin I/O edges (``physmem`` sources, the QMP snapshot in
``cpustate``).
"""
