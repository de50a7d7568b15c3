"""Third-party compressors for mig, packaged on their own: nothing in mig's core changes to use them."""
