"""COLO (coarse-grained lock-stepping): after an ``x-colo`` migration the source stays the running primary
and the destination a running secondary, kept in step by checkpoints; either survives the other."""
