"""The machine model: the RAM blocks, devices and vCPU threads a host hands over, its run state, the host tracker."""
