"""Ray jobs and their command lines: signals, filtering, resharding, scoring, reports."""

import filters  # noqa: F401  (sets Polars' thread count before any pipeline module imports Polars)
