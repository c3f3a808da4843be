"""teelab_guest: PID 1 of every teelab guest, and the wire protocols host and guest share."""
