"""What this Linux host offers, wrapped: userfaultfd, feature probes, hardware-accelerator probes.

Public for plugin authors (a dirty tracker built on write-protect faults uses ``mig_core.host.uffd``).
"""
