"""mig's wire format: a framed, versioned, validated stream of RAM pages, device state and commands."""
