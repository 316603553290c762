"""Load generator: demo and benchmark traffic, a client of the receiver (not part of it)."""
