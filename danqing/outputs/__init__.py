"""Image outputs: A1111 infotext, atomic saving."""
