"""The migration engine: outgoing precopy (source), incoming load (destination), statistics."""
