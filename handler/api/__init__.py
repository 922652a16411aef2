"""HTTP dialects: per dialect its schemas, its router and its rendering, all over the one service
(handler/service.py); the shared body parsing, rendering, docs and route marks beside them."""
