"""The extension points, one module each: its entry-point group, its base class and one ``load`` function.

Plugin authors import from here (and from ``mig_core`` itself); nothing here imports the machine, the stream or the
engine.
"""
