"""Snapshots: the machine saved to and loaded from snapshot backends (snapshot-save/-load), and the device
state alone to and from a file (xen-save-devices-state / xen-load-devices-state)."""
