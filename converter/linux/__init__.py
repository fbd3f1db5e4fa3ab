"""Conversion of Debian-family Linux guests, one module per concern. Each
module keeps its parsing and rewriting pure and does its guest I/O in one
`apply`-style function that takes a `GuestContext`."""
