"""The control plane: the migration manager (validate, delegate, shape replies), capabilities, parameters,
status, events."""
