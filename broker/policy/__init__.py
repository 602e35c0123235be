"""Who is calling and what they may do. Pure: no I/O anywhere in this package."""
