"""What every stage shares: errors, atomic file I/O, strict configs and registries.

Nothing here imports torch or any other stage, so any module may import it.
"""
