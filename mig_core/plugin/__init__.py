"""Plugins: the entry-point registry (stevedore), the hook specifications and the typed hook facade (pluggy)."""
