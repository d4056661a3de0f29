"""What every layer uses: library errors, atomic file output, fixed-size batching."""
