"""Stage 2 of ReLA (ReLA-F): stream converted shards and train a target network
with a self-supervised method, accelerated by the ReLA loss until it plateaus
(Sun, Jiang, Lin, NeurIPS 2024, Sec. 4.2)."""
