"""teelab: a lab harness for confidential computing on QEMU/KVM."""

__version__ = "0.1.0"
