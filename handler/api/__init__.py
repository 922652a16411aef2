"""HTTP dialects: one router (with its schemas) per dialect, all calling the same engine methods."""
