"""Cache layer: policy only. Knows registry value types, never HTTP or FUSE."""
