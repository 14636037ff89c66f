"""The lowest layer: helpers every other part may use (settings checks, DDP, batches, file I/O); imports nothing above."""
