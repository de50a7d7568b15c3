"""The machine model: RAM blocks, userfaultfd registrations, vCPU threads, devices (``machine.Machine``)."""
