"""The script of a cluster lock application: it holds nothing and exits (see ray_serve_cai.cluster.lock)."""
