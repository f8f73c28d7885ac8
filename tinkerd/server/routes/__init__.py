"""The wire protocol's routes, by concern: each module's `router(server)` decodes HTTP,
calls `server.service` with the caller's identity, and encodes the answer."""

API = "/api/v1"
