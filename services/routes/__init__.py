"""HTTP routes, one module per resource; each route is a few lines over catalog, jobs and reports."""
