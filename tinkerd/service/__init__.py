"""The service layer: what the HTTP routes call, over one engine."""
