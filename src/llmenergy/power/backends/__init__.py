"""Power collection: backends (one module per vendor), the factory, and the per-node process.

Import from the modules: :mod:`~llmenergy.power.backends.base` (the backend
interface and the power table), :mod:`~llmenergy.power.backends.factory`
(:func:`select_backend`). This package re-exports nothing, so importing it needs
neither NVML nor DCGM, and vendor modules (``nvml``, ``dcgm``) are imported only
when their backend is built.
"""
