"""testbed: QEMU-based verification of kernels that share address spaces under MPK.

Data flows build -> boot -> snapshot -> check -> report; each stage is a
subpackage of the same name.
"""

__version__ = "0.1.0"
