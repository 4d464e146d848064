"""metalearn: meta-learning and multi-task learning experiments on JAX, configured by Hydra."""
