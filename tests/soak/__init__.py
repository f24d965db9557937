"""The randomized soak: real prefork workers, a private Redis, faults, and an audit.

See docs/reliability.md for what it checks and how to run its long mode.
"""
