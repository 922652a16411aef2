"""Corpus jobs: embed a whole corpus from files or S3 into vector-store-ready parts.

    python -m handler.batch INPUT OUTPUT [options]      # one machine, in-process (__main__.py)
    handler.batch.lambda_function.handler               # one Step Functions Distributed Map batch

Both run the engine (handler/engine) directly, with the model and options the HTTP API uses, so a
passage embedded here equals the same passage embedded through the API. The layers:
locations.py (local paths and s3:// URIs), rows.py (JSON Lines / CSV / Parquet into rows or
errors), parts.py (one part's Parquet or JSON Lines, written whole or not at all), job.py (parts,
resume, duplicates, progress and summary).
"""
