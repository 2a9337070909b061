"""The experiments built on the three services: ``ddk demo`` and ``ddk compare``, their tables and plots."""
