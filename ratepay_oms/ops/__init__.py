"""Operating the engine: Prometheus metrics, optional tracing spans.

``instruments`` holds the counters and histograms the engine and the RatePAY facade record
into (it imports nothing else of ours, so any room may use it); ``metrics`` adds what is read
from the database at scrape time and serves both over HTTP; ``tracing`` opens OpenTelemetry
spans when ``opentelemetry-api`` is installed and does nothing otherwise.
"""
