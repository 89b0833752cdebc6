"""Measuring models on this server's hardware: ProfileModel (a model's variants)
and CompareBackbones (linear probes on frozen features of candidate backbones)."""
