"""Stage 1 of ReLA (ReLA-D): run a prior model once over an image tree and write
shards holding each image with its prior representation (Sun, Jiang, Lin,
NeurIPS 2024, Sec. 4)."""
