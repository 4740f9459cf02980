"""The WEMoE method: build the mixture (``build``), adapt its routers (``adapt``), bound to the registry in ``method``."""
