"""The load agent for terminal servers: `GET /load` (0..100) and `GET /sessions`."""
