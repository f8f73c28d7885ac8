"""HTTP route modules of `tinkerd serve`."""
