"""mig's benchmarks: ``python -m benchmarks`` (or ``make bench``) runs them all and prints Markdown."""
