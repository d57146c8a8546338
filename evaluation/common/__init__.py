"""What every package of the harness needs: its error types, atomic writes and file digests."""
