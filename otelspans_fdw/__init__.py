"""otelspans: OpenTelemetry trace spans as the PostgreSQL foreign table ``otel_spans``."""

__version__ = "0.1.0"
__all__ = ["__version__"]
