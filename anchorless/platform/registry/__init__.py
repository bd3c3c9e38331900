"""The model registry: listing versions and rolling an alias back (``versions``), and
promotion through evaluation with gates and guards (``promotion``)."""
