"""The benchmark: cold start, warm latency, throughput, memory and concurrency of our BGE-M3 builds
against FlagEmbedding and plain onnxruntime, on one random-weight model of BGE-M3's exact shape.

    python -m bench [--smoke] [--engines ours-int8,ort-int8,...] [--work-dir bench/work]
                    [--out bench/results]

Every measurement runs in its own process (`python -m bench.worker`) so that start-up and memory
figures are those of a fresh process; the parent only orchestrates, prints progress on stderr and
writes the JSON, the markdown table and the plot. No test asserts on any timing.
"""
